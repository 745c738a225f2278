// Configuration rules and window layout (see config.h).
#include "config.h"
#include "error.h"
#include "pointer_check.h"

namespace nccl_moe {

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
  // Same major, and not newer than this library (it would not know what the caller's fields
  // mean); older minors of the same major are accepted (sizes already match).
  if (cfg->version / 10000 != NCCL_MOE_MAJOR || cfg->version > NCCL_MOE_VERSION_CODE)
    return setError(bad, "config.version = %u is not supported by this library (version %d, major %d); "
                    "rebuild against this library's nccl_moe.h", cfg->version, NCCL_MOE_VERSION_CODE,
                    NCCL_MOE_MAJOR);
  if (nRanks < 1 || nRanks > kMaxRanks)
    return setError(bad, "communicator has %d ranks; supported 1..%d", nRanks, kMaxRanks);
  if (cfg->mode != ncclMoeHighThroughput && cfg->mode != ncclMoeLowLatency)
    return setError(bad, "config.mode = %d is not an ncclMoeMode_t", (int)cfg->mode);
  if (cfg->mode == ncclMoeHighThroughput && nRanks > kMaxHtRanks)
    return setError(bad, "config.mode = ncclMoeHighThroughput supports 1..%d ranks (one warp lane per peer); "
                    "the communicator has %d: use ncclMoeLowLatency (up to %d ranks)", kMaxHtRanks, nRanks,
                    kMaxRanks);
  if (cfg->dispatchDtype != ncclMoeBf16 && cfg->dispatchDtype != ncclMoeFp8E4m3)
    return setError(bad, "config.dispatchDtype = %d is not an ncclMoeDtype_t", (int)cfg->dispatchDtype);
  if (cfg->numExperts <= 0)
    return setError(bad, "config.numExperts = %d must be > 0", cfg->numExperts);
  if (cfg->numExperts % nRanks != 0)
    return setError(bad, "config.numExperts = %d is not divisible by the %d ranks", cfg->numExperts, nRanks);
  if (cfg->numExperts > kMaxExperts)
    return setError(bad, "config.numExperts = %d exceeds the supported %d", cfg->numExperts, kMaxExperts);
  if (cfg->hidden <= 0 || cfg->hidden % 8 != 0 || cfg->hidden > kMaxHidden)
    return setError(bad, "config.hidden = %d must be a positive multiple of 8, at most %d", cfg->hidden,
                    kMaxHidden);
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
  if (cfg->outputCapacity > worst)
    return setError(bad, "config.outputCapacity = %d exceeds %lld = %d ranks * maxTokensPerRank, the most rows "
                    "a rank can receive", cfg->outputCapacity, worst, nRanks);
  ncclMoeConfig_t r = *cfg;
  if (r.outputCapacity == 0) r.outputCapacity = (int)worst;
  if (r.timeoutMs == 0) r.timeoutMs = kDefaultTimeoutMs;
  if (r.numBufferSlots == 0) r.numBufferSlots = 2;
  WindowLayout layout;
  MOE_CHECK(computeWindowLayout(r, nRanks, &layout));
  *resolved = r;
  return ncclSuccess;
}

int rowBytes(const ncclMoeConfig_t& c, ncclMoeDtype_t dtype) { return c.hidden * (int)dtypeBytes(dtype); }

size_t llScaleBytesPerRow(const ncclMoeConfig_t& c) {
  if (c.dispatchDtype != ncclMoeFp8E4m3) return 0;
  const size_t groups = (size_t)c.hidden / kFp8GroupSize;
  return c.fp8Scales == ncclMoeScaleUe8m0 ? groups : groups * sizeof(float);  // 1 byte or 4 per group
}

static LowLatencySlotLayout lowLatencySlotLayout(const ncclMoeConfig_t& c, int nRanks, CheckedBytes& m) {
  const size_t L = c.numExperts / nRanks, M = c.maxTokensPerRank, R = nRanks, B = m.mul(R, M);
  const size_t H = c.hidden, K = c.topK, LB = m.mul(L, B);
  LowLatencySlotLayout s;
  CheckedBytes slot;
  s.dispatchSignals = slot.take(sizeof(uint64_t) * R, 256);
  s.combineSignals = slot.take(sizeof(uint64_t) * R, 256);
  s.recvCounts = slot.take(sizeof(int) * (L * R + L), 256);
  s.route = slot.take(m.mul(m.mul(sizeof(LlRouteEntry) * R, M), K), 256);
  s.tokenRanks = slot.take(m.mul(sizeof(uint32_t) * rankMaskWords(nRanks), M), 256);
  s.recvX = slot.take(m.mul(m.mul(LB, H), dtypeBytes(c.dispatchDtype)), 256);
  s.recvScales = slot.take(m.mul(LB, llScaleBytesPerRow(c)), 256);
  s.srcToken = slot.take(m.mul(sizeof(int), LB), 256);
  s.combineRecv = slot.take(m.mul(m.mul(B, H), 2), 256);
  s.combineInput = slot.take(m.mul(m.mul(LB, H), 2), 256);
  s.bytes = slot.alignedEnd(slot.off, NCCL_WIN_REQUIRED_ALIGNMENT);
  m.overflow |= slot.overflow;
  return s;
}

ncclResult_t computeWindowLayout(const ncclMoeConfig_t& c, int nRanks, WindowLayout* layout) {
  const bool ll = c.mode == ncclMoeLowLatency;
  const size_t a = 256, cap = ll ? 0 : (size_t)c.outputCapacity, H = (size_t)c.hidden, K = (size_t)c.topK;
  WindowLayout w;
  CheckedBytes m;
  w.signals = m.take(sizeof(uint64_t) * kSignalKinds * kMaxRanks, a);
  w.counts = m.take(sizeof(int) * nRanks * (nRanks + c.numExperts / nRanks), a);
  w.recvX = m.take(m.mul(m.mul(cap, H), 2), a);
  w.recvScales = m.take(m.mul(cap, (H / kFp8GroupSize) * sizeof(float)), a);
  w.recvTopkIdx = m.take(m.mul(cap, K * sizeof(int64_t)), a);
  w.recvTopkWeights = m.take(m.mul(cap, K * sizeof(float)), a);
  w.combineIn = m.take(m.mul(m.mul(cap, H), 2), a);
  w.llSlots = m.alignedEnd(m.off, NCCL_WIN_REQUIRED_ALIGNMENT);
  w.ll = ll ? lowLatencySlotLayout(c, nRanks, m) : LowLatencySlotLayout{};
  size_t slots = ll ? m.mul((size_t)c.numBufferSlots, w.ll.bytes) : 0;
  m.overflow |= __builtin_add_overflow(w.llSlots, slots, &w.total);
  if (m.overflow)
    return setError(ncclInvalidArgument,
                    "the EP window of config.hidden = %d, maxTokensPerRank = %d, numExperts = %d, "
                    "outputCapacity = %d, numBufferSlots = %d on %d ranks exceeds the address space",
                    c.hidden, c.maxTokensPerRank, c.numExperts, c.outputCapacity, c.numBufferSlots, nRanks);
  *layout = w;
  return ncclSuccess;
}

ncclResult_t validateDispatchArgs(const ncclMoeConfig_t& cfg, const void* x, const float* xScales,
                                  const int64_t* topkIdx, const float* topkWeights, int numTokens,
                                  unsigned int flags, bool haveRouting, int handleTokens) {
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
  MOE_CHECK(checkAlignment("ncclMoeDispatch", "xScales", xScales, alignof(float)));
  MOE_CHECK(checkAlignment("ncclMoeDispatch", "topkIdx", topkIdx, alignof(int64_t)));
  MOE_CHECK(checkAlignment("ncclMoeDispatch", "topkWeights", topkWeights, alignof(float)));
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

// One decimal count at *p (saturating at INT_MAX); advances *p past it. False when no digit.
static bool parseTokenCount(const char** p, int* tokens) {
  const char* start = *p;
  unsigned long long n = 0;
  for (; **p >= '0' && **p <= '9'; ++*p) n = n > (unsigned long long)INT_MAX ? n : n * 10 + (unsigned)(**p - '0');
  *tokens = n > (unsigned long long)INT_MAX ? INT_MAX : (int)n;
  return *p != start;
}

ncclResult_t parseLlOneLaunchLimits(const char* value, LlOneLaunchLimits* limits) {
  *limits = kLlOneLaunchDefaults;
  if (value == nullptr || value[0] == '\0') return ncclSuccess;
  LlOneLaunchLimits parsed;
  const char* p = value;
  bool ok = parseTokenCount(&p, &parsed.dispatchTokens);
  parsed.combineTokens = parsed.dispatchTokens;
  if (ok && *p == ',') {
    ++p;
    ok = parseTokenCount(&p, &parsed.combineTokens);
  }
  if (!ok || *p != '\0')
    return setError(ncclInvalidArgument, "NCCL_MOE_LL_ONE_LAUNCH = \"%s\" must be a token count or two "
                    "(\"D\" or \"D,C\": dispatch, combine; decimal, >= 0; 0 = never one launch)", value);
  *limits = parsed;
  return ncclSuccess;
}

}  // namespace nccl_moe
