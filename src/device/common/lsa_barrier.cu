// Creation-time LSA barrier through the NCCL device communicator.
#include <nccl_device.h>
#include "device/kernel_args.h"

namespace nccl_moe {

__global__ void lsaBarrierKernel(ncclDevComm devComm) {
  ncclLsaBarrierSession<ncclCoopCta> bar(ncclCoopCta(), devComm, ncclTeamTagLsa(), 0);
  bar.sync(ncclCoopCta(), cuda::memory_order_acq_rel);
}

cudaError_t launchLsaBarrier(const ncclDevComm& devComm, cudaStream_t stream) {
  lsaBarrierKernel<<<1, 128, 0, stream>>>(devComm);
  return cudaGetLastError();
}

}  // namespace nccl_moe
