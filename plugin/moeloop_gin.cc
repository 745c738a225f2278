// NCCL GIN v11 entry points of the moeloop plugin (proxy type). See moeloop_gin.h for how puts
// and signals travel.
#include <cuda_runtime.h>
#include <string.h>
#include "moeloop_gin.h"
#include "moeloop_log.h"
#include "moeloop_net_props.h"

namespace moeloop {
namespace {

struct GinContext {
  uint32_t magic;
  uint64_t commId;
};
constexpr uint32_t kGinContextMagic = 0x47435458;

GinCollComm* asColl(void* p) {
  GinCollComm* c = (GinCollComm*)p;
  return (c != nullptr && c->magic == kGinCollMagic) ? c : nullptr;
}

// Validates a registration handle of `c` covering [off, off + len).
ncclResult_t checkRegion(GinCollComm* c, void* handle, uint64_t off, uint64_t len, const char* what,
                         GinRegistration** out) {
  GinRegistration* r = (GinRegistration*)handle;
  if (r == nullptr || r->magic != kGinRegMagic || r->comm != c)
    return ML_ERROR(ncclInvalidArgument, "rank %d: %s handle %p is not a registration of this comm",
                    c->rank, what, handle);
  if (!r->live) return ML_ERROR(ncclInvalidArgument, "rank %d: %s registration %llu was deregistered",
                                c->rank, what, (unsigned long long)r->id);
  if (off > r->size || len > r->size - off)
    return ML_ERROR(ncclInvalidArgument, "rank %d: %s range [%llu, +%llu) exceeds its %zu-byte registration",
                    c->rank, what, (unsigned long long)off, (unsigned long long)len, r->size);
  *out = r;
  return ncclSuccess;
}

GinRequest* allocRequest(GinCollComm* c) {
  GinRequest* r;
  if (!c->freeList.empty()) {
    r = c->freeList.back();
    c->freeList.pop_back();
  } else {
    r = new GinRequest();
    c->pool.push_back(r);
  }
  memset(r, 0, sizeof(*r));
  r->magic = kGinReqMagic;
  r->comm = c;
  r->state = GinReqState::kQueued;
  return r;
}

ncclResult_t putImpl(void* collComm, uint64_t srcOff, void* srcMhandle, size_t size, uint64_t dstOff,
                     void* dstMhandle, uint32_t rank, uint32_t op, uint64_t signalOff,
                     void* signalMhandle, uint64_t signalValue, void** request) {
  GinCollComm* c = asColl(collComm);
  if (c == nullptr) return ML_ERROR(ncclInvalidArgument, "put on an invalid GIN comm");
  if (request == nullptr) return ML_ERROR(ncclInvalidArgument, "put with request == NULL");
  *request = nullptr;
  std::lock_guard<std::mutex> lock(c->mu);
  if (c->error != ncclSuccess) return c->error;
  if (rank >= (uint32_t)c->nranks)
    return ginFail(c, ML_ERROR(ncclInvalidArgument, "rank %d: put to rank %u of %d", c->rank, rank, c->nranks));
  GinRegistration *src = nullptr, *dst = nullptr, *sig = nullptr;
  if (size > 0) {
    ncclResult_t res = checkRegion(c, srcMhandle, srcOff, size, "source", &src);
    if (res == ncclSuccess) res = checkRegion(c, dstMhandle, dstOff, size, "destination", &dst);
    if (res != ncclSuccess) return ginFail(c, res);
  }
  if (op != 0) {
    ncclResult_t res = checkRegion(c, signalMhandle, signalOff, sizeof(uint64_t), "signal", &sig);
    if (res == ncclSuccess && signalOff % sizeof(uint64_t) != 0)
      res = ML_ERROR(ncclInvalidArgument, "rank %d: misaligned signal offset %llu", c->rank,
                     (unsigned long long)signalOff);
    if (res != ncclSuccess) return ginFail(c, res);
  }
  counters().ginPuts.fetch_add(1, std::memory_order_relaxed);
  GinRequest* r = allocRequest(c);
  if ((int)rank == c->rank) {
    // Own rank: apply now, payload first.
    ncclResult_t res = ncclSuccess;
    if (size > 0) {
      if (src->type == NCCL_PTR_HOST && dst->type == NCCL_PTR_HOST)
        memmove(dst->base + dstOff, src->base + srcOff, size);
      else
        res = ginCopy(&c->cuda, dst->base + dstOff, src->base + srcOff, size);
      counters().ginBytesApplied.fetch_add(size, std::memory_order_relaxed);
    }
    if (res == ncclSuccess && sig) res = ginApplySignal(c, sig, signalOff, op, signalValue);
    if (res != ncclSuccess) {
      r->state = GinReqState::kFree;
      c->freeList.push_back(r);
      return ginFail(c, res);
    }
    r->state = GinReqState::kDone;
    *request = r;
    return ncclSuccess;
  }
  GinPeer& p = c->peers[rank];
  r->target = rank;
  r->src = src;
  r->srcOff = srcOff;
  GinWireHeader& h = r->hdr;
  h.magic = kGinWireMagic;
  h.op = op;
  h.seq = p.sendSeq++;
  h.size = size;
  h.sendNs = nowNs();
  h.dstRegId = dst ? dst->id : kNoRegistration;
  h.dstRegSize = dst ? dst->size : 0;
  h.dstOff = dstOff;
  h.sigRegId = sig ? sig->id : kNoRegistration;
  h.sigRegSize = sig ? sig->size : 0;
  h.sigOff = signalOff;
  h.sigValue = signalValue;
  p.sendQueue.push_back(r);
  *request = r;
  return ginProgressLocked(c);
}

// --- entry points ---------------------------------------------------------------------------------

ncclResult_t ginInit(void** ctx, uint64_t commId, ncclDebugLogger_t logFunction) {
  if (ctx == nullptr) return ML_ERROR(ncclInvalidArgument, "GIN init with ctx == NULL");
  setLogger(logFunction);
  (void)shapingConfig();
  *ctx = new GinContext{kGinContextMagic, commId};
  counters().ginInits.fetch_add(1, std::memory_order_relaxed);
  ML_INFO(MOELOOP_LOG_INIT | MOELOOP_LOG_NET, "GIN (proxy) initialised for comm %llx",
          (unsigned long long)commId);
  return ncclSuccess;
}

ncclResult_t ginDevices(int* ndev) {
  if (ndev == nullptr) return ML_ERROR(ncclInvalidArgument, "GIN devices with ndev == NULL");
  *ndev = kMaxDevs;
  return ncclSuccess;
}

ncclResult_t ginGetProperties(int dev, ncclNetProperties_v11_t* props) {
  return fillProperties(dev, /*gin=*/true, props);
}

ncclResult_t ginListen(void* ctx, int dev, void* handle, void** listenComm) {
  (void)ctx;
  if (handle == nullptr || listenComm == nullptr)
    return ML_ERROR(ncclInvalidArgument, "GIN listen with a NULL argument");
  *listenComm = nullptr;
  if (fakeNic(dev) == nullptr) return ML_ERROR(ncclInvalidArgument, "GIN listen on unknown device %d", dev);
  GinListenComm* l = new GinListenComm();
  l->magic = kGinListenMagic;
  l->dev = dev;
  ncclResult_t res = openListenHandle(kGinHandleMagic, handle, &l->fd, &l->nonce);
  if (res != ncclSuccess) {
    delete l;
    return res;
  }
  *listenComm = l;
  return ncclSuccess;
}

ncclResult_t ginCloseListen(void* listenComm) {
  GinListenComm* l = (GinListenComm*)listenComm;
  if (l == nullptr) return ncclSuccess;
  if (l->magic != kGinListenMagic) return ML_ERROR(ncclInvalidArgument, "GIN closeListen of an invalid comm");
  l->acceptor.closeAll();
  closeFd(&l->fd);
  l->magic = 0;
  delete l;
  return ncclSuccess;
}

void destroyColl(GinCollComm* c) {
  ginCloseMesh(c);
  for (GinRequest* r : c->pool) delete r;
  for (GinRegistration* r : c->regs) delete r;
  ginCudaRelease(&c->cuda);
  c->magic = 0;
  delete c;
}

ncclResult_t ginConnect(void* ctx, void* handles[], int nranks, int rank, void* listenComm,
                        void** collComm) {
  (void)ctx;
  if (collComm == nullptr || handles == nullptr)
    return ML_ERROR(ncclInvalidArgument, "GIN connect with a NULL argument");
  *collComm = nullptr;
  GinListenComm* l = (GinListenComm*)listenComm;
  if (l == nullptr || l->magic != kGinListenMagic)
    return ML_ERROR(ncclInvalidArgument, "GIN connect with an invalid listen comm");
  if (nranks < 1 || rank < 0 || rank >= nranks)
    return ML_ERROR(ncclInvalidArgument, "GIN connect as rank %d of %d", rank, nranks);
  GinCollComm* c = new GinCollComm();
  c->magic = kGinCollMagic;
  c->rank = rank;
  c->nranks = nranks;
  c->dev = l->dev;
  c->peers.resize(nranks);
  int cur = -1;
  if (cudaGetDevice(&cur) == cudaSuccess) c->cuda.dev = cur;  // refined by CUDA registrations
  ncclResult_t res = ginConnectMesh(c, l, handles);
  if (res != ncclSuccess) {
    destroyColl(c);
    return res;
  }
  counters().ginCollComms.fetch_add(1, std::memory_order_relaxed);
  ML_INFO(MOELOOP_LOG_INIT | MOELOOP_LOG_NET, "GIN rank %d of %d connected to every peer", rank, nranks);
  *collComm = c;
  return ncclSuccess;
}

ncclResult_t ginCreateContext(void* collComm, int nSignals, int nCounters, void** ginCtx,
                              ncclNetDeviceHandle_v11_t** devHandle) {
  (void)collComm;
  (void)nSignals;
  (void)nCounters;
  if (ginCtx) *ginCtx = nullptr;
  if (devHandle) *devHandle = nullptr;
  return ML_ERROR(ncclInvalidUsage, "createContext: moeloop is a GIN_PROXY plugin; NCCL's proxy owns the contexts");
}

ncclResult_t ginDestroyContext(void* ginCtx) {
  if (ginCtx == nullptr) return ncclSuccess;
  return ML_ERROR(ncclInvalidArgument, "destroyContext of a context moeloop never created");
}

ncclResult_t ginRegMrSym(void* collComm, void* data, size_t size, int type, uint64_t mrFlags,
                         void** mhandle, void** ginHandle) {
  (void)mrFlags;  // every put is applied in order: strong ordering holds for all registrations
  GinCollComm* c = asColl(collComm);
  if (c == nullptr) return ML_ERROR(ncclInvalidArgument, "regMrSym on an invalid GIN comm");
  if (mhandle == nullptr || ginHandle == nullptr)
    return ML_ERROR(ncclInvalidArgument, "regMrSym with a NULL handle pointer");
  *mhandle = *ginHandle = nullptr;
  if (data == nullptr || size == 0)
    return ML_ERROR(ncclInvalidArgument, "regMrSym of %zu bytes at %p", size, data);
  if (type != NCCL_PTR_HOST && type != NCCL_PTR_CUDA)
    return ML_ERROR(ncclInvalidArgument, "regMrSym of memory type %d", type);
  if (type == NCCL_PTR_CUDA) {
    int dev = -1;
    bool isDevice = false;
    ML_CHECK(ginPointerDevice(data, &dev, &isDevice));
    if (!isDevice) return ML_ERROR(ncclInvalidArgument, "regMrSym: %p is not device memory", data);
    std::lock_guard<std::mutex> lock(c->mu);
    if (c->cuda.stream != nullptr && c->cuda.dev != dev)
      return ML_ERROR(ncclInvalidArgument, "regMrSym: memory of device %d on a comm of device %d", dev, c->cuda.dev);
    c->cuda.dev = dev;
  }
  std::lock_guard<std::mutex> lock(c->mu);
  GinRegistration* r = new GinRegistration();
  r->magic = kGinRegMagic;
  r->comm = c;
  r->id = c->regs.size();
  r->base = (char*)data;
  r->size = size;
  r->type = type;
  r->live = true;
  c->regs.push_back(r);
  *mhandle = *ginHandle = r;  // NCCL hands back the ginHandle to iput: one object serves both
  ML_INFO(MOELOOP_LOG_NET, "GIN rank %d registration %llu: %zu bytes of %s memory", c->rank,
          (unsigned long long)r->id, size, type == NCCL_PTR_CUDA ? "device" : "host");
  return ncclSuccess;
}

ncclResult_t ginRegMrSymDmaBuf(void* collComm, void* data, size_t size, int type, uint64_t offset,
                               int fd, uint64_t mrFlags, void** mhandle, void** ginHandle) {
  (void)offset;
  (void)fd;  // the memory is addressable in this process: the dma-buf is not needed
  return ginRegMrSym(collComm, data, size, type, mrFlags, mhandle, ginHandle);
}

ncclResult_t ginDeregMrSym(void* collComm, void* mhandle) {
  GinCollComm* c = asColl(collComm);
  if (c == nullptr) return ML_ERROR(ncclInvalidArgument, "deregMrSym on an invalid GIN comm");
  std::lock_guard<std::mutex> lock(c->mu);
  GinRegistration* r = (GinRegistration*)mhandle;
  if (r == nullptr || r->magic != kGinRegMagic || r->comm != c || !r->live)
    return ML_ERROR(ncclInvalidArgument, "deregMrSym of an unknown registration %p", mhandle);
  r->live = false;  // the object stays until closeColl: late messages are then reported, not crashes
  return ncclSuccess;
}

ncclResult_t ginCloseColl(void* collComm) {
  GinCollComm* c = asColl(collComm);
  if (c == nullptr) return ML_ERROR(ncclInvalidArgument, "closeColl of an invalid GIN comm");
  {
    std::lock_guard<std::mutex> lock(c->mu);
    size_t pending = 0;
    for (const GinPeer& p : c->peers) pending += p.sendQueue.size();
    if (pending > 0 && c->error == ncclSuccess)
      ML_WARN("rank %d: closing a GIN comm with %zu put(s) not yet sent", c->rank, pending);
  }
  destroyColl(c);
  return ncclSuccess;
}

ncclResult_t ginIput(void* collComm, uint64_t srcOff, void* srcMhandle, size_t size, uint64_t dstOff,
                     void* dstMhandle, uint32_t rank, void** request) {
  return putImpl(collComm, srcOff, srcMhandle, size, dstOff, dstMhandle, rank, 0, 0, nullptr, 0, request);
}

ncclResult_t ginIputSignal(void* collComm, uint64_t srcOff, void* srcMhandle, size_t size,
                           uint64_t dstOff, void* dstMhandle, uint32_t rank, uint64_t signalOff,
                           void* signalMhandle, uint64_t signalValue, uint32_t signalOp,
                           void** request) {
  uint32_t op;
  if (signalOp == NCCL_NET_SIGNAL_OP_INC) {
    op = kGinOpSignalInc;
  } else if (signalOp == NCCL_NET_SIGNAL_OP_ADD) {
    op = kGinOpSignalAdd;
  } else {
    GinCollComm* c = asColl(collComm);
    ncclResult_t res = ML_ERROR(ncclInvalidArgument, "iputSignal with unknown signal op %u", signalOp);
    if (c) {
      std::lock_guard<std::mutex> lock(c->mu);
      ginFail(c, res);
    }
    return res;
  }
  return putImpl(collComm, srcOff, srcMhandle, size, dstOff, dstMhandle, rank, op, signalOff,
                 signalMhandle, signalValue, request);
}

ncclResult_t ginTest(void* collComm, void* request, int* done) {
  GinCollComm* c = asColl(collComm);
  if (c == nullptr || done == nullptr) return ML_ERROR(ncclInvalidArgument, "GIN test with an invalid argument");
  *done = 0;
  std::lock_guard<std::mutex> lock(c->mu);
  GinRequest* r = (GinRequest*)request;
  if (r == nullptr || r->magic != kGinReqMagic || r->comm != c || r->state == GinReqState::kFree)
    return ML_ERROR(ncclInvalidArgument, "GIN test of an invalid request %p", request);
  if (r->state == GinReqState::kQueued) (void)ginProgressLocked(c);
  if (r->state == GinReqState::kError) return r->error;
  if (r->state == GinReqState::kDone) {
    *done = 1;
    r->state = GinReqState::kFree;
    c->freeList.push_back(r);
    return ncclSuccess;
  }
  return c->error;
}

ncclResult_t ginProgressEntry(void* collComm) {
  GinCollComm* c = asColl(collComm);
  if (c == nullptr) return ML_ERROR(ncclInvalidArgument, "ginProgress on an invalid GIN comm");
  std::lock_guard<std::mutex> lock(c->mu);
  return ginProgressLocked(c);
}

// NCCL passes the context of createContext; since the proxy owns the contexts, moeloop also
// accepts its collComm here. Errors are sticky, so "has an error" means "the comm failed".
ncclResult_t ginQueryLastError(void* ginCtx, bool* hasError) {
  if (hasError == nullptr) return ML_ERROR(ncclInvalidArgument, "queryLastError with hasError == NULL");
  *hasError = false;
  GinCollComm* c = asColl(ginCtx);
  if (c == nullptr) return ncclSuccess;
  std::lock_guard<std::mutex> lock(c->mu);
  *hasError = c->error != ncclSuccess;
  return ncclSuccess;
}

ncclResult_t ginFinalize(void* ctx) {
  GinContext* g = (GinContext*)ctx;
  if (g == nullptr) return ncclSuccess;
  if (g->magic != kGinContextMagic) return ML_ERROR(ncclInvalidArgument, "GIN finalize of an invalid context");
  g->magic = 0;
  delete g;
  return ncclSuccess;
}

}  // namespace
}  // namespace moeloop

// The symbol NCCL looks up with dlsym.
extern "C" {
__attribute__((visibility("default"))) ncclGin_v11_t ncclGinPlugin_v11 = {
    "moeloop",
    moeloop::ginInit,
    moeloop::ginDevices,
    moeloop::ginGetProperties,
    moeloop::ginListen,
    moeloop::ginConnect,
    moeloop::ginCreateContext,
    moeloop::ginRegMrSym,
    moeloop::ginRegMrSymDmaBuf,
    moeloop::ginDeregMrSym,
    moeloop::ginDestroyContext,
    moeloop::ginCloseColl,
    moeloop::ginCloseListen,
    moeloop::ginIput,
    moeloop::ginIputSignal,
    moeloop::ginTest,
    moeloop::ginProgressEntry,
    moeloop::ginQueryLastError,
    moeloop::ginFinalize,
};
}  // extern "C"
