// Creation-time GIN kernels of a multi-node EP context (launchGinSignalReset, launchGinHandshake;
// kernel_args.h states their contracts).
#include <nccl_device.h>
#include "device/kernel_args.h"
#include "device/common/peer_sync.cuh"
#include "net/device/gin.cuh"
#include "net/device/rail.h"

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

// One CTA: thread d puts a.bytes to remote rank d (row of this rank in d's landing region) with
// +1 on a.signal; then thread 0 polls this rank's a.signal until every remote rank's put has
// landed or a.timeoutNs pass, and stores the last value read in *a.arrived. No gin.flush: NCCL's
// flush has no timeout, and a proxy whose plugin failed a put never completes it (2.28.9 ignores
// the plugin's test() error), so a GIN that does not deliver would hang creation here instead of
// failing it with a count. The staging rows are not rewritten before the vote that follows has
// seen every rank's puts land (their sources were read by then).
__global__ void ginHandshakeKernel(GinHandshakeArgs a) {
  const PeerMap& p = a.peers;
  for (int d = threadIdx.x; d < p.nRanks; d += blockDim.x) {
    if (p.lsaIndex(d) != kPeerRemote) continue;
    const ncclGin gin(a.devComm, ginContextOf(a.devComm, d));
    putWithSignal(gin, a.win, d, a.landOff + (size_t)remoteIndexAt(p, d, p.rank) * a.rowBytes,
                  a.stageOff + (size_t)remoteIndex(p, d) * a.rowBytes, a.bytes, (ncclGinSignal_t)a.signal, 1,
                  ncclCoopThread());
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  const ncclGin gin(a.devComm, ginContextOf(a.devComm, p.rank));
  const uint64_t want = (uint64_t)(p.nRanks - p.lsaSize);
  uint64_t v = gin.readSignal((ncclGinSignal_t)a.signal);
  const uint64_t start = globalTimerNs();
  while (v < want && globalTimerNs() - start < (uint64_t)a.timeoutNs) v = gin.readSignal((ncclGinSignal_t)a.signal);
  *(volatile unsigned long long*)a.arrived = v;
  __threadfence_system();
}

cudaError_t launchGinHandshake(const GinHandshakeArgs& args, cudaStream_t stream) {
  ginHandshakeKernel<<<1, 256, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace nccl_moe
