// ncclMoeCombine and ncclMoeCombineWithWeights: host side of the HT combine.
#include <string.h>
#include "comm.h"
#include "error.h"

namespace nccl_moe {

// Where a combine input of `bytes` per row comes from: `regionOff` when the caller's pointer is
// the window's own region for it (zero-copy), else a copy into that region. Sets *inWindow.
// An in-window pointer other than the allowed offsets is refused (ncclInvalidArgument), and so
// is an in-window source for a handle whose dispatch is no longer the latest (its rows were
// overwritten: ncclInvalidUsage).
// `allowed` names the dispatch outputs at regionOff / altOff for the error message.
static ncclResult_t locateInput(const ncclMoeComm* c, const ncclMoeHandle* h, const char* fn, const char* name,
                                const void* p, size_t regionOff, size_t altOff, const char* allowed, bool* inWindow,
                                size_t* off) {
  const char* begin = c->winBase;
  const char* end = c->winBase + c->layout.total;
  const char* in = (const char*)p;
  *inWindow = in >= begin && in < end;
  *off = regionOff;
  if (!*inWindow) return ncclSuccess;
  *off = (size_t)(in - begin);
  if (*off != regionOff && *off != altOff)
    return setError(ncclInvalidArgument,
                    "%s: %s = %p lies in the EP window (offset %zu) but is not the dispatch output meant for "
                    "it (%s)",
                    fn, name, p, *off, allowed);
  if (h->dispatch != c->htDispatches)
    return setError(ncclInvalidUsage,
                    "%s: %s = %p is in the EP window, which holds dispatch %llu, but handle = %p belongs to dispatch "
                    "%llu; an older handle's combine takes its inputs from memory outside the window",
                    fn, name, p, c->htDispatches, (const void*)h, h->dispatch);
  return ncclSuccess;
}

// Both entry points. recvTopkWeights / outTopkWeights are NULL for ncclMoeCombine.
static ncclResult_t combine(ncclMoeComm* c, ncclMoeHandle* h, const void* expertOut, const float* topkWeights,
                            const float* recvTopkWeights, float* outTopkWeights, void* out, cudaStream_t stream,
                            const char* fn) {
  MOE_CHECK(checkComm(c, fn));
  MOE_CHECK(checkHandle(h, fn));
  if (h->comm != c) return setError(ncclInvalidArgument, "%s: handle belongs to another EP context", fn);
  if (!h->haveRouting) return setError(ncclInvalidUsage, "%s: handle holds no dispatch to reverse", fn);
  if (expertOut == nullptr) return setError(ncclInvalidArgument, "%s: expertOut is NULL", fn);
  if (out == nullptr && h->numTokens > 0) return setError(ncclInvalidArgument, "%s: out is NULL", fn);
  const bool values = outTopkWeights != nullptr || recvTopkWeights != nullptr;
  if (values && recvTopkWeights == nullptr) return setError(ncclInvalidArgument, "%s: recvTopkWeights is NULL", fn);
  if (values && outTopkWeights == nullptr && h->numTokens > 0)
    return setError(ncclInvalidArgument, "%s: outTopkWeights is NULL", fn);
  if (c->cfg.mode != ncclMoeHighThroughput)
    return setError(ncclInvalidUsage, "%s: the EP context is in low-latency mode; use ncclMoeLowLatency*", fn);
  MOE_CHECK(checkDeviceErrors(c));
  const ncclMoeConfig_t& cfg = c->cfg;
  // Only the documented in-window sources: out->combineInput and, for a BF16 dispatch, out->x;
  // out->topkWeights for the per-row values.
  const size_t bf16X = cfg.dispatchDtype == ncclMoeBf16 ? c->layout.recvX : c->layout.combineIn;
  bool inWindow = false, valuesInWindow = true;
  size_t inOff = 0, valuesOff = c->layout.recvTopkWeights;
  MOE_CHECK(locateInput(c, h, fn, "expertOut", expertOut, c->layout.combineIn, bf16X,
                        cfg.dispatchDtype == ncclMoeBf16 ? "out->combineInput or out->x" : "out->combineInput",
                        &inWindow, &inOff));
  if (values)
    MOE_CHECK(locateInput(c, h, fn, "recvTopkWeights", recvTopkWeights, c->layout.recvTopkWeights,
                          c->layout.recvTopkWeights, "out->topkWeights", &valuesInWindow, &valuesOff));
  MOE_CHECK(checkDevicePointer(c->pointers, fn, "out", out, 16));  // rows are written as 16-byte vectors
  MOE_CHECK(checkDevicePointer(c->pointers, fn, "topkWeights", topkWeights, alignof(float)));
  MOE_CHECK(checkDevicePointer(c->pointers, fn, "outTopkWeights", outTopkWeights, alignof(float)));
  if (!inWindow) MOE_CHECK(checkDevicePointer(c->pointers, fn, "expertOut", expertOut, 16));
  if (!valuesInWindow)
    MOE_CHECK(checkDevicePointer(c->pointers, fn, "recvTopkWeights", recvTopkWeights, alignof(float)));
  // Inputs from outside the window are copied into it first (the rows of this handle's dispatch,
  // by its device count); the peers read the per-row values at the same offset on every rank.
  if (!inWindow)
    MOE_CUDA(launchCopyRows(c->winBase + c->layout.combineIn, expertOut, h->routing.recvCounts,
                            rowBytes(cfg, ncclMoeBf16), cfg.numSms, stream));
  if (!valuesInWindow)
    MOE_CUDA(launchCopyTopkRows((float*)(c->winBase + c->layout.recvTopkWeights), recvTopkWeights,
                                h->routing.recvCounts, cfg.topK, cfg.numSms, stream));
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
  a.recvWeightsOff = valuesOff;
  a.outTopkWeights = values ? outTopkWeights : nullptr;
  // Several nodes: the internode kernel. One node: the bulk-copy kernel when chosen at creation;
  // ncclMoeCombineWithWeights always pulls.
  if (c->nodes.nNodes > 1) {
    CombineNetArgs na;
    na.c = a;
    na.net = htNetArgs(c);
    na.withValues = values ? 1 : 0;
    na.net.partialBytes = values ? (int)c->htNet.partialRow : cfg.hidden * 2;
    MOE_CUDA(launchCombineHtNet(na, cfg.numSms, stream));
  } else if (c->htCombineTma && !values)
    MOE_CUDA(launchCombineHtTma(a, cfg.numSms, stream));
  else
    MOE_CUDA(launchCombineHtIntranode(a, cfg.numSms, stream));
  return ncclSuccess;
}

}  // namespace nccl_moe

using namespace nccl_moe;

extern "C" ncclResult_t ncclMoeCombine(ncclMoeComm_t c, ncclMoeHandle_t h, const void* expertOut,
                                       const float* topkWeights, void* out, cudaStream_t stream) {
  clearError();
  return combine(c, h, expertOut, topkWeights, nullptr, nullptr, out, stream, "ncclMoeCombine");
}

extern "C" ncclResult_t ncclMoeCombineWithWeights(ncclMoeComm_t c, ncclMoeHandle_t h, const void* expertOut,
                                                  const float* topkWeights, const float* recvTopkWeights,
                                                  float* outTopkWeights, void* out, cudaStream_t stream) {
  clearError();
  return combine(c, h, expertOut, topkWeights, recvTopkWeights, outTopkWeights, out, stream,
                 "ncclMoeCombineWithWeights");
}
