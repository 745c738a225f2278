// Configuration rules and window layout (see config.h).
#include "config.h"
#include "error.h"

namespace nccl_moe {

static size_t alignUp(size_t v, size_t a) { return (v + a - 1) / a * a; }

size_t dtypeBytes(ncclMoeDtype_t dtype) { return dtype == ncclMoeFp8E4m3 ? 1 : 2; }

ncclResult_t validateConfig(const ncclMoeConfig_t* cfg, int nRanks, int deviceSms,
                            ncclMoeConfig_t* resolved) {
  const ncclResult_t bad = ncclInvalidArgument;
  if (cfg == nullptr) return setError(bad, "config is NULL");
  if (cfg->size != sizeof(ncclMoeConfig_t))
    return setError(bad, "config.size = %zu, expected %zu (initialise with NCCL_MOE_CONFIG_INITIALIZER)",
                    cfg->size, sizeof(ncclMoeConfig_t));
  if (cfg->magic != NCCL_MOE_CONFIG_MAGIC)
    return setError(bad, "config.magic = 0x%x, expected 0x%x (initialise with NCCL_MOE_CONFIG_INITIALIZER)",
                    cfg->magic, NCCL_MOE_CONFIG_MAGIC);
  if (nRanks < 1 || nRanks > kMaxRanks)
    return setError(bad, "communicator has %d ranks; supported 1..%d", nRanks, kMaxRanks);
  if (cfg->mode != ncclMoeHighThroughput && cfg->mode != ncclMoeLowLatency)
    return setError(bad, "config.mode = %d is not an ncclMoeMode_t", (int)cfg->mode);
  if (cfg->dispatchDtype != ncclMoeBf16 && cfg->dispatchDtype != ncclMoeFp8E4m3)
    return setError(bad, "config.dispatchDtype = %d is not an ncclMoeDtype_t", (int)cfg->dispatchDtype);
  if (cfg->numExperts <= 0)
    return setError(bad, "config.numExperts = %d must be > 0", cfg->numExperts);
  if (cfg->numExperts % nRanks != 0)
    return setError(bad, "config.numExperts = %d is not divisible by the %d ranks", cfg->numExperts, nRanks);
  if (cfg->numExperts > kMaxExperts)
    return setError(bad, "config.numExperts = %d exceeds the supported %d", cfg->numExperts, kMaxExperts);
  if (cfg->hidden <= 0 || cfg->hidden % 8 != 0)
    return setError(bad, "config.hidden = %d must be a positive multiple of 8", cfg->hidden);
  if (cfg->dispatchDtype == ncclMoeFp8E4m3 && cfg->hidden % kFp8GroupSize != 0)
    return setError(bad, "config.hidden = %d must be a multiple of %d with FP8 dispatch",
                    cfg->hidden, kFp8GroupSize);
  if (cfg->topK < 1 || cfg->topK > kMaxTopK || cfg->topK > cfg->numExperts)
    return setError(bad, "config.topK = %d must be in 1..min(numExperts = %d, %d)", cfg->topK,
                    cfg->numExperts, kMaxTopK);
  if (cfg->maxTokensPerRank <= 0)
    return setError(bad, "config.maxTokensPerRank = %d must be > 0", cfg->maxTokensPerRank);
  if (cfg->numSms < 1 || cfg->numSms > deviceSms)
    return setError(bad, "config.numSms = %d must be in 1..%d (SMs of this device)", cfg->numSms, deviceSms);
  if (cfg->outputCapacity < 0)
    return setError(bad, "config.outputCapacity = %d must be >= 0 (0 = ranks * maxTokensPerRank)",
                    cfg->outputCapacity);
  if (cfg->timeoutMs < 0)
    return setError(bad, "config.timeoutMs = %d must be >= 0 (0 = %d ms)", cfg->timeoutMs, kDefaultTimeoutMs);
  if (cfg->numBufferSlots < 0 || cfg->numBufferSlots > kMaxBufferSlots)
    return setError(bad, "config.numBufferSlots = %d must be in 0..%d (0 = 2)", cfg->numBufferSlots,
                    kMaxBufferSlots);
  if (cfg->fp8Scales != ncclMoeScaleFp32 && cfg->fp8Scales != ncclMoeScaleFp32Pow2 &&
      cfg->fp8Scales != ncclMoeScaleUe8m0)
    return setError(bad, "config.fp8Scales = %d is not an ncclMoeScaleFormat_t", (int)cfg->fp8Scales);
  if (cfg->mode == ncclMoeLowLatency && cfg->fp8Scales == ncclMoeScaleUe8m0 &&
      (cfg->dispatchDtype != ncclMoeFp8E4m3 || cfg->hidden % (4 * kFp8GroupSize) != 0))
    return setError(bad, "config.fp8Scales = ncclMoeScaleUe8m0 needs FP8 dispatch and config.hidden = %d "
                    "a multiple of %d (four scales per int32)", cfg->hidden, 4 * kFp8GroupSize);
  long long worst = (long long)nRanks * cfg->maxTokensPerRank;
  if (worst > (1 << 30))
    return setError(bad, "config.maxTokensPerRank = %d times %d ranks exceeds 2^30 rows",
                    cfg->maxTokensPerRank, nRanks);
  *resolved = *cfg;
  if (resolved->outputCapacity == 0) resolved->outputCapacity = (int)worst;
  if (resolved->timeoutMs == 0) resolved->timeoutMs = kDefaultTimeoutMs;
  if (resolved->numBufferSlots == 0) resolved->numBufferSlots = 2;
  return ncclSuccess;
}

size_t llScaleBytesPerRow(const ncclMoeConfig_t& c) {
  if (c.dispatchDtype != ncclMoeFp8E4m3) return 0;
  const size_t groups = (size_t)c.hidden / kFp8GroupSize;
  return c.fp8Scales == ncclMoeScaleUe8m0 ? groups : groups * sizeof(float);  // 1 byte or 4 per group
}

static LowLatencySlotLayout lowLatencySlotLayout(const ncclMoeConfig_t& c, int nRanks) {
  const size_t L = c.numExperts / nRanks, M = c.maxTokensPerRank, B = (size_t)nRanks * M;
  const size_t H = c.hidden, K = c.topK;
  LowLatencySlotLayout s;
  size_t off = 0;
  auto take = [&](size_t bytes) { size_t at = off; off = alignUp(off + bytes, 256); return at; };
  s.dispatchSignals = take(sizeof(uint64_t) * nRanks);
  s.combineSignals = take(sizeof(uint64_t) * nRanks);
  s.recvCounts = take(sizeof(int) * (L * nRanks + L));
  s.route = take(sizeof(LlRouteEntry) * nRanks * M * K);
  s.tokenRanks = take(sizeof(uint32_t) * M);
  s.recvX = take(L * B * H * dtypeBytes(c.dispatchDtype));
  s.recvScales = take(L * B * llScaleBytesPerRow(c));
  s.srcToken = take(sizeof(int) * L * B);
  s.combineRecv = take(M * nRanks * H * 2);
  s.combineInput = take(L * B * H * 2);
  s.bytes = alignUp(off, NCCL_WIN_REQUIRED_ALIGNMENT);
  return s;
}

WindowLayout computeWindowLayout(const ncclMoeConfig_t& c, int nRanks) {
  const bool ll = c.mode == ncclMoeLowLatency;
  const size_t a = 256, cap = ll ? 0 : (size_t)c.outputCapacity, H = (size_t)c.hidden, K = (size_t)c.topK;
  WindowLayout w;
  size_t off = 0;
  auto take = [&](size_t bytes) { size_t at = off; off = alignUp(off + bytes, a); return at; };
  w.signals = take(sizeof(uint64_t) * kSignalKinds * kMaxRanks);
  w.counts = take(sizeof(int) * nRanks * (nRanks + c.numExperts / nRanks));
  w.recvX = take(cap * H * 2);
  w.recvScales = take(cap * (H / kFp8GroupSize) * sizeof(float));
  w.recvTopkIdx = take(cap * K * sizeof(int64_t));
  w.recvTopkWeights = take(cap * K * sizeof(float));
  w.combineIn = take(cap * H * 2);
  w.llSlots = alignUp(off, NCCL_WIN_REQUIRED_ALIGNMENT);
  w.ll = ll ? lowLatencySlotLayout(c, nRanks) : LowLatencySlotLayout{};
  w.total = w.llSlots + (ll ? (size_t)c.numBufferSlots * w.ll.bytes : 0);
  return w;
}

ncclResult_t validateDispatchArgs(const ncclMoeConfig_t& cfg, const void* x, const float* xScales,
                                  const int64_t* topkIdx, int numTokens, unsigned int flags,
                                  bool haveRouting, int handleTokens) {
  const ncclResult_t bad = ncclInvalidArgument;
  if (numTokens < 0 || numTokens > cfg.maxTokensPerRank)
    return setError(bad, "ncclMoeDispatch: numTokens = %d must be in 0..maxTokensPerRank = %d",
                    numTokens, cfg.maxTokensPerRank);
  if (x == nullptr && numTokens > 0) return setError(bad, "ncclMoeDispatch: x is NULL");
  if ((uintptr_t)x % 16 != 0)  // rows move as 16-byte vectors
    return setError(bad, "ncclMoeDispatch: x = %p is not 16-byte aligned", x);
  if (cfg.dispatchDtype == ncclMoeFp8E4m3 && xScales == nullptr && numTokens > 0)
    return setError(bad, "ncclMoeDispatch: xScales is NULL but config.dispatchDtype is FP8 e4m3");
  if (cfg.dispatchDtype == ncclMoeBf16 && xScales != nullptr)
    return setError(bad, "ncclMoeDispatch: xScales = %p given but config.dispatchDtype is BF16",
                    (const void*)xScales);
  if (flags & ~(unsigned)NCCL_MOE_DISPATCH_HOST_COUNTS)
    return setError(bad, "ncclMoeDispatch: flags = 0x%x has unknown bits", flags);
  // topkIdx == NULL reuses the handle's routing; with zero tokens there is nothing to route.
  if (topkIdx == nullptr && numTokens > 0 && !haveRouting)
    return setError(bad, "ncclMoeDispatch: topkIdx is NULL and the handle holds no routing to reuse");
  if (topkIdx == nullptr && haveRouting && numTokens != handleTokens)
    return setError(bad, "ncclMoeDispatch: numTokens = %d differs from the reused handle's %d tokens",
                    numTokens, handleTokens);
  return ncclSuccess;
}

}  // namespace nccl_moe
