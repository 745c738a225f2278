// The copy transport of the moeloop GIN (see moeloop_gin.h for how a put travels).
//
// Pairing: each rank offers the transport in the hello of its outgoing connections
// (kHelloFlagCopy); a pair uses it when both ranks offer it (GinPeer::copy).
// Registrations: at regMrSym a CUDA registration's cuMem allocation is exported once as a POSIX
// fd; an announcement (a header-only message on the ordered connection, the fd passed with its
// first byte by SCM_RIGHTS) goes to every copy peer; the exporter closes its fd once all are
// sent. The peer imports and maps the allocation for its device and keeps the mapping by
// registration id until the exporter retires it (deregMrSym) or the comm closes. Host memory and
// memory that cannot be exported are announced without an fd: puts to them use the socket path.
// Puts: a put to a copy peer waits until the peer's announcement of its destination arrived (an
// announcement precedes, on every rank, any put naming a later registration, so this cannot
// deadlock; a peer that never makes the registration fails the comm after registrationWaitSec()).
// Its payload is then copied in chunks granted by the egress token bucket, on one of the peer's
// kGinCopyStreams streams (round robin by put, shared by every context); its header follows once an
// event after its last chunk has completed, every earlier header has gone (headers leave in put
// order, so every signal stays strong: it follows the payloads of all earlier puts) and
// messageReleaseNs() has passed. A put is ready (readyNs) when its own copies are seen complete
// (every progress pass polls each stream's oldest pending put: ginCopyPollReady), not when the
// puts before it have gone, so the latencies of puts in flight run at the same time instead of
// one after the other. Copies of different puts may run in parallel; a put whose
// destination overlaps a put still in flight on another stream waits for that put's event first,
// so two puts to the same bytes land in put order.
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>
#include <atomic>
#include <functional>
#include <mutex>
#include <string>
#include "moeloop_gin.h"
#include "moeloop_log.h"

namespace moeloop {
namespace {

std::atomic<int> gCopyOverride{-1};

constexpr size_t kCopyChunk = 4u << 20;        // most bytes per copy launch while shaped
constexpr size_t kCopyMinGrant = 256u << 10;   // fewest bytes per copy launch while shaped

TokenBucket* egressOf(const GinCollComm* c) {
  FakeNic* nic = fakeNic(c->dev);
  return nic ? &nic->egress : nullptr;
}

bool decideFromEnvironment() {
  const char* v = getenv("NCCL_MOELOOP_TRANSPORT");
  bool explicitCopy = v != nullptr && strcasecmp(v, "copy") == 0;
  if (v != nullptr && *v != '\0' && !explicitCopy) {
    if (strcasecmp(v, "socket") == 0) {
      ML_INFO(MOELOOP_LOG_INIT | MOELOOP_LOG_ENV, "GIN transport: sockets (NCCL_MOELOOP_TRANSPORT=socket)");
      return false;
    }
    ML_WARN("ignoring NCCL_MOELOOP_TRANSPORT=%s: expected copy or socket; using copy", v);
  }
  std::string why;
  if (defaultFamily() != kFamilyUnix)
    why = "descriptors need unix sockets (NCCL_MOELOOP_SOCKET=tcp)";
  else
    (void)cumemAvailable(&why);
  if (why.empty()) {
    ML_INFO(MOELOOP_LOG_INIT | MOELOOP_LOG_ENV, "GIN transport: copy engine between the processes' GPUs");
    return true;
  }
  if (explicitCopy)
    ML_WARN("GIN copy transport unavailable (%s): using sockets", why.c_str());
  else
    ML_INFO(MOELOOP_LOG_INIT | MOELOOP_LOG_ENV, "GIN copy transport unavailable (%s): using sockets", why.c_str());
  return false;
}

GinRequest* newInternal(GinCollComm* c, GinReqKind kind, GinRegistration* r, GinPeer& p) {
  GinRequest* q = ginAllocRequest(c);
  q->kind = kind;
  q->path = GinPath::kCopy;
  q->reg = r;
  GinWireHeader& h = q->hdr;
  h.magic = kGinWireMagic;
  h.seq = p.sendSeq++;
  h.dstRegId = r->id;
  h.dstRegSize = r->size;
  h.sigRegId = kNoRegistration;
  if (kind == GinReqKind::kAnnounce) {
    h.op = kGinMsgRegistration | (r->exportFd >= 0 ? (uint32_t)kGinMsgHasFd : 0u);
    h.dstOff = r->exportOffset;
    h.sigValue = r->exportMapSize;
  } else {
    h.op = kGinMsgDeregistration;
  }
  return q;
}

// Decides the path of put `r` to `peer`. *wait: the peer has not announced the destination yet.
ncclResult_t decide(GinCollComm* c, int peer, GinRequest* r, bool* wait) {
  *wait = false;
  GinPeer& p = c->peers[peer];
  const GinWireHeader& h = r->hdr;
  if (h.size == 0) {
    r->path = GinPath::kCopy;  // nothing to move: the header alone, in order
    return ncclSuccess;
  }
  if (r->src->type != NCCL_PTR_CUDA) {
    r->path = GinPath::kSocket;
    return ncclSuccess;
  }
  if (h.dstRegId >= p.remote.size()) {
    uint64_t now = nowNs();
    if (r->waitSinceNs == 0) r->waitSinceNs = now;
    if ((double)(now - r->waitSinceNs) * 1e-9 > registrationWaitSec())
      return ML_ERROR(ncclRemoteError,
                      "rank %d: rank %d has not announced registration %llu in %.0f s (%zu so far): "
                      "regMrSym calls differ between the ranks",
                      c->rank, peer, (unsigned long long)h.dstRegId, registrationWaitSec(), p.remote.size());
    *wait = true;
    return ncclSuccess;
  }
  const GinRemoteRegistration& rr = p.remote[h.dstRegId];
  if (!rr.live)
    return ML_ERROR(ncclInvalidArgument, "rank %d: put to registration %llu, which rank %d deregistered",
                    c->rank, (unsigned long long)h.dstRegId, peer);
  if (rr.size != h.dstRegSize)
    return ML_ERROR(ncclInvalidArgument, "rank %d: registration %llu is %zu bytes here but %llu bytes on "
                    "rank %d: regMrSym calls were not made in the same order on every rank",
                    c->rank, (unsigned long long)h.dstRegId, (size_t)h.dstRegSize,
                    (unsigned long long)rr.size, peer);
  if (rr.map.base == nullptr) {
    r->path = GinPath::kSocket;
    return ncclSuccess;
  }
  r->path = GinPath::kCopy;
  r->remoteId = h.dstRegId;
  r->copyDst = rr.map.base + rr.offset + h.dstOff;
  return ncclSuccess;
}

// Whether copy-path puts a and b write overlapping bytes of the same registration of the peer.
bool overlaps(const GinRequest& a, const GinRequest& b) {
  return a.remoteId == b.remoteId && a.hdr.dstOff < b.hdr.dstOff + b.hdr.size &&
         b.hdr.dstOff < a.hdr.dstOff + a.hdr.size;
}

// Picks put r's stream (the next one, round robin) and makes it wait for the puts
// ginCopyWaitsFor names.
ncclResult_t chooseStream(GinCollComm* c, GinPeer& p, GinRequest* r) {
  r->stream = p.nextStream;
  p.nextStream = (p.nextStream + 1) % kGinCopyStreams;
  if (p.streams[r->stream] == nullptr) ML_CHECK(ginStreamCreate(&c->cuda, &p.streams[r->stream]));
  void* stream = p.streams[r->stream];
  ML_CHECK(ginCopyWaitsFor(p, *r, ginTuning().overlapScanLimit, [&](const GinRequest* q) {
    return ginStreamWaitEvent(&c->cuda, stream, q->event);
  }));
  p.lastOnStream[r->stream] = r;
  return ncclSuccess;
}

// Hands as much of copy-path put `r` to the copy engine as the egress bucket grants.
// *complete: every byte issued and the event recorded.
ncclResult_t issue(GinCollComm* c, GinPeer& p, GinRequest* r, bool* complete) {
  *complete = false;
  const size_t size = r->hdr.size;
  if (size > 0 && r->issued == 0 && !r->streamChosen) {
    ML_CHECK(chooseStream(c, p, r));
    r->streamChosen = true;
  }
  void* stream = size > 0 ? p.streams[r->stream] : nullptr;
  TokenBucket* bucket = egressOf(c);
  const char* src = r->src ? r->src->base + r->srcOff : nullptr;
  while (r->issued < size) {
    if (!p.remote[r->remoteId].live)
      return ML_ERROR(ncclInvalidArgument, "rank %d: registration %llu was deregistered by its owner "
                      "while a put to it was in flight", c->rank, (unsigned long long)r->remoteId);
    size_t left = size - r->issued;
    size_t want = left < kCopyChunk ? left : kCopyChunk;
    size_t n = bucket ? bucket->take(want, kCopyMinGrant, nowNs()) : want;
    if (n == 0) return ncclSuccess;  // throttled
    if (r->issued == 0 && ginTuning().copyTiming) ML_CHECK(ginTimingEventRecord(&c->cuda, &r->timedStart, stream));
    ML_CHECK(ginCopyAsync(&c->cuda, stream, r->copyDst + r->issued, src + r->issued, n));
    r->issued += n;
  }
  if (size > 0 && !r->recorded) {
    if (ginTuning().copyTiming && r->timedStart != nullptr) {  // before `event`: done with it
      ML_CHECK(ginTimingEventRecord(&c->cuda, &r->timedEnd, stream));
      r->timed = true;
    }
    ML_CHECK(ginEventRecord(&c->cuda, &r->event, stream));
    r->recorded = true;
  }
  *complete = true;
  return ncclSuccess;
}

// Put r's own copies are seen complete: readyNs, and with copy timing their GPU time.
ncclResult_t markCopied(GinCollComm* c, GinRequest* r) {
  r->readyNs = nowNs();
  if (!r->timed) return ncclSuccess;
  r->timed = false;
  uint64_t ns = 0;
  ML_CHECK(ginTimingEventElapsed(&c->cuda, r->timedStart, r->timedEnd, &ns));
  Counters& k = counters();
  k.hopTimedPuts.fetch_add(1, std::memory_order_relaxed);
  k.hopCopyGpuNs.fetch_add(ns, std::memory_order_relaxed);
  return ncclSuccess;
}

void closeFds(std::vector<int>* fds) {
  for (int fd : *fds) close(fd);
  fds->clear();
}

}  // namespace

// With more than scanLimit puts in flight (thousands for per-token puts) it does not look at
// them: it names the latest put of every other stream instead (stronger, and O(streams) per put,
// but it orders the streams' copies one after the other). Requests are pooled, so those pointers
// stay valid; one reused since is either not recorded yet (its earlier copy is done: nothing to
// wait for) or recorded for a later put (a stronger wait).
ncclResult_t ginCopyWaitsFor(const GinPeer& p, const GinRequest& r, size_t scanLimit,
                             const std::function<ncclResult_t(const GinRequest*)>& wait) {
  if (scanLimit != 0 && p.issuedCount > scanLimit) {
    for (int k = 0; k < kGinCopyStreams; k++) {
      const GinRequest* q = p.lastOnStream[k];
      if (k != r.stream && q != nullptr && q->recorded && q->event != nullptr) ML_CHECK(wait(q));
    }
    return ncclSuccess;
  }
  for (size_t i = 0; i < p.issuedCount && i < p.sendQueue.size(); i++) {
    const GinRequest* q = p.sendQueue[i];
    if (q->kind != GinReqKind::kPut || q->path != GinPath::kCopy || q->hdr.size == 0 || !q->recorded ||
        q->stream == r.stream || !overlaps(*q, r))
      continue;
    ML_CHECK(wait(q));
  }
  return ncclSuccess;
}

bool ginCopyWanted() {
  int o = gCopyOverride.load();
  if (o >= 0) return o == 1;
  static const bool wanted = decideFromEnvironment();
  return wanted;
}

void setCopyTransportForTesting(int mode) { gCopyOverride.store(mode); }

ncclResult_t ginCopyAnnounce(GinCollComm* c, GinRegistration* r) {
  int peers = 0;
  for (int q = 0; q < c->nranks; q++) peers += q != c->rank && c->peers[q].copy;
  if (peers == 0) return ncclSuccess;
  if (r->type == NCCL_PTR_CUDA) {
    CuMemExport ex;
    std::string why;
    if (cumemExport(c->cuda.dev, r->base, r->size, &ex, &why)) {
      r->exportFd = ex.fd;
      r->exportOffset = ex.offset;
      r->exportMapSize = ex.mapSize;
      r->announcesLeft = peers;
    } else {
      ML_INFO(MOELOOP_LOG_NET, "GIN rank %d: registration %llu (%zu bytes) not exported (%s): puts to "
              "it go through sockets", c->rank, (unsigned long long)r->id, r->size, why.c_str());
    }
  }
  for (int q = 0; q < c->nranks; q++) {
    if (q == c->rank || !c->peers[q].copy) continue;
    c->peers[q].sendQueue.push_back(newInternal(c, GinReqKind::kAnnounce, r, c->peers[q]));
  }
  return ncclSuccess;
}

ncclResult_t ginCopyRetire(GinCollComm* c, GinRegistration* r) {
  for (int q = 0; q < c->nranks; q++) {
    if (q == c->rank || !c->peers[q].copy) continue;
    c->peers[q].sendQueue.push_back(newInternal(c, GinReqKind::kRetire, r, c->peers[q]));
  }
  return ncclSuccess;
}

ncclResult_t ginCopyIssue(GinCollComm* c, int peer) {
  GinPeer& p = c->peers[peer];
  while (p.issuedCount < p.sendQueue.size()) {
    GinRequest* r = p.sendQueue[p.issuedCount];
    if (r->kind == GinReqKind::kPut) {
      if (r->path == GinPath::kUndecided) {
        bool wait = false;
        ML_CHECK(decide(c, peer, r, &wait));
        if (wait) return ncclSuccess;
      }
      if (r->path == GinPath::kSocket) return ncclSuccess;  // goes alone, after everything earlier
      bool complete = false;
      ML_CHECK(issue(c, p, r, &complete));
      if (!complete) return ncclSuccess;
      r->issuedNs = nowNs();
      if (r->hdr.size == 0) r->readyNs = r->issuedNs;  // nothing to copy: ready (its latency runs)
    }
    p.issuedCount++;
  }
  return ncclSuccess;
}

// Stream order: a put's event completes after those of the puts issued before it on its stream,
// so a pass stops looking at a stream at its first pending put (at most kGinCopyStreams pending
// queries per pass) and stops altogether once every stream has one, or after kReadyPollWindow
// puts (later puts are stamped when they come within it; their headers wait for these anyway).
ncclResult_t ginCopyPollReady(GinCollComm* c, int peer) {
  constexpr size_t kReadyPollWindow = 256;
  GinPeer& p = c->peers[peer];
  bool pending[kGinCopyStreams] = {};
  int nPending = 0;
  size_t n = p.issuedCount < p.sendQueue.size() ? p.issuedCount : p.sendQueue.size();
  if (n > kReadyPollWindow) n = kReadyPollWindow;
  for (size_t i = 0; i < n && nPending < kGinCopyStreams; i++) {
    GinRequest* r = p.sendQueue[i];
    if (r->kind != GinReqKind::kPut || r->path != GinPath::kCopy || r->readyNs != 0 || r->hdr.size == 0 ||
        !r->recorded || pending[r->stream])
      continue;
    bool done = false;
    ML_CHECK(ginEventDone(r->event, &done));
    if (done) {
      ML_CHECK(markCopied(c, r));
    } else {
      pending[r->stream] = true;
      nPending++;
    }
  }
  return ncclSuccess;
}

ncclResult_t ginCopyFrontReady(GinCollComm* c, GinRequest* r, bool* ready) {
  *ready = false;
  if (r->kind != GinReqKind::kPut) {
    *ready = true;
    return ncclSuccess;
  }
  if (r->issued < r->hdr.size) return ncclSuccess;
  if (r->readyNs == 0) {
    bool done = true;
    if (r->hdr.size > 0) ML_CHECK(ginEventDone(r->event, &done));
    if (!done) return ncclSuccess;
    ML_CHECK(markCopied(c, r));
  }
  *ready = nowNs() >= messageReleaseNs(r->readyNs);
  return ncclSuccess;
}

void ginCopySent(GinCollComm* c, GinRequest* r) {
  (void)c;
  if (r->kind != GinReqKind::kAnnounce || r->reg->exportFd < 0) return;
  if (--r->reg->announcesLeft == 0) closeFd(&r->reg->exportFd);
}

ncclResult_t ginCopyOnMessage(GinCollComm* c, int peer, const GinWireHeader& h) {
  GinPeer& p = c->peers[peer];
  if (!p.copy)
    return ML_ERROR(ncclRemoteError, "rank %d: copy-transport message from rank %d, which did not offer it",
                    c->rank, peer);
  if (h.op & kGinMsgDeregistration) {
    if (h.dstRegId >= p.remote.size())
      return ML_ERROR(ncclRemoteError, "rank %d: rank %d retired registration %llu, never announced",
                      c->rank, peer, (unsigned long long)h.dstRegId);
    GinRemoteRegistration& rr = p.remote[h.dstRegId];
    rr.live = false;
    if (rr.map.base != nullptr) {
      for (void* s : p.streams)  // copies into it are done
        if (s != nullptr) ML_CHECK(ginStreamSync(&c->cuda, s));
      cumemUnmap(c->cuda.dev, &rr.map);
    }
    return ncclSuccess;
  }
  if (h.dstRegId != p.remote.size())
    return ML_ERROR(ncclRemoteError, "rank %d: rank %d announced registration %llu, expected %zu",
                    c->rank, peer, (unsigned long long)h.dstRegId, p.remote.size());
  GinRemoteRegistration rr;
  rr.size = h.dstRegSize;
  rr.offset = h.dstOff;
  if (h.op & kGinMsgHasFd) {
    if (p.fds.empty())
      return ML_ERROR(ncclRemoteError, "rank %d: rank %d's announcement of registration %llu came without "
                      "its descriptor", c->rank, peer, (unsigned long long)h.dstRegId);
    int fd = p.fds.front();
    p.fds.erase(p.fds.begin());
    std::string why;
    uint64_t mapSize = h.sigValue;
    if (rr.offset > mapSize || rr.size > mapSize - rr.offset)
      why = "the announced range exceeds the allocation";
    else
      (void)cumemImport(c->cuda.dev, fd, mapSize, &rr.map, &why);
    close(fd);
    if (rr.map.base == nullptr && !c->importWarned) {
      c->importWarned = true;
      ML_WARN("GIN rank %d: importing rank %d's registration %llu failed (%s): puts to it go through "
              "sockets (warned once per comm)", c->rank, peer, (unsigned long long)h.dstRegId, why.c_str());
    }
  }
  p.remote.push_back(rr);
  return ncclSuccess;
}

void ginCopyTeardown(GinCollComm* c) {
  for (GinPeer& p : c->peers) {
    for (void*& s : p.streams) {
      ginStreamDestroy(&c->cuda, s);  // waits for copies in flight first
      s = nullptr;
    }
    for (GinRequest*& q : p.lastOnStream) q = nullptr;
    for (GinRemoteRegistration& rr : p.remote) cumemUnmap(c->cuda.dev, &rr.map);
    p.remote.clear();
    closeFds(&p.fds);
    p.issuedCount = 0;
  }
  for (GinRequest* r : c->pool) {
    ginEventDestroy(&c->cuda, r->event);
    ginEventDestroy(&c->cuda, r->timedStart);
    ginEventDestroy(&c->cuda, r->timedEnd);
    r->event = r->timedStart = r->timedEnd = nullptr;
  }
  for (GinRegistration* r : c->regs) closeFd(&r->exportFd);
}

}  // namespace moeloop
