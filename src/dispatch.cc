// ncclMoeDispatch, ncclMoeGetLayout / ncclMoeGetLayoutNodes / ncclMoeCommNodeCount and handle lifetime.
#include <limits.h>
#include <string.h>
#include <atomic>
#include <chrono>
#include "comm.h"
#include "error.h"

namespace nccl_moe {

static size_t align256(size_t v) { return (v + 255) / 256 * 256; }

// Allocates a handle's routing arrays sized for maxTokensPerRank, zeroed in stream order on
// `stream` (not graph-capturable). Stream-ordered memory (cudaMallocAsync) where the device has
// memory pools, so that ncclMoeHandleRelease can free it without synchronising.
static ncclResult_t createHandle(ncclMoeComm* c, cudaStream_t stream, ncclMoeHandle** out) {
  const size_t T = c->cfg.maxTokensPerRank, R = c->nRanks, E = c->cfg.numExperts, K = c->cfg.topK;
  // Several nodes also: nodeSlot, nodeList, tokensPerNode, netRows, netRecords (RoutingView).
  const size_t N = c->nodes.nNodes > 1 ? c->nodes.nNodes : 0, G = c->nodes.gpusPerNode;
  const size_t sizes[] = {T * R * sizeof(int), T * K * sizeof(int64_t), R * sizeof(int),
                          E * sizeof(int), R * sizeof(int), (1 + E / R) * sizeof(int), sizeof(int),
                          T * N * sizeof(int), N * T * sizeof(int), N * sizeof(int), N * T * G * sizeof(int),
                          N * sizeof(int)};
  size_t total = 0;
  for (size_t s : sizes) total += align256(s);
  int pools = 0;
  MOE_CUDA(cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, c->device));
  ncclMoeHandle* h = new ncclMoeHandle();
  h->comm = c;
  h->streamOrdered = pools != 0;
  const bool ok = h->streamOrdered ? cudaMallocAsync(&h->deviceBlock, total, stream) == cudaSuccess &&
                                         cudaMemsetAsync(h->deviceBlock, 0, total, stream) == cudaSuccess
                                   : cudaMalloc(&h->deviceBlock, total) == cudaSuccess &&
                                         cudaMemset(h->deviceBlock, 0, total) == cudaSuccess;
  if (!ok) {
    if (h->deviceBlock) h->streamOrdered ? cudaFreeAsync(h->deviceBlock, stream) : cudaFree(h->deviceBlock);
    delete h;
    return setError(ncclUnhandledCudaError, "ncclMoeDispatch: allocating a handle (%zu bytes) failed", total);
  }
  h->hostCounts = new int[1 + E / R];
  char* p = (char*)h->deviceBlock;
  auto take = [&](size_t bytes) { char* at = p; p += align256(bytes); return at; };
  h->routing.sendPos = (int*)take(sizes[0]);
  h->routing.topkIdx = (int64_t*)take(sizes[1]);
  h->routing.tokensPerRank = (int*)take(sizes[2]);
  h->routing.tokensPerExpert = (int*)take(sizes[3]);
  h->routing.sendOffset = (int*)take(sizes[4]);
  h->routing.recvCounts = (int*)take(sizes[5]);
  h->routing.dispatchEmpty = (int*)take(sizes[6]);
  if (N > 0) {
    h->routing.nodeSlot = (int*)take(sizes[7]);
    h->routing.nodeList = (int*)take(sizes[8]);
    h->routing.tokensPerNode = (int*)take(sizes[9]);
    h->routing.netRows = (int*)take(sizes[10]);
    h->routing.netRecords = (int*)take(sizes[11]);
  }
  c->liveHandles++;
  h->magic = kHandleMagic;
  registerObject(h, ObjectKind::Handle);
  *out = h;
  return ncclSuccess;
}

// What destroy and release share once the device memory is taken care of: the host counts, the
// context's count and the registry (the struct goes to quarantine, so a stale pointer to it is
// recognised as dead; object_registry.h).
// Waits until the dispatch kernel enqueued last on `stream` has published its counts
// (countsHost[0] == countsSeq; the kernel publishes on every path, zeros after a recorded timeout
// or overflow), then copies n of them to out. The rows may still be moving: only the counts are
// waited for. Should the stream end without them (a kernel that did not run) or fail, that is an
// error, not a hang: the stream is queried every ~50 us while the host spins.
static ncclResult_t waitHostCounts(ncclMoeComm* c, cudaStream_t stream, int* out, int n) {
  const volatile int* published = c->countsHost;
  auto queried = std::chrono::steady_clock::now();
  while (*published != c->countsSeq) {
    const auto now = std::chrono::steady_clock::now();
    if (now - queried < std::chrono::microseconds(50)) continue;
    queried = now;
    const cudaError_t q = cudaStreamQuery(stream);
    if (q == cudaErrorNotReady) continue;
    MOE_CUDA(q);
    if (*published == c->countsSeq) break;
    return setError(ncclInternalError, "ncclMoeDispatch: stream finished without the dispatch kernel's counts "
                    "(rank %d): the kernel did not run", c->rank);
  }
  std::atomic_thread_fence(std::memory_order_acquire);
  for (int i = 0; i < n; i++) out[i] = ((const volatile int*)c->countsHost)[1 + i];
  return ncclSuccess;
}

static void retireHandle(ncclMoeHandle* h) {
  delete[] h->hostCounts;
  h->hostCounts = nullptr;
  h->comm->liveHandles--;  // a context outlives its handles (ncclMoeCommDestroy refuses otherwise)
  h->magic = kDeadMagic;
  retireObject(h, ObjectKind::Handle, [](void* p) { delete static_cast<ncclMoeHandle*>(p); });
}

// ncclMoeGetLayout and ncclMoeGetLayoutNodes (`fn` names the one called): every check that needs
// no CUDA call first (arguments, NULL rules, alignment), then device accessibility, then one launch.
static ncclResult_t getLayout(const char* fn, ncclMoeComm* c, const int64_t* topkIdx, int numTokens,
                              int* tokensPerRank, int* tokensPerExpert, uint8_t* isTokenInRank,
                              int* tokensPerNode, uint8_t* isTokenInNode, cudaStream_t stream) {
  MOE_CHECK(checkComm(c, fn));
  MOE_CHECK(checkDeviceErrors(c));
  if (numTokens < 0 || numTokens > c->cfg.maxTokensPerRank)
    return setError(ncclInvalidArgument, "%s: numTokens = %d must be in 0..maxTokensPerRank = %d", fn, numTokens,
                    c->cfg.maxTokensPerRank);
  if (topkIdx == nullptr && numTokens > 0) return setError(ncclInvalidArgument, "%s: topkIdx is NULL", fn);
  if (tokensPerRank == nullptr) return setError(ncclInvalidArgument, "%s: tokensPerRank is NULL", fn);
  if (tokensPerExpert == nullptr) return setError(ncclInvalidArgument, "%s: tokensPerExpert is NULL", fn);
  if (c->nRanks > kMaxHtRanks)  // the layout kernel keeps a token's ranks and nodes in 64 bits
    return setError(ncclInvalidUsage, "%s: supported on 1..%d ranks; the EP context has %d", fn, kMaxHtRanks,
                    c->nRanks);
  MOE_CHECK(checkAlignment(fn, "topkIdx", topkIdx, alignof(int64_t)));
  MOE_CHECK(checkAlignment(fn, "tokensPerRank", tokensPerRank, alignof(int)));
  MOE_CHECK(checkAlignment(fn, "tokensPerExpert", tokensPerExpert, alignof(int)));
  MOE_CHECK(checkAlignment(fn, "tokensPerNode", tokensPerNode, alignof(int)));
  MOE_CHECK(c->pointers.check(fn, "topkIdx", topkIdx));
  MOE_CHECK(c->pointers.check(fn, "tokensPerRank", tokensPerRank));
  MOE_CHECK(c->pointers.check(fn, "tokensPerExpert", tokensPerExpert));
  MOE_CHECK(c->pointers.check(fn, "isTokenInRank", isTokenInRank));
  MOE_CHECK(c->pointers.check(fn, "tokensPerNode", tokensPerNode));
  MOE_CHECK(c->pointers.check(fn, "isTokenInNode", isTokenInNode));
  LayoutArgs a;
  memset(&a, 0, sizeof(a));
  a.topkIdx = topkIdx;
  a.numTokens = numTokens;
  a.topK = c->cfg.topK;
  a.numExperts = c->cfg.numExperts;
  a.nRanks = c->nRanks;
  a.ranksPerNode = c->nodes.gpusPerNode;
  a.tokensPerRank = tokensPerRank;
  a.tokensPerExpert = tokensPerExpert;
  a.isTokenInRank = isTokenInRank;
  a.tokensPerNode = tokensPerNode;
  a.isTokenInNode = isTokenInNode;
  a.error = c->errorDev + kErrorLocal;  // bad ids: local, non-fatal
  a.state = c->state;
  a.scratch = c->layoutScratch;
  MOE_CUDA(launchLayout(a, stream));
  return ncclSuccess;
}

}  // namespace nccl_moe

using namespace nccl_moe;

extern "C" ncclResult_t ncclMoeGetLayout(ncclMoeComm_t c, const int64_t* topkIdx, int numTokens,
                                         int* tokensPerRank, int* tokensPerExpert,
                                         uint8_t* isTokenInRank, cudaStream_t stream) {
  clearError();
  return getLayout("ncclMoeGetLayout", c, topkIdx, numTokens, tokensPerRank, tokensPerExpert, isTokenInRank,
                   nullptr, nullptr, stream);
}

extern "C" ncclResult_t ncclMoeCommNodeCount(ncclMoeComm_t c, int* nNodes) {
  clearError();
  MOE_CHECK(checkComm(c, "ncclMoeCommNodeCount"));
  if (nNodes == nullptr) return setError(ncclInvalidArgument, "ncclMoeCommNodeCount: nNodes is NULL");
  *nNodes = c->nodes.nNodes;
  return ncclSuccess;
}

extern "C" ncclResult_t ncclMoeGetLayoutNodes(ncclMoeComm_t c, const int64_t* topkIdx, int numTokens,
                                              int* tokensPerRank, int* tokensPerExpert,
                                              uint8_t* isTokenInRank, int* tokensPerNode,
                                              uint8_t* isTokenInNode, cudaStream_t stream) {
  clearError();
  return getLayout("ncclMoeGetLayoutNodes", c, topkIdx, numTokens, tokensPerRank, tokensPerExpert,
                   isTokenInRank, tokensPerNode, isTokenInNode, stream);
}

extern "C" ncclResult_t ncclMoeDispatch(ncclMoeComm_t c, const void* x, const float* xScales,
                                        const int64_t* topkIdx, const float* topkWeights, int numTokens,
                                        unsigned int flags, ncclMoeHandle_t* handle,
                                        ncclMoeDispatchOutput_t* out, cudaStream_t stream) {
  clearError();
  const char* fn = "ncclMoeDispatch";
  MOE_CHECK(checkComm(c, fn));
  if (handle == nullptr) return setError(ncclInvalidArgument, "ncclMoeDispatch: handle is NULL");
  if (out == nullptr) return setError(ncclInvalidArgument, "ncclMoeDispatch: out is NULL");
  if (c->cfg.mode != ncclMoeHighThroughput)
    return setError(ncclInvalidUsage, "%s: the EP context is in low-latency mode; use ncclMoeLowLatency*",
                    "ncclMoeDispatch");
  MOE_CHECK(checkDeviceErrors(c));
  ncclMoeHandle* h = *handle;
  if (h != nullptr) MOE_CHECK(checkHandle(h, "ncclMoeDispatch (*handle)"));
  if (h != nullptr && h->comm != c)
    return setError(ncclInvalidArgument, "ncclMoeDispatch: *handle belongs to another EP context");
  const bool haveRouting = h != nullptr && h->haveRouting;
  MOE_CHECK(validateDispatchArgs(c->cfg, x, xScales, topkIdx, topkWeights, numTokens, flags, haveRouting,
                                 haveRouting ? h->numTokens : 0));
  MOE_CHECK(c->pointers.check(fn, "x", x));
  MOE_CHECK(c->pointers.check(fn, "xScales", xScales));
  MOE_CHECK(c->pointers.check(fn, "topkIdx", topkIdx));
  MOE_CHECK(c->pointers.check(fn, "topkWeights", topkWeights));
  if (flags & NCCL_MOE_DISPATCH_HOST_COUNTS) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    MOE_CUDA(cudaStreamIsCapturing(stream, &capture));
    if (capture != cudaStreamCaptureStatusNone)
      return setError(ncclInvalidUsage, "ncclMoeDispatch: flags has NCCL_MOE_DISPATCH_HOST_COUNTS, which waits on the "
                      "host, while stream is being captured into a CUDA graph: leave the flag out there");
  }
  if (h == nullptr) {
    MOE_CHECK(createHandle(c, stream, &h));
    *handle = h;
  }
  const ncclMoeConfig_t& cfg = c->cfg;
  const bool newRouting = topkIdx != nullptr || !h->haveRouting;
  if (newRouting) {
    LayoutArgs la;
    memset(&la, 0, sizeof(la));
    la.topkIdx = topkIdx;
    la.numTokens = numTokens;
    la.topK = cfg.topK;
    la.numExperts = cfg.numExperts;
    la.nRanks = c->nRanks;
    la.ranksPerNode = c->nodes.gpusPerNode;
    la.sendPos = h->routing.sendPos;
    la.topkIdxCopy = h->routing.topkIdx;
    la.tokensPerRank = h->routing.tokensPerRank;
    la.tokensPerExpert = h->routing.tokensPerExpert;
    la.tokensPerNode = h->routing.tokensPerNode;  // NULL on one node, as the two below
    la.nodeSlot = h->routing.nodeSlot;
    la.nodeList = h->routing.nodeList;
    la.maxTokens = cfg.maxTokensPerRank;
    la.error = c->errorDev + kErrorLocal;  // bad ids: local, non-fatal
    la.state = c->state;
    la.scratch = c->layoutScratch;
    MOE_CUDA(launchLayout(la, stream));
    h->haveRouting = false;  // its arrays are being rewritten: valid once the dispatch is enqueued
  }

  DispatchArgs a;
  memset(&a, 0, sizeof(a));
  a.w = windowView(c);
  a.routing = h->routing;
  a.x = x;
  a.xScales = xScales;
  a.topkWeights = topkWeights;
  a.numTokens = numTokens;
  a.hidden = cfg.hidden;
  a.topK = cfg.topK;
  a.numExperts = cfg.numExperts;
  a.capacity = cfg.outputCapacity;
  a.rowBytes = rowBytes(cfg, cfg.dispatchDtype);
  a.scaleCols = cfg.dispatchDtype == ncclMoeFp8E4m3 ? cfg.hidden / kFp8GroupSize : 0;
  a.recvXOff = c->layout.recvX;
  a.recvScalesOff = c->layout.recvScales;
  a.recvTopkIdxOff = c->layout.recvTopkIdx;
  a.recvTopkWeightsOff = c->layout.recvTopkWeights;
  const bool hostCounts = (flags & NCCL_MOE_DISPATCH_HOST_COUNTS) != 0;
  if (hostCounts) {
    c->countsSeq = c->countsSeq == INT_MAX ? 1 : c->countsSeq + 1;  // never 0, never the last one
    a.hostCounts = c->countsDev;
    a.hostSeq = c->countsSeq;
  }
  if (c->nodes.nNodes > 1) {
    DispatchNetArgs na;
    na.d = a;
    na.net = htNetArgs(c);
    MOE_CUDA(launchDispatchHtNet(na, cfg.numSms, stream));
  } else {
    MOE_CUDA(launchDispatchHtIntranode(a, cfg.numSms, stream));
  }
  // Host state advances only once every kernel of the call is enqueued.
  if (newRouting) {
    h->numTokens = numTokens;
    h->haveRouting = true;
  }
  h->dispatch = ++c->htDispatches;

  const int localExperts = cfg.numExperts / c->nRanks;
  out->x = c->winBase + c->layout.recvX;
  out->xScales = a.scaleCols ? (float*)(c->winBase + c->layout.recvScales) : nullptr;
  out->topkIdx = (int64_t*)(c->winBase + c->layout.recvTopkIdx);
  out->topkWeights = (float*)(c->winBase + c->layout.recvTopkWeights);
  out->numRecvTokens = h->routing.recvCounts;
  out->expertCounts = h->routing.recvCounts + 1;
  out->combineInput = c->winBase + c->layout.combineIn;
  out->hostNumRecvTokens = -1;
  out->hostExpertCounts = nullptr;
  if (hostCounts) {
    MOE_CHECK(waitHostCounts(c, stream, h->hostCounts, 1 + localExperts));
    MOE_CHECK(checkDeviceErrors(c));
    MOE_CHECK(reportLocalErrors(c));  // a bad id of this call: reported, its rows were delivered
    out->hostNumRecvTokens = h->hostCounts[0];
    out->hostExpertCounts = h->hostCounts + 1;
  }
  return ncclSuccess;
}

extern "C" ncclResult_t ncclMoeHandleDestroy(ncclMoeHandle_t h) {
  clearError();
  MOE_CHECK(checkHandle(h, "ncclMoeHandleDestroy"));
  MOE_CUDA(cudaDeviceSynchronize());
  // Nothing uses the block any more: a stream-ordered block goes back to its pool at once.
  if (h->streamOrdered)
    cudaFreeAsync(h->deviceBlock, cudaStreamLegacy);
  else
    cudaFree(h->deviceBlock);
  retireHandle(h);
  return ncclSuccess;
}

extern "C" ncclResult_t ncclMoeHandleRelease(ncclMoeHandle_t h, cudaStream_t stream) {
  clearError();
  const char* fn = "ncclMoeHandleRelease";
  MOE_CHECK(checkHandle(h, fn));
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  MOE_CUDA(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone)
    return setError(ncclInvalidUsage, "%s: stream is being captured; a handle cannot be released inside a CUDA graph",
                    fn);
  if (h->streamOrdered) {
    MOE_CUDA(cudaFreeAsync(h->deviceBlock, stream));
  } else {  // no memory pools on this device: cudaMalloc'ed, freed once `stream` has passed
    MOE_CUDA(cudaStreamSynchronize(stream));
    MOE_CUDA(cudaFree(h->deviceBlock));
  }
  retireHandle(h);
  return ncclSuccess;
}
