// ncclMoeCombine: host side of the HT combine.
#include <string.h>
#include "comm.h"
#include "error.h"

using namespace nccl_moe;

extern "C" ncclResult_t ncclMoeCombine(ncclMoeComm_t c, ncclMoeHandle_t h, const void* expertOut,
                                       const float* topkWeights, void* out, cudaStream_t stream) {
  clearError();
  if (c == nullptr) return setError(ncclInvalidArgument, "ncclMoeCombine: moeComm is NULL");
  if (h == nullptr) return setError(ncclInvalidArgument, "ncclMoeCombine: handle is NULL");
  if (h->comm != c) return setError(ncclInvalidArgument, "ncclMoeCombine: handle belongs to another EP context");
  if (!h->haveRouting)
    return setError(ncclInvalidUsage, "ncclMoeCombine: handle holds no dispatch to reverse");
  if (expertOut == nullptr) return setError(ncclInvalidArgument, "ncclMoeCombine: expertOut is NULL");
  if (out == nullptr && h->numTokens > 0) return setError(ncclInvalidArgument, "ncclMoeCombine: out is NULL");
  if ((uintptr_t)out % 16 != 0)  // rows are written as 16-byte vectors
    return setError(ncclInvalidArgument, "ncclMoeCombine: out = %p is not 16-byte aligned", out);
  if (c->cfg.mode != ncclMoeHighThroughput)
    return setError(ncclInvalidUsage, "%s: the EP context is in low-latency mode; use ncclMoeLowLatency*",
                    "ncclMoeCombine");
  MOE_CHECK(checkDeviceErrors(c));
  const ncclMoeConfig_t& cfg = c->cfg;
  const size_t rowBytes = (size_t)cfg.hidden * 2;
  const char* begin = c->winBase;
  const char* end = c->winBase + c->layout.total;
  const char* in = (const char*)expertOut;
  size_t inOff = c->layout.combineIn;
  if (in >= begin && in < end) {
    inOff = (size_t)(in - begin);
    if (inOff % 16 != 0 || inOff + (size_t)cfg.outputCapacity * rowBytes > c->layout.total)
      return setError(ncclInvalidArgument,
                      "ncclMoeCombine: expertOut = %p lies in the EP window at offset %zu but is not 16-byte "
                      "aligned or has no room for outputCapacity rows",
                      expertOut, inOff);
  } else {
    if ((uintptr_t)in % 16 != 0)
      return setError(ncclInvalidArgument, "ncclMoeCombine: expertOut = %p is not 16-byte aligned", expertOut);
    MOE_CUDA(launchCopyRows(c->winBase + c->layout.combineIn, in, h->routing.recvCounts, (int)rowBytes,
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
