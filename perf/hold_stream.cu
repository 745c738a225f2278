// A kernel that keeps a stream busy on the GPU for a set time, so that the host can enqueue the
// calls to be timed, and their events, behind it: the events then measure the GPU's work only,
// without the host's time to validate arguments and launch kernels (see ll_perf's -G).
#include <stdint.h>

#include "common.h"

namespace moe_perf {
namespace {

__global__ void holdKernel(uint64_t ns) {
  uint64_t start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (now - start < ns);
}

}  // namespace

void holdStream(cudaStream_t stream, double us) {
  holdKernel<<<1, 1, 0, stream>>>((uint64_t)(us * 1000.0));
  PERF_CUDA(cudaGetLastError());
}

}  // namespace moe_perf
