// NCCL_MOE_SEQ_START: the test hook of sequence_start.h.
#include "sequence_start.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <vector>
#include "comm.h"
#include "error.h"

namespace nccl_moe {

ncclResult_t applySequenceStart(const ncclMoeComm* c) {
  const char* env = getenv("NCCL_MOE_SEQ_START");
  if (env == nullptr || *env == '\0') return ncclSuccess;
  char* end = nullptr;
  errno = 0;
  const unsigned long long n = strtoull(env, &end, 0);
  if (errno != 0 || *end != '\0' || env[0] == '-')
    return setError(ncclInvalidArgument, "ncclMoeCommCreate: NCCL_MOE_SEQ_START = \"%s\" is not an unsigned "
                    "64-bit number", env);
  if (n == 0) return ncclSuccess;
  // GIN signals cannot be preset (a new context clears them to 0 and only puts add to them), and
  // the internode waits count from 0: the hook is for single-node contexts.
  if (c->nodes.nNodes > 1)
    return setError(ncclInvalidUsage, "ncclMoeCommCreate: NCCL_MOE_SEQ_START = %llu is a single-node test hook; "
                    "this context spans %d nodes, whose GIN signals always start at 0", n, c->nodes.nNodes);

  DeviceState st;
  memset(&st, 0, sizeof(st));
  st.dispatchSeq = n;
  st.combineSeq = n;
  for (int s = 0; s < kMaxBufferSlots; ++s) {
    st.llDispatchSends[s] = n;
    st.llCombineSends[s] = n;
  }
  MOE_CUDA(cudaMemcpy(c->state, &st, sizeof(st), cudaMemcpyHostToDevice));

  // Signal values after n operations of every peer (unsigned arithmetic wraps like the device's
  // adds): stores carry the operation number, per-CTA adds numSms per operation.
  const uint64_t perOp = (uint64_t)c->cfg.numSms;
  std::vector<uint64_t> ht((size_t)kSignalKinds * kMaxRanks, 0);
  for (int src = 0; src < c->nRanks; ++src) {
    ht[kSigDispatchCounts * kMaxRanks + src] = n;
    ht[kSigDispatchDone * kMaxRanks + src] = perOp * n;
    ht[kSigCombineReady * kMaxRanks + src] = n;
    ht[kSigCombineDone * kMaxRanks + src] = perOp * n;
  }
  MOE_CUDA(cudaMemcpy(c->winBase + c->layout.signals, ht.data(), ht.size() * sizeof(uint64_t),
                      cudaMemcpyHostToDevice));
  if (c->cfg.mode != ncclMoeLowLatency) return ncclSuccess;
  const std::vector<uint64_t> dispatchSig(c->nRanks, (uint64_t)n << 32);  // T = 0
  const std::vector<uint64_t> combineSig(c->nRanks, perOp * n);
  for (int s = 0; s < c->cfg.numBufferSlots; ++s) {
    char* slot = c->winBase + c->layout.llSlots + (size_t)s * c->layout.ll.bytes;
    MOE_CUDA(cudaMemcpy(slot + c->layout.ll.dispatchSignals, dispatchSig.data(),
                        dispatchSig.size() * sizeof(uint64_t), cudaMemcpyHostToDevice));
    MOE_CUDA(cudaMemcpy(slot + c->layout.ll.combineSignals, combineSig.data(),
                        combineSig.size() * sizeof(uint64_t), cudaMemcpyHostToDevice));
  }
  return ncclSuccess;
}

}  // namespace nccl_moe
