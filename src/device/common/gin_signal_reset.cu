// Creation-time reset of the EP context's GIN signals (see launchGinSignalReset).
#include <nccl_device.h>
#include "device/kernel_args.h"

namespace nccl_moe {

// Signal i % count of context i / count, for every context of the device communicator.
__global__ void ginSignalResetKernel(ncclDevComm devComm, int count) {
  const long long total = (long long)devComm.ginContextCount * count;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    const ncclGin gin(devComm, (int)(i / count));
    gin.resetSignal((ncclGinSignal_t)(i % count));
  }
}

cudaError_t launchGinSignalReset(const ncclDevComm& devComm, int count, cudaStream_t stream) {
  if (count <= 0 || devComm.ginContextCount <= 0) return cudaSuccess;
  const long long total = (long long)devComm.ginContextCount * count;
  const int threads = 256;
  const long long blocks = (total + threads - 1) / threads;
  ginSignalResetKernel<<<(int)(blocks < 1024 ? blocks : 1024), threads, 0, stream>>>(devComm, count);
  return cudaGetLastError();
}

}  // namespace nccl_moe
