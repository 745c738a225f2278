// The version-neutral GIN core of the moeloop plugin (moeloop_gin_api.h): comms, registrations,
// context sets, puts and requests. See moeloop_gin.h for how puts and signals travel.
#include <cuda_runtime.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <atomic>
#include "moeloop_gin.h"
#include "moeloop_gin_api.h"
#include "moeloop_log.h"
#include "moeloop_net_props.h"
#include "moeloop_peer_stats.h"

namespace moeloop {
namespace {

struct GinContext {
  uint32_t magic;
  uint64_t commId;
};
constexpr uint32_t kGinContextMagic = 0x47435458;
constexpr uint64_t kTestProgressGapNs = 2000;  // see ginTest

GinCollComm* asColl(void* p) {
  GinCollComm* c = (GinCollComm*)p;
  return (c != nullptr && c->magic == kGinCollMagic) ? c : nullptr;
}

GinContextSet* asContextSet(void* p) {
  GinContextSet* s = (GinContextSet*)p;
  return (s != nullptr && s->magic == kGinContextSetMagic) ? s : nullptr;
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

uint32_t wireSignalOp(uint32_t ncclOp) {
  if (ncclOp == NCCL_NET_SIGNAL_OP_INC) return kGinOpSignalInc;
  if (ncclOp == NCCL_NET_SIGNAL_OP_ADD) return kGinOpSignalAdd;
  return 0;
}

// Applies a put to the own rank at once, payload first.
ncclResult_t applyLocally(GinCollComm* c, int context, const GinPut& p, GinRegistration* src,
                          GinRegistration* dst, GinRegistration* sig, uint32_t op) {
  if (p.size > 0) {
    char* to = dst->base + p.dstOff;
    const char* from = src->base + p.srcOff;
    if (src->type == NCCL_PTR_HOST && dst->type == NCCL_PTR_HOST)
      memmove(to, from, p.size);
    else
      ML_CHECK(ginCopy(&c->cuda, to, from, p.size));
    counters().ginBytesApplied.fetch_add(p.size, std::memory_order_relaxed);
  }
  if (sig) ML_CHECK(ginApplySignal(c, sig, p.signalOff, op, p.signalValue));
  peerStatsOnSend(c->rank, context, p.size, /*copied=*/false, sig != nullptr);
  peerStatsOnApply(c->rank, context, p.size, sig != nullptr);
  return ncclSuccess;
}

// Caller holds c->mu. `context`: the context id within the caller's context set (0 for v11).
ncclResult_t putLocked(GinCollComm* c, int context, const GinPut& p, void** request) {
  if (c->error != ncclSuccess) return c->error;
  if (p.rank >= (uint32_t)c->nranks)
    return ginFail(c, ML_ERROR(ncclInvalidArgument, "rank %d: put to rank %u of %d", c->rank, p.rank, c->nranks));
  if (p.size > kMaxMessageBytes)
    return ginFail(c, ML_ERROR(ncclInvalidArgument, "rank %d: put of %zu bytes exceeds the plugin's "
                               "maximum of %zu (maxP2pBytes)", c->rank, p.size, kMaxMessageBytes));
  uint32_t op = wireSignalOp(p.signalOp);
  if (p.signalOp != 0 && op == 0)
    return ginFail(c, ML_ERROR(ncclInvalidArgument, "rank %d: put with unknown signal op %u", c->rank, p.signalOp));
  GinRegistration *src = nullptr, *dst = nullptr, *sig = nullptr;
  if (p.size > 0) {
    ncclResult_t res = checkRegion(c, p.srcMhandle, p.srcOff, p.size, "source", &src);
    if (res == ncclSuccess) res = checkRegion(c, p.dstMhandle, p.dstOff, p.size, "destination", &dst);
    if (res != ncclSuccess) return ginFail(c, res);
  }
  if (op != 0) {
    ncclResult_t res = checkRegion(c, p.signalMhandle, p.signalOff, sizeof(uint64_t), "signal", &sig);
    if (res == ncclSuccess && p.signalOff % sizeof(uint64_t) != 0)
      res = ML_ERROR(ncclInvalidArgument, "rank %d: misaligned signal offset %llu", c->rank,
                     (unsigned long long)p.signalOff);
    if (res != ncclSuccess) return ginFail(c, res);
  }
  counters().ginPuts.fetch_add(1, std::memory_order_relaxed);
  GinRequest* r = ginAllocRequest(c);
  r->context = context;
  if ((int)p.rank == c->rank) {
    ncclResult_t res = applyLocally(c, context, p, src, dst, sig, op);
    if (res != ncclSuccess) {
      ginFreeRequest(c, r);
      return ginFail(c, res);
    }
    r->state = GinReqState::kDone;
    *request = r;
    return ncclSuccess;
  }
  GinPeer& peer = c->peers[p.rank];
  r->kind = GinReqKind::kPut;
  r->path = peer.copy ? GinPath::kUndecided : GinPath::kSocket;
  r->target = p.rank;
  r->src = src;
  r->srcOff = p.srcOff;
  GinWireHeader& h = r->hdr;
  h.magic = kGinWireMagic;
  h.op = op;
  h.seq = peer.sendSeq++;
  h.size = p.size;
  h.sendNs = nowNs();
  h.dstRegId = dst ? dst->id : kNoRegistration;
  h.dstRegSize = dst ? dst->size : 0;
  h.dstOff = p.dstOff;
  h.sigRegId = sig ? sig->id : kNoRegistration;
  h.sigRegSize = sig ? sig->size : 0;
  h.sigOff = p.signalOff;
  h.sigValue = p.signalValue;
  h.context = (uint32_t)context;
  peer.sendQueue.push_back(r);
  *request = r;
  return ginProgressLocked(c);
}

// Frees everything `c` owns. Caller holds c->mu; the comm object itself is deleted afterwards.
void teardownLocked(GinCollComm* c) {
  ginCopyTeardown(c);
  ginCloseMesh(c);
  for (GinRequest* r : c->pool) delete r;
  c->pool.clear();
  c->freeList.clear();
  for (GinRegistration* r : c->regs) delete r;
  c->regs.clear();
  for (GinContextSet* s : c->contextSets) {
    s->magic = kGinContextSetOrphanMagic;  // destroyContext after closeColl frees it
    s->comm = nullptr;
  }
  c->contextSets.clear();
  ginCudaRelease(&c->cuda);
  c->magic = 0;
}

}  // namespace

GinRequest* ginAllocRequest(GinCollComm* c) {
  GinRequest* r;
  if (!c->freeList.empty()) {
    r = c->freeList.back();
    c->freeList.pop_back();
  } else {
    r = new GinRequest();
    c->pool.push_back(r);
  }
  void* event = r->event;  // CUDA events are kept for the next use of the request
  void* timedStart = r->timedStart;
  void* timedEnd = r->timedEnd;
  memset(r, 0, sizeof(*r));
  r->event = event;
  r->timedStart = timedStart;
  r->timedEnd = timedEnd;
  r->magic = kGinReqMagic;
  r->comm = c;
  r->state = GinReqState::kQueued;
  return r;
}

void ginFreeRequest(GinCollComm* c, GinRequest* r) {
  r->state = GinReqState::kFree;
  c->freeList.push_back(r);
}

// --- switches (NCCL_MOELOOP_COALESCE, NCCL_MOELOOP_OVERLAP_SCAN) --------------------------------

namespace {
std::atomic<const GinTuning*> gTuningOverride{nullptr};
}  // namespace

GinTuning ginTuningFrom(const char* coalesce, const char* overlapScan) {
  GinTuning t;
  if (coalesce != nullptr && *coalesce != '\0') {
    if (strcmp(coalesce, "0") == 0)
      t.coalesceSignals = false;
    else if (strcmp(coalesce, "1") != 0)
      ML_WARN("ignoring NCCL_MOELOOP_COALESCE=%s: expected 0 or 1; using 1", coalesce);
  }
  if (overlapScan != nullptr && *overlapScan != '\0') {
    char* end = nullptr;
    unsigned long long n = strtoull(overlapScan, &end, 10);
    if (strcasecmp(overlapScan, "all") == 0)
      t.overlapScanLimit = 0;
    else if (end != overlapScan && *end == '\0' && overlapScan[0] != '-')
      t.overlapScanLimit = (size_t)n;
    else
      ML_WARN("ignoring NCCL_MOELOOP_OVERLAP_SCAN=%s: expected a count of puts, 0 or all; using %zu",
              overlapScan, t.overlapScanLimit);
  }
  return t;
}

const GinTuning& ginTuning() {
  const GinTuning* o = gTuningOverride.load(std::memory_order_acquire);
  if (o != nullptr) return *o;
  static const GinTuning env = [] {
    GinTuning t = ginTuningFrom(getenv("NCCL_MOELOOP_COALESCE"), getenv("NCCL_MOELOOP_OVERLAP_SCAN"));
    const char* timing = getenv("NCCL_MOELOOP_COPY_TIMING");
    t.copyTiming = timing != nullptr && strcmp(timing, "1") == 0;
    ML_INFO(MOELOOP_LOG_INIT | MOELOOP_LOG_ENV,
            "GIN: signal updates %s (NCCL_MOELOOP_COALESCE=%d), overlap scan of copies %s%zu puts in "
            "flight (NCCL_MOELOOP_OVERLAP_SCAN=%zu)",
            t.coalesceSignals ? "summed per word and progress pass" : "written one by one",
            t.coalesceSignals ? 1 : 0, t.overlapScanLimit ? "up to " : "unbounded, ",
            t.overlapScanLimit, t.overlapScanLimit);
    return t;
  }();
  return env;
}

void setGinTuningForTesting(const GinTuning* t) { gTuningOverride.store(t, std::memory_order_release); }

// --- init, devices, listen, connect ----------------------------------------------------------------

ncclResult_t ginInit(void** ctx, uint64_t commId, ncclDebugLogger_t logFunction) {
  if (ctx == nullptr) return ML_ERROR(ncclInvalidArgument, "GIN init with ctx == NULL");
  setLogger(logFunction);
  (void)shapingConfig();
  (void)ginTuning();  // the switches are read once, here
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
  c->copyWanted = ginCopyWanted();
  ncclResult_t res = ginConnectMesh(c, l, handles);
  if (res != ncclSuccess) {
    {
      std::lock_guard<std::mutex> lock(c->mu);
      teardownLocked(c);
    }
    delete c;
    return res;
  }
  counters().ginCollComms.fetch_add(1, std::memory_order_relaxed);
  int copyPeers = 0;
  for (int q = 0; q < nranks; q++) copyPeers += c->peers[q].copy;
  ML_INFO(MOELOOP_LOG_INIT | MOELOOP_LOG_NET, "GIN rank %d of %d connected to every peer, %d of them "
          "through the copy transport", rank, nranks, copyPeers);
  *collComm = c;
  return ncclSuccess;
}

// Teardown happens under the comm's mutex, so a thread inside a call on the comm finishes first.
// NCCL must not call into the comm after closeColl returns (its object is gone).
ncclResult_t ginCloseColl(void* collComm) {
  GinCollComm* c = asColl(collComm);
  if (c == nullptr) return ML_ERROR(ncclInvalidArgument, "closeColl of an invalid GIN comm");
  {
    std::lock_guard<std::mutex> lock(c->mu);
    size_t pending = 0;
    for (const GinPeer& p : c->peers)
      for (const GinRequest* r : p.sendQueue) pending += r->kind == GinReqKind::kPut;
    if (pending > 0 && c->error == ncclSuccess)
      ML_WARN("rank %d: closing a GIN comm with %zu put(s) not yet sent", c->rank, pending);
    if (!c->contextSets.empty())
      ML_WARN("rank %d: closing a GIN comm with %zu context set(s) not destroyed", c->rank,
              c->contextSets.size());
    teardownLocked(c);
  }
  delete c;
  return ncclSuccess;
}

// --- registrations ---------------------------------------------------------------------------------

ncclResult_t ginRegMrSym(void* collComm, void* data, size_t size, int type, void** mhandle,
                         uint64_t mrFlags) {
  GinCollComm* c = asColl(collComm);
  if (c == nullptr) return ML_ERROR(ncclInvalidArgument, "regMrSym on an invalid GIN comm");
  if (mhandle == nullptr) return ML_ERROR(ncclInvalidArgument, "regMrSym with a NULL handle pointer");
  *mhandle = nullptr;
  if (data == nullptr || size == 0)
    return ML_ERROR(ncclInvalidArgument, "regMrSym of %zu bytes at %p", size, data);
  if (type != NCCL_PTR_HOST && type != NCCL_PTR_CUDA)
    return ML_ERROR(ncclInvalidArgument, "regMrSym of memory type %d", type);
  int dev = -1;
  if (type == NCCL_PTR_CUDA) {
    bool isDevice = false;
    ML_CHECK(ginPointerDevice(data, &dev, &isDevice));
    if (!isDevice) return ML_ERROR(ncclInvalidArgument, "regMrSym: %p is not device memory", data);
  }
  std::lock_guard<std::mutex> lock(c->mu);
  if (type == NCCL_PTR_CUDA) {
    bool deviceUsed = c->cuda.stream != nullptr;
    for (const GinPeer& p : c->peers) {
      for (void* s : p.streams) deviceUsed |= s != nullptr;
      for (const GinRemoteRegistration& rr : p.remote) deviceUsed |= rr.map.base != nullptr;
    }
    if (deviceUsed && c->cuda.dev != dev)
      return ML_ERROR(ncclInvalidArgument, "regMrSym: memory of device %d on a comm of device %d", dev, c->cuda.dev);
    c->cuda.dev = dev;
    // Everything the data path would otherwise allocate on first use (ginPrepareDevice says why):
    // streams, the signal lane, and the pinned bounce buffers of the socket path (2 x
    // kGinBounceBytes per peer).
    ncclResult_t res = ginPrepareDevice(&c->cuda);
    for (int q = 0; q < c->nranks && res == ncclSuccess; q++) {
      GinPeer& p = c->peers[q];
      if (q == c->rank) continue;
      for (int k = 0; k < kGinCopyStreams && p.copy && res == ncclSuccess; k++)
        if (p.streams[k] == nullptr) res = ginStreamCreate(&c->cuda, &p.streams[k]);
      if (res == ncclSuccess && p.sendBounce == nullptr) res = ginPinnedAlloc(&c->cuda, kGinBounceBytes, &p.sendBounce);
      if (res == ncclSuccess && p.recvBounce == nullptr) res = ginPinnedAlloc(&c->cuda, kGinBounceBytes, &p.recvBounce);
    }
    if (res != ncclSuccess) return ginFail(c, res);
  }
  GinRegistration* r = new GinRegistration();
  r->magic = kGinRegMagic;
  r->comm = c;
  r->id = c->regs.size();
  r->base = (char*)data;
  r->size = size;
  r->type = type;
  r->live = true;
  if (type == NCCL_PTR_CUDA && (mrFlags & NCCL_NET_MR_FLAG_SIGNAL_NEVER_RESET) != 0 &&
      size % sizeof(uint64_t) == 0 && (uintptr_t)data % sizeof(uint64_t) == 0)
    r->sigShadow.assign(size / sizeof(uint64_t), 0);  // NCCL zeroed the words before registering
  c->regs.push_back(r);
  ncclResult_t res = ginCopyAnnounce(c, r);
  if (res != ncclSuccess) return ginFail(c, res);
  *mhandle = r;
  ML_INFO(MOELOOP_LOG_NET, "GIN rank %d registration %llu: %zu bytes of %s memory%s", c->rank,
          (unsigned long long)r->id, size, type == NCCL_PTR_CUDA ? "device" : "host",
          r->sigShadow.empty() ? "" : " (signals, never reset: written without read-back)");
  return ncclSuccess;
}

ncclResult_t ginDeregMrSym(void* collComm, void* mhandle) {
  GinCollComm* c = asColl(collComm);
  if (c == nullptr) return ML_ERROR(ncclInvalidArgument, "deregMrSym on an invalid GIN comm");
  std::lock_guard<std::mutex> lock(c->mu);
  GinRegistration* r = (GinRegistration*)mhandle;
  if (r == nullptr || r->magic != kGinRegMagic || r->comm != c || !r->live)
    return ML_ERROR(ncclInvalidArgument, "deregMrSym of an unknown registration %p", mhandle);
  r->live = false;  // the object stays until closeColl: late messages are then reported, not crashes
  if (!r->sigShadow.empty()) {
    // The caller frees the words next: let the signal writes still queued on the lane land first.
    ncclResult_t res = ginSignalLaneSync(&c->cuda);
    if (res != ncclSuccess) return ginFail(c, res);
    r->sigShadow.clear();
    r->sigShadow.shrink_to_fit();
  }
  return ginCopyRetire(c, r);
}

// --- context sets ------------------------------------------------------------------------------------

ncclResult_t ginCreateContexts(void* collComm, int nContexts, void** contextSet) {
  if (contextSet == nullptr) return ML_ERROR(ncclInvalidArgument, "createContext with a NULL context pointer");
  *contextSet = nullptr;
  GinCollComm* c = asColl(collComm);
  if (c == nullptr) return ML_ERROR(ncclInvalidArgument, "createContext on an invalid GIN comm");
  if (nContexts < 1) return ML_ERROR(ncclInvalidArgument, "createContext of %d contexts", nContexts);
  std::lock_guard<std::mutex> lock(c->mu);
  GinContextSet* s = new GinContextSet{kGinContextSetMagic, c, nContexts};
  c->contextSets.push_back(s);
  *contextSet = s;
  ML_INFO(MOELOOP_LOG_INIT | MOELOOP_LOG_NET, "GIN rank %d: %d context(s) created", c->rank, nContexts);
  return ncclSuccess;
}

ncclResult_t ginDestroyContexts(void* contextSet) {
  GinContextSet* s = (GinContextSet*)contextSet;
  if (s == nullptr) return ncclSuccess;
  if (s->magic == kGinContextSetOrphanMagic) {  // its comm was closed first
    s->magic = 0;
    delete s;
    return ncclSuccess;
  }
  if (s->magic != kGinContextSetMagic) return ML_ERROR(ncclInvalidArgument, "destroyContext of an invalid context %p", contextSet);
  GinCollComm* c = s->comm;
  {
    std::lock_guard<std::mutex> lock(c->mu);
    for (size_t i = 0; i < c->contextSets.size(); i++)
      if (c->contextSets[i] == s) {
        c->contextSets.erase(c->contextSets.begin() + (long)i);
        break;
      }
    s->magic = 0;
  }
  delete s;
  return ncclSuccess;
}

// --- puts, requests, progress, errors -------------------------------------------------------------

ncclResult_t ginPutOnComm(void* collComm, const GinPut& put, void** request) {
  GinCollComm* c = asColl(collComm);
  if (c == nullptr) return ML_ERROR(ncclInvalidArgument, "put on an invalid GIN comm");
  if (request == nullptr) return ML_ERROR(ncclInvalidArgument, "put with request == NULL");
  *request = nullptr;
  std::lock_guard<std::mutex> lock(c->mu);
  return putLocked(c, 0, put, request);
}

ncclResult_t ginPutOnContext(void* contextSet, int context, const GinPut& put, void** request) {
  GinContextSet* s = asContextSet(contextSet);
  if (s == nullptr) return ML_ERROR(ncclInvalidArgument, "put on an invalid GIN context %p", contextSet);
  if (request == nullptr) return ML_ERROR(ncclInvalidArgument, "put with request == NULL");
  *request = nullptr;
  GinCollComm* c = s->comm;
  std::lock_guard<std::mutex> lock(c->mu);
  if (context < 0 || context >= s->nContexts)
    return ginFail(c, ML_ERROR(ncclInvalidArgument, "rank %d: put on context %d of %d", c->rank,
                               context, s->nContexts));
  return putLocked(c, context, put, request);
}

ncclResult_t ginTest(void* collComm, void* request, int* done) {
  GinCollComm* c = asColl(collComm);
  if (c == nullptr || done == nullptr) return ML_ERROR(ncclInvalidArgument, "GIN test with an invalid argument");
  *done = 0;
  std::lock_guard<std::mutex> lock(c->mu);
  GinRequest* r = (GinRequest*)request;
  if (r == nullptr || r->magic != kGinReqMagic || r->comm != c || r->state == GinReqState::kFree)
    return ML_ERROR(ncclInvalidArgument, "GIN test of an invalid request %p", request);
  // NCCL's GIN proxy tests every outstanding request on every pass and calls rmaProgress /
  // ginProgress once per pass anyway: a full progress (a poll() and the send queues) per test
  // made a pass cost O(outstanding requests) system calls. Progress from here only when none ran
  // for kTestProgressGapNs (counted from the end of the last progress pass).
  if (r->state == GinReqState::kQueued && nowNs() - c->lastProgressNs >= kTestProgressGapNs)
    (void)ginProgressLocked(c);
  if (r->state == GinReqState::kError) return r->error;
  if (r->state == GinReqState::kDone) {
    *done = 1;
    ginFreeRequest(c, r);
    return ncclSuccess;
  }
  return c->error;
}

ncclResult_t ginProgressComm(void* collComm) {
  GinCollComm* c = asColl(collComm);
  if (c == nullptr) return ML_ERROR(ncclInvalidArgument, "ginProgress on an invalid GIN comm");
  std::lock_guard<std::mutex> lock(c->mu);
  return ginProgressLocked(c);
}

ncclResult_t ginProgressContexts(void* contextSet) {
  GinContextSet* s = asContextSet(contextSet);
  if (s == nullptr) return ML_ERROR(ncclInvalidArgument, "progress on an invalid GIN context %p", contextSet);
  return ginProgressComm(s->comm);
}

ncclResult_t ginQueryLastErrorComm(void* collComm, bool* hasError) {
  if (hasError == nullptr) return ML_ERROR(ncclInvalidArgument, "queryLastError with hasError == NULL");
  *hasError = false;
  GinCollComm* c = asColl(collComm);
  if (c == nullptr) return ncclSuccess;
  std::lock_guard<std::mutex> lock(c->mu);
  *hasError = c->error != ncclSuccess;
  return ncclSuccess;
}

ncclResult_t ginQueryLastErrorContexts(void* contextSet, bool* hasError) {
  if (hasError == nullptr) return ML_ERROR(ncclInvalidArgument, "queryLastError with hasError == NULL");
  *hasError = false;
  GinContextSet* s = asContextSet(contextSet);
  if (s == nullptr) return ML_ERROR(ncclInvalidArgument, "queryLastError on an invalid GIN context %p", contextSet);
  return ginQueryLastErrorComm(s->comm, hasError);
}

ncclResult_t ginFinalize(void* ctx) {
  GinContext* g = (GinContext*)ctx;
  if (g == nullptr) return ncclSuccess;
  if (g->magic != kGinContextMagic) return ML_ERROR(ncclInvalidArgument, "GIN finalize of an invalid context");
  g->magic = 0;
  delete g;
  return ncclSuccess;
}

}  // namespace moeloop
