// Configuration validation and the byte layout of the EP window. Pure host code with no CUDA
// calls, so that the CPU unit tests exercise every rule. The limits the kernels size arrays by
// (kMaxRanks, kMaxTopK, kFp8GroupSize) live in device/kernel_args.h, the layer below.
#pragma once
#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include "nccl_moe.h"
#include "device/kernel_args.h"

namespace nccl_moe {

constexpr int kMaxExperts = 8192;  // per-expert counters live in shared memory
constexpr int kDefaultTimeoutMs = 30000;
// Largest config.hidden: a row of it (2 bytes per element) stays far inside int, the type the
// kernels and the per-call arguments use for row bytes (DispatchArgs::rowBytes, launchCopyRows).
constexpr int kMaxHidden = 65536;
static_assert((long long)kMaxHidden * 2 <= INT_MAX, "row bytes of the largest hidden fit in int");

// Checks `cfg` for a communicator of `nRanks` ranks on a device with `deviceSms` SMs and
// returns in `resolved` a copy with defaults filled in (outputCapacity, timeoutMs).
// Every size that feeds window arithmetic is bounded: hidden <= kMaxHidden, maxTokensPerRank *
// nRanks <= 2^30 rows, outputCapacity <= nRanks * maxTokensPerRank (the most rows a rank can
// receive), and the window of the resolved config must be computable without overflow.
// On error: ncclInvalidArgument and a last-error message naming the field and its value.
ncclResult_t validateConfig(const ncclMoeConfig_t* cfg, int nRanks, int deviceSms,
                            ncclMoeConfig_t* resolved);

// Bytes of one element of `dtype`.
size_t dtypeBytes(ncclMoeDtype_t dtype);

// Bytes of one token row of `dtype` for a validated config: hidden * dtypeBytes, at most
// 2 * kMaxHidden (so it is positive and fits in int).
int rowBytes(const ncclMoeConfig_t& resolved, ncclMoeDtype_t dtype);

// Byte arithmetic of window layouts with overflow detection: every product and every region end
// goes through it, and `overflow` stays set once any of them wrapped around size_t.
struct CheckedBytes {
  bool overflow = false;
  size_t off = 0;  // end of the regions taken so far
  size_t mul(size_t a, size_t b) {
    size_t r;
    overflow |= __builtin_mul_overflow(a, b, &r);
    return r;
  }
  size_t alignedEnd(size_t v, size_t a) {
    size_t r;
    overflow |= __builtin_add_overflow(v, a - 1, &r);
    return r / a * a;
  }
  // Places a region of `bytes` at the current end, aligned to `a`; returns its offset.
  size_t take(size_t bytes, size_t a) {
    const size_t at = off;
    size_t end;
    overflow |= __builtin_add_overflow(off, bytes, &end);
    off = alignedEnd(end, a);
    return at;
  }
};

// Byte offsets inside each rank's symmetric window (same on every rank). Each region starts on
// a 256-byte boundary; `total` is rounded up to NCCL_WIN_REQUIRED_ALIGNMENT.
struct WindowLayout {
  size_t signals;   // uint64 [kSignalKinds][kMaxRanks]: monotonic counters written by peers
  size_t counts;    // int32 [R][R + E/R]: row s = tokens rank s sends to each rank, then to each
                    // of this rank's experts (written by rank s during a dispatch)
  size_t recvX;     // [capacity][H] elements of the largest dispatch dtype (BF16)
  size_t recvScales;// float [capacity][H/128] (FP8 only; present always, small)
  size_t recvTopkIdx;   // int64 [capacity][K]
  size_t recvTopkWeights; // float [capacity][K]
  size_t combineIn; // BF16 [capacity][H]
  // Low-latency mode only (the HT regions above are then empty): numBufferSlots slots of
  // ll.bytes each, starting at llSlots.
  size_t llSlots;
  LowLatencySlotLayout ll;
  size_t total;
};

// Bytes of one row of FP8 scales in the low-latency cast (0 for BF16).
size_t llScaleBytesPerRow(const ncclMoeConfig_t& resolved);

// Byte layout of the window of a resolved config on nRanks ranks. Every size is computed with
// overflow-checked arithmetic: on overflow, ncclInvalidArgument naming the config's sizes.
ncclResult_t computeWindowLayout(const ncclMoeConfig_t& resolved, int nRanks, WindowLayout* layout);

// Validates the arguments of one dispatch against the resolved config. `haveRouting` tells
// whether the handle already holds a routing (for topkIdx == NULL); `handleTokens` is its T.
// Alignment: x 16 bytes, xScales and topkWeights 4, topkIdx 8 (device accessibility is checked
// by the caller: pointer_check.h).
ncclResult_t validateDispatchArgs(const ncclMoeConfig_t& cfg, const void* x, const float* xScales,
                                  const int64_t* topkIdx, const float* topkWeights, int numTokens,
                                  unsigned int flags, bool haveRouting, int handleTokens);

// Low-latency one-launch form (one_launch_lsa.cu): a one-shot call of this rank's T tokens runs
// as one kernel instead of a send and a completion when T <= the context's limit for that
// operation. The limits are NCCL_MOE_LL_ONE_LAUNCH, read at ncclMoeCommCreate (per rank: the
// form does not change the protocol, so ranks need not agree): "D" (both operations) or "D,C"
// (dispatch, combine), decimal token counts, 0 = never; unset or empty: the defaults below. One
// CTA sends every token of the dispatch in this form and one CTA sums the combine's T tokens, so
// it pays off for small T only, the combine's sooner (2 x H200, FP8, perf/RESULTS.md seventh
// session: the dispatch gains up to 4 tokens, the combine at 1 token only). A/B runs set "0".
struct LlOneLaunchLimits {
  int dispatchTokens;
  int combineTokens;
};
constexpr LlOneLaunchLimits kLlOneLaunchDefaults = {4, 1};
// Parses `value` (NULL or "" = the defaults; counts above INT_MAX read as INT_MAX). On error:
// ncclInvalidArgument and a message naming the variable and the value.
ncclResult_t parseLlOneLaunchLimits(const char* value, LlOneLaunchLimits* limits);
// Whether a low-latency call of numTokens (this rank's T) runs in one launch: a one-shot call
// (not send-only), on one node (the GIN path keeps its two kernels), at most 32 ranks (one lane
// per rank in the combine's sums), limit > 0 (0: never) and numTokens <= limit.
inline bool llOneLaunchChosen(int limit, int numTokens, bool sendOnly, int nNodes, int nRanks) {
  return !sendOnly && nNodes <= 1 && nRanks <= 32 && limit > 0 && numTokens <= limit;
}

}  // namespace nccl_moe
