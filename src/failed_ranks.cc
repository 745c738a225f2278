// Low-latency mode's failed-rank set: ncclMoeMarkRankFailed / ncclMoeGetFailedRanks, and the
// snapshot each low-latency kernel takes of it (failedRanks, comm.h).
#include <atomic>
#include "comm.h"
#include "error.h"

namespace nccl_moe {

RankSet failedRanks(const ncclMoeComm* c) {
  RankSet s = c->failedMarked;
  const volatile unsigned int* found = c->failedHost;  // written by kernels (atomicOr_system)
  for (int i = 0; i < kRankMaskWords; ++i) s.words[i] |= found[i];
  std::atomic_thread_fence(std::memory_order_acquire);
  return s;
}

static ncclResult_t checkFailedRankCall(const ncclMoeComm* c, const char* fn) {
  MOE_CHECK(checkComm(c, fn));
  if (c->cfg.mode != ncclMoeLowLatency)
    return setError(ncclInvalidUsage, "%s: the failed-rank set is a low-latency-mode feature; this EP context is in "
                    "high-throughput mode, where a timeout is fatal", fn);
  return checkDeviceErrors(c);
}

}  // namespace nccl_moe

using namespace nccl_moe;

extern "C" ncclResult_t ncclMoeMarkRankFailed(ncclMoeComm_t c, int rank) {
  clearError();
  const char* fn = "ncclMoeMarkRankFailed";
  MOE_CHECK(checkFailedRankCall(c, fn));
  if (rank < 0 || rank >= c->nRanks)
    return setError(ncclInvalidArgument, "%s: rank = %d is not a rank of the EP context (0..%d)", fn, rank,
                    c->nRanks - 1);
  if (rank == c->rank)
    return setError(ncclInvalidArgument, "%s: rank = %d is the calling rank; a rank cannot mark itself failed", fn,
                    rank);
  c->failedMarked.words[rank / 32] |= 1u << (rank % 32);
  return ncclSuccess;
}

extern "C" ncclResult_t ncclMoeGetFailedRanks(ncclMoeComm_t c, int* failed, int count) {
  clearError();
  const char* fn = "ncclMoeGetFailedRanks";
  MOE_CHECK(checkFailedRankCall(c, fn));
  if (failed == nullptr) return setError(ncclInvalidArgument, "%s: failed is NULL", fn);
  if (count != c->nRanks)
    return setError(ncclInvalidArgument, "%s: count = %d must be the number of ranks, %d", fn, count, c->nRanks);
  const RankSet s = failedRanks(c);
  for (int r = 0; r < count; ++r) failed[r] = s.has(r) ? 1 : 0;
  return ncclSuccess;
}
