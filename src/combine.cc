// ncclMoeCombine: host side of the HT combine.
#include <string.h>
#include "comm.h"
#include "error.h"

using namespace nccl_moe;

extern "C" ncclResult_t ncclMoeCombine(ncclMoeComm_t c, ncclMoeHandle_t h, const void* expertOut,
                                       const float* topkWeights, void* out, cudaStream_t stream) {
  clearError();
  const char* fn = "ncclMoeCombine";
  MOE_CHECK(checkComm(c, fn));
  MOE_CHECK(checkHandle(h, fn));
  if (h->comm != c) return setError(ncclInvalidArgument, "ncclMoeCombine: handle belongs to another EP context");
  if (!h->haveRouting)
    return setError(ncclInvalidUsage, "ncclMoeCombine: handle holds no dispatch to reverse");
  // The window holds the rows of the latest dispatch only: an older handle's routing no longer
  // matches them.
  if (h->dispatch != c->htDispatches)
    return setError(ncclInvalidUsage,
                    "ncclMoeCombine: handle = %p belongs to dispatch %llu of the EP context, but dispatch %llu "
                    "was enqueued since; combine a handle before the next dispatch",
                    (const void*)h, h->dispatch, c->htDispatches);
  if (expertOut == nullptr) return setError(ncclInvalidArgument, "ncclMoeCombine: expertOut is NULL");
  if (out == nullptr && h->numTokens > 0) return setError(ncclInvalidArgument, "ncclMoeCombine: out is NULL");
  MOE_CHECK(checkDevicePointer(c->pointers, fn, "out", out, 16));  // rows are written as 16-byte vectors
  MOE_CHECK(checkDevicePointer(c->pointers, fn, "topkWeights", topkWeights, alignof(float)));
  if (c->cfg.mode != ncclMoeHighThroughput)
    return setError(ncclInvalidUsage, "%s: the EP context is in low-latency mode; use ncclMoeLowLatency*",
                    "ncclMoeCombine");
  MOE_CHECK(checkDeviceErrors(c));
  const ncclMoeConfig_t& cfg = c->cfg;
  const int rowBytes = nccl_moe::rowBytes(cfg, ncclMoeBf16);  // combine rows are BF16
  const char* begin = c->winBase;
  const char* end = c->winBase + c->layout.total;
  const char* in = (const char*)expertOut;
  size_t inOff = c->layout.combineIn;
  if (in >= begin && in < end) {
    inOff = (size_t)(in - begin);
    // Only the two documented in-window sources: out->combineInput, and out->x of a BF16 dispatch.
    const bool bf16X = cfg.dispatchDtype == ncclMoeBf16 && inOff == c->layout.recvX;
    if (inOff != c->layout.combineIn && !bf16X)
      return setError(ncclInvalidArgument,
                      "ncclMoeCombine: expertOut = %p lies in the EP window (offset %zu) but is neither "
                      "out->combineInput nor, for a BF16 dispatch, out->x",
                      expertOut, inOff);
  } else {
    MOE_CHECK(checkDevicePointer(c->pointers, fn, "expertOut", expertOut, 16));
    MOE_CUDA(launchCopyRows(c->winBase + c->layout.combineIn, in, h->routing.recvCounts, rowBytes,
                            cfg.numSms, stream));
  }
  CombineArgs a;
  memset(&a, 0, sizeof(a));
  a.w = windowView(c);
  a.routing = h->routing;
  a.inOff = inOff;
  a.topkWeights = topkWeights;
  a.out = (uint16_t*)out;
  a.numTokens = h->numTokens;
  a.hidden = cfg.hidden;
  a.topK = cfg.topK;
  a.numExperts = cfg.numExperts;
  MOE_CUDA(launchCombineHtIntranode(a, cfg.numSms, stream));
  return ncclSuccess;
}
