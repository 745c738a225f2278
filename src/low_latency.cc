// Low-latency mode: host side of ncclMoeLowLatency{Dispatch,Combine}[Complete] and the window
// size query. No call here synchronises the host.
#include <algorithm>
#include <limits.h>
#include <string.h>
#include "comm.h"
#include "error.h"

namespace nccl_moe {

static ncclResult_t checkLowLatencyComm(const ncclMoeComm* c, const char* fn) {
  MOE_CHECK(checkComm(c, fn));
  if (c->cfg.mode != ncclMoeLowLatency)
    return setError(ncclInvalidUsage, "%s: the EP context is in high-throughput mode; use ncclMoeDispatch/Combine",
                    fn);
  return checkDeviceErrors(c);
}

static ncclResult_t checkSlot(const ncclMoeComm* c, const ncclMoeLowLatencyOutput_t* d, const char* fn) {
  if (d == nullptr) return setError(ncclInvalidArgument, "%s: dispatched is NULL", fn);
  if (d->slot < 0 || d->slot >= c->cfg.numBufferSlots)
    return setError(ncclInvalidArgument, "%s: dispatched->slot = %d is not a buffer slot (0..%d)", fn, d->slot,
                    c->cfg.numBufferSlots - 1);
  if (d->numTokens < 0 || d->numTokens > c->cfg.maxTokensPerRank)
    return setError(ncclInvalidArgument, "%s: dispatched->numTokens = %d is outside 0..%d", fn, d->numTokens,
                    c->cfg.maxTokensPerRank);
  if (d->sequence == 0)
    return setError(ncclInvalidArgument, "%s: dispatched->sequence = 0: the struct was not filled by "
                    "ncclMoeLowLatencyDispatch", fn);
  // The slot's owner is the latest dispatch on it; an older output's rows were overwritten.
  if (d->sequence != c->llSlotSequence[d->slot] || d->numTokens != c->llSlotTokens[d->slot])
    return setError(ncclInvalidUsage,
                    "%s: dispatched (slot %d, sequence %llu, numTokens %d) is not the output of the latest "
                    "dispatch on its slot (sequence %llu, numTokens %d): stale or altered",
                    fn, d->slot, d->sequence, d->numTokens, c->llSlotSequence[d->slot], c->llSlotTokens[d->slot]);
  return ncclSuccess;
}

// Whether a call of this rank's T runs as one kernel (one_launch_lsa.cu) instead of a send and a
// completion: small one-shot calls on one node (config.h, llOneLaunchChosen), up to the limit of
// that operation (limit: c->llOneLaunch.dispatchTokens or .combineTokens).
static bool oneLaunch(const ncclMoeComm* c, int limit, int numTokens, unsigned int flags) {
  return llOneLaunchChosen(limit, numTokens, (flags & NCCL_MOE_LL_SEND_ONLY) != 0, c->nodes.nNodes, c->nRanks);
}

// The internode part of slot `slot` (enabled = 0 on one node: the LSA-only kernels run).
static LlNetArgs netArgs(const ncclMoeComm* c, int slot) {
  LlNetArgs n;
  memset(&n, 0, sizeof(n));
  if (c->nodes.nNodes <= 1) return n;
  const LlNetSlotRegions& r = c->llNet;
  const size_t base = c->llNetOff + (size_t)slot * r.bytes;
  n.enabled = 1;
  n.devComm = c->devComm;
  n.recordBytes = (int)r.record.bytes;
  n.recordData = (int)r.record.data;
  n.recordScales = (int)r.record.scales;
  n.countsBytes = (int)r.countsBytes;
  n.dispatchStage = base + r.dispatchStage;
  n.dispatchLand = base + r.dispatchLand;
  n.countsStage = base + r.countsStage;
  n.countsLand = base + r.countsLand;
  n.combineStage = base + r.combineStage;
  n.combineLand = base + r.combineLand;
  n.sendIndex = base + r.sendIndex;
  n.destCount = base + r.destCount;
  n.dispatchSignal0 = c->gin.dispatch(slot, 0);
  n.combineSignal0 = c->gin.combine(slot, 0);
  return n;
}

static LlDispatchArgs dispatchArgs(ncclMoeComm* c, int slot, const void* x, const int64_t* topkIdx,
                                   const float* topkWeights, int T) {
  const ncclMoeConfig_t& cfg = c->cfg;
  LlDispatchArgs a;
  memset(&a, 0, sizeof(a));
  a.w = windowView(c);
  a.net = netArgs(c, slot);
  a.slotOff = c->layout.llSlots + (size_t)slot * c->layout.ll.bytes;
  a.slot = c->layout.ll;
  a.slotIndex = slot;
  a.x = (const uint16_t*)x;
  a.topkIdx = topkIdx;
  a.topkWeights = topkWeights;
  a.numTokens = T;
  a.hidden = cfg.hidden;
  a.topK = cfg.topK;
  a.numExperts = cfg.numExperts;
  a.maxTokens = cfg.maxTokensPerRank;
  a.fp8 = cfg.dispatchDtype == ncclMoeFp8E4m3;
  a.scaleFormat = cfg.fp8Scales;
  a.scaleBytes = a.fp8 ? (int)llScaleBytesPerRow(cfg) : 0;
  a.posCounter = c->llPosCounters + (size_t)slot * cfg.numExperts;
  a.failed = failedRanks(c);
  return a;
}

static LlCombineArgs combineArgs(ncclMoeComm* c, const ncclMoeLowLatencyOutput_t* d, const void* expertOut,
                                 void* out) {
  const ncclMoeConfig_t& cfg = c->cfg;
  LlCombineArgs a;
  memset(&a, 0, sizeof(a));
  a.w = windowView(c);
  a.net = netArgs(c, d->slot);
  a.slotOff = c->layout.llSlots + (size_t)d->slot * c->layout.ll.bytes;
  a.slot = c->layout.ll;
  a.slotIndex = d->slot;
  a.expertOut = (const uint16_t*)expertOut;
  a.out = (uint16_t*)out;
  a.numTokens = d->numTokens;
  a.hidden = cfg.hidden;
  a.topK = cfg.topK;
  a.numExperts = cfg.numExperts;
  a.maxTokens = cfg.maxTokensPerRank;
  a.failed = failedRanks(c);
  a.signalTotal = cfg.numSms;
  return a;
}

}  // namespace nccl_moe

using namespace nccl_moe;

extern "C" ncclResult_t ncclMoeGetWindowSize(const ncclMoeConfig_t* config, int nRanks, size_t* bytes) {
  clearError();
  if (bytes == nullptr) return setError(ncclInvalidArgument, "ncclMoeGetWindowSize: bytes is NULL");
  ncclMoeConfig_t resolved;
  // numSms is checked against the device at creation; any positive count passes here.
  MOE_CHECK(validateConfig(config, nRanks, INT_MAX, &resolved));
  WindowLayout layout;
  MOE_CHECK(computeWindowLayout(resolved, nRanks, &layout));
  *bytes = layout.total;
  return ncclSuccess;
}

extern "C" ncclResult_t ncclMoeLowLatencyDispatch(ncclMoeComm_t c, const void* x, const int64_t* topkIdx,
                                                  const float* topkWeights, int numTokens, unsigned int flags,
                                                  ncclMoeLowLatencyOutput_t* out, cudaStream_t stream) {
  clearError();
  const char* fn = "ncclMoeLowLatencyDispatch";
  MOE_CHECK(checkLowLatencyComm(c, fn));
  const ncclMoeConfig_t& cfg = c->cfg;
  if (out == nullptr) return setError(ncclInvalidArgument, "%s: out is NULL", fn);
  if (numTokens < 0 || numTokens > cfg.maxTokensPerRank)
    return setError(ncclInvalidArgument, "%s: numTokens = %d must be in 0..maxTokensPerRank = %d", fn, numTokens,
                    cfg.maxTokensPerRank);
  if (numTokens > 0 && x == nullptr) return setError(ncclInvalidArgument, "%s: x is NULL", fn);
  if (numTokens > 0 && topkIdx == nullptr) return setError(ncclInvalidArgument, "%s: topkIdx is NULL", fn);
  MOE_CHECK(checkDevicePointer(c->pointers, fn, "x", x, 16));
  MOE_CHECK(checkDevicePointer(c->pointers, fn, "topkIdx", topkIdx, alignof(int64_t)));
  MOE_CHECK(checkDevicePointer(c->pointers, fn, "topkWeights", topkWeights, alignof(float)));
  if (flags & ~(unsigned)NCCL_MOE_LL_SEND_ONLY)
    return setError(ncclInvalidArgument, "%s: flags = 0x%x has unknown bits", fn, flags);
  const int slot = (int)(c->llDispatches % cfg.numBufferSlots);
  if (c->llDispatchPending[slot] || c->llCombinePending[slot])
    return setError(ncclInvalidUsage,
                    "%s: buffer slot %d still has a send-only %s that was not completed; at most "
                    "numBufferSlots = %d operations may be in flight",
                    fn, slot, c->llDispatchPending[slot] ? "dispatch" : "combine", cfg.numBufferSlots);

  const LlDispatchArgs a = dispatchArgs(c, slot, x, topkIdx, topkWeights, numTokens);
  if (oneLaunch(c, c->llOneLaunch.dispatchTokens, numTokens, flags)) {
    MOE_CUDA(launchLlDispatchOneLaunch(a, cfg.numSms, stream));
  } else {
    // The send needs no more CTAs than tokens (each CTA takes whole tokens; its signal carries no
    // CTA count): a decode step of 1 token launches 1 CTA, not numSms that find nothing to do and
    // still pass the last-CTA chain's system-scope fences.
    MOE_CUDA(launchLlDispatchSend(a, std::max(1, std::min(cfg.numSms, numTokens)), stream));
    if (flags & NCCL_MOE_LL_SEND_ONLY) {
      c->llDispatchPending[slot] = true;
    } else {
      const cudaError_t err = launchLlDispatchComplete(a, cfg.numSms, stream);
      if (err != cudaSuccess) return failPartialLaunch(c, fn, err);
    }
  }
  // Host state advances only once every kernel of the call is enqueued.
  c->llDispatches++;
  c->llSlotSequence[slot] = c->llDispatches;
  c->llSlotTokens[slot] = numTokens;

  char* base = c->winBase + a.slotOff;
  const int L = cfg.numExperts / c->nRanks;
  out->x = base + c->layout.ll.recvX;
  out->xScales = a.fp8 ? base + c->layout.ll.recvScales : nullptr;
  out->srcToken = (int*)(base + c->layout.ll.srcToken);
  out->recvCountsPerSource = (int*)(base + c->layout.ll.recvCounts);
  out->expertCounts = out->recvCountsPerSource + L * c->nRanks;
  out->combineInput = base + c->layout.ll.combineInput;
  out->slot = slot;
  out->numTokens = numTokens;
  out->sequence = c->llDispatches;
  return ncclSuccess;
}

extern "C" ncclResult_t ncclMoeLowLatencyDispatchComplete(ncclMoeComm_t c, const ncclMoeLowLatencyOutput_t* out,
                                                          cudaStream_t stream) {
  clearError();
  const char* fn = "ncclMoeLowLatencyDispatchComplete";
  MOE_CHECK(checkLowLatencyComm(c, fn));
  MOE_CHECK(checkSlot(c, out, fn));
  if (!c->llDispatchPending[out->slot])
    return setError(ncclInvalidUsage, "%s: slot %d has no send-only dispatch to complete", fn, out->slot);
  MOE_CUDA(launchLlDispatchComplete(dispatchArgs(c, out->slot, nullptr, nullptr, nullptr, out->numTokens),
                                    c->cfg.numSms, stream));
  c->llDispatchPending[out->slot] = false;
  return ncclSuccess;
}

static ncclResult_t checkCombineArgs(ncclMoeComm* c, const ncclMoeLowLatencyOutput_t* d, void* out,
                                     const char* fn) {
  MOE_CHECK(checkSlot(c, d, fn));
  if (c->llDispatchPending[d->slot])
    return setError(ncclInvalidUsage, "%s: the dispatch of slot %d was not completed", fn, d->slot);
  if (d->numTokens > 0 && out == nullptr) return setError(ncclInvalidArgument, "%s: out is NULL", fn);
  MOE_CHECK(checkDevicePointer(c->pointers, fn, "out", out, 16));
  return ncclSuccess;
}

extern "C" ncclResult_t ncclMoeLowLatencyCombine(ncclMoeComm_t c, const ncclMoeLowLatencyOutput_t* dispatched,
                                                 const void* expertOut, void* out, unsigned int flags,
                                                 cudaStream_t stream) {
  clearError();
  const char* fn = "ncclMoeLowLatencyCombine";
  MOE_CHECK(checkLowLatencyComm(c, fn));
  MOE_CHECK(checkCombineArgs(c, dispatched, out, fn));
  if (expertOut == nullptr) return setError(ncclInvalidArgument, "%s: expertOut is NULL", fn);
  const char* in = (const char*)expertOut;
  if (in < c->winBase || in >= c->winBase + c->layout.total)  // the window is device memory
    MOE_CHECK(checkDevicePointer(c->pointers, fn, "expertOut", expertOut, 16));
  MOE_CHECK(checkAlignment(fn, "expertOut", expertOut, 16));
  if (flags & ~(unsigned)NCCL_MOE_LL_SEND_ONLY)
    return setError(ncclInvalidArgument, "%s: flags = 0x%x has unknown bits", fn, flags);
  if (c->llCombinePending[dispatched->slot])
    return setError(ncclInvalidUsage, "%s: slot %d already has a send-only combine in flight", fn, dispatched->slot);
  const LlCombineArgs a = combineArgs(c, dispatched, expertOut, out);
  if (oneLaunch(c, c->llOneLaunch.combineTokens, dispatched->numTokens, flags)) {
    MOE_CUDA(launchLlCombineOneLaunch(a, c->cfg.numSms, stream));
    return ncclSuccess;
  }
  MOE_CUDA(launchLlCombineSend(a, c->cfg.numSms, stream));
  if (flags & NCCL_MOE_LL_SEND_ONLY) {
    c->llCombinePending[dispatched->slot] = true;
    return ncclSuccess;
  }
  const cudaError_t err = launchLlCombineComplete(a, c->cfg.numSms, stream);
  if (err != cudaSuccess) return failPartialLaunch(c, fn, err);
  return ncclSuccess;
}

extern "C" ncclResult_t ncclMoeLowLatencyCombineComplete(ncclMoeComm_t c, const ncclMoeLowLatencyOutput_t* dispatched,
                                                         void* out, cudaStream_t stream) {
  clearError();
  const char* fn = "ncclMoeLowLatencyCombineComplete";
  MOE_CHECK(checkLowLatencyComm(c, fn));
  MOE_CHECK(checkCombineArgs(c, dispatched, out, fn));
  if (!c->llCombinePending[dispatched->slot])
    return setError(ncclInvalidUsage, "%s: slot %d has no send-only combine to complete", fn, dispatched->slot);
  const LlCombineArgs a = combineArgs(c, dispatched, nullptr, out);
  MOE_CUDA(launchLlCombineComplete(a, c->cfg.numSms, stream));
  c->llCombinePending[dispatched->slot] = false;
  return ncclSuccess;
}
