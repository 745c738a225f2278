// GIN connections and wire protocol of the moeloop plugin (see moeloop_gin.h for the design).
#include <errno.h>
#include <poll.h>
#include <string.h>
#include <unistd.h>
#include "moeloop_gin.h"
#include "moeloop_log.h"
#include "moeloop_net_props.h"
#include "moeloop_peer_stats.h"

namespace moeloop {
namespace {

TokenBucket* egressOf(const GinCollComm* c) {
  FakeNic* nic = fakeNic(c->dev);
  return nic ? &nic->egress : nullptr;
}
TokenBucket* ingressOf(const GinCollComm* c) {
  FakeNic* nic = fakeNic(c->dev);
  return nic ? &nic->ingress : nullptr;
}

enum class Lookup { kFound, kNotYet, kBad };

constexpr double kStallWarnSec = 10;
double gRegistrationWaitOverrideSec = 0;

// A message names a registration this rank has not made yet: normal for a moment (regMrSym does
// not synchronise ranks), suspicious after kStallWarnSec, an error after registrationWaitSec().
ncclResult_t waitForRegistration(GinCollComm* c, GinPeer& p, int peer) {
  uint64_t now = nowNs();
  if (p.stallSinceNs == 0) p.stallSinceNs = now;
  double waited = (double)(now - p.stallSinceNs) * 1e-9;
  if (waited > registrationWaitSec())
    return ML_ERROR(ncclRemoteError,
                    "rank %d: a put from rank %d names registration %llu/%llu, which this rank has "
                    "not made in %.0f s (%zu so far): regMrSym calls differ between the ranks",
                    c->rank, peer, (unsigned long long)p.rhdr.dstRegId,
                    (unsigned long long)p.rhdr.sigRegId, waited, c->regs.size());
  if (!p.stallWarned && waited > kStallWarnSec) {
    p.stallWarned = true;
    ML_WARN("rank %d: a put from rank %d has waited %.0f s for registration %llu/%llu, which this "
            "rank has not made (%zu so far): are regMrSym calls made in the same order everywhere?",
            c->rank, peer, kStallWarnSec, (unsigned long long)p.rhdr.dstRegId,
            (unsigned long long)p.rhdr.sigRegId, c->regs.size());
  }
  return ncclSuccess;
}

// Resolves registration `id` of this rank for an incoming message of rank `from`.
Lookup lookupRegistration(GinCollComm* c, int from, uint64_t id, uint64_t senderSize,
                          uint64_t off, uint64_t len, GinRegistration** out) {
  *out = nullptr;
  if (id == kNoRegistration) {
    ML_WARN("rank %d: message from rank %d names no registration", c->rank, from);
    return Lookup::kBad;
  }
  // regMrSym is collective but not synchronising: the sender may be ahead of us.
  if (id >= c->regs.size()) return Lookup::kNotYet;
  GinRegistration* r = c->regs[id];
  if (!r->live) {
    ML_WARN("rank %d: rank %d wrote to registration %llu, which this rank deregistered", c->rank,
            from, (unsigned long long)id);
    return Lookup::kBad;
  }
  if (r->size != senderSize) {
    ML_WARN("rank %d: registration %llu is %zu bytes here but %llu bytes on rank %d: regMrSym "
            "calls were not made in the same order on every rank",
            c->rank, (unsigned long long)id, r->size, (unsigned long long)senderSize, from);
    return Lookup::kBad;
  }
  if (off > r->size || len > r->size - off) {
    ML_WARN("rank %d: rank %d wrote %llu bytes at offset %llu of a %zu-byte registration",
            c->rank, from, (unsigned long long)len, (unsigned long long)off, r->size);
    return Lookup::kBad;
  }
  *out = r;
  return Lookup::kFound;
}

// Hop timing of a copy-path put whose header is out (moeloopStats_t: queue, copy, release).
void recordSentHops(const GinRequest& r) {
  const GinWireHeader& h = r.hdr;
  if (r.issuedNs < h.sendNs || r.readyNs < r.issuedNs || h.sentNs < r.readyNs) return;  // not stamped
  Counters& k = counters();
  k.hopSentPuts.fetch_add(1, std::memory_order_relaxed);
  k.hopQueueNs.fetch_add(r.issuedNs - h.sendNs, std::memory_order_relaxed);
  k.hopCopyNs.fetch_add(r.readyNs - r.issuedNs, std::memory_order_relaxed);
  k.hopReleaseNs.fetch_add(h.sentNs - r.readyNs, std::memory_order_relaxed);
}

// Target side of `puts` timed puts (moeloopStats_t: wire, apply), their signal written now (or
// none to write): wireNs summed, hdrNsSum = the sum of their header-read times.
void recordRecvHops(uint64_t puts, uint64_t wireNs, uint64_t hdrNsSum) {
  Counters& k = counters();
  k.hopRecvPuts.fetch_add(puts, std::memory_order_relaxed);
  k.hopWireNs.fetch_add(wireNs, std::memory_order_relaxed);
  k.hopApplyNs.fetch_add(puts * nowNs() - hdrNsSum, std::memory_order_relaxed);
}

// The front request is complete on the wire: counters, then done (a put) or freed (internal).
void finishFront(GinCollComm* c, GinPeer& p, int peer) {
  GinRequest* r = p.sendQueue.front();
  p.sendQueue.pop_front();
  if (p.issuedCount > 0) p.issuedCount--;
  if (r->kind != GinReqKind::kPut) {
    ginCopySent(c, r);
    ginFreeRequest(c, r);
    return;
  }
  const uint64_t size = r->hdr.size;
  const bool copied = r->path == GinPath::kCopy;
  counters().ginBytesSent.fetch_add(size, std::memory_order_relaxed);
  if (copied) {
    counters().ginBytesCopied.fetch_add(size, std::memory_order_relaxed);
    recordSentHops(*r);
  }
  peerStatsOnSend(peer, r->context, size, copied && size > 0,
                  (r->hdr.op & (kGinOpSignalInc | kGinOpSignalAdd)) != 0);
  r->state = GinReqState::kDone;
}

// Copy path and internal messages: the header alone (an announcement's fd with its first byte).
ncclResult_t sendHeaderOnly(GinCollComm* c, GinPeer& p, GinRequest* r, bool* finished) {
  *finished = false;
  if (r->hdrSent == 0) {
    bool ready = false;
    ML_CHECK(ginCopyFrontReady(c, r, &ready));
    if (!ready) return ncclSuccess;
    if (r->kind == GinReqKind::kPut) r->hdr.op |= kGinOpCopied;
  }
  if (r->hdrSent == 0) r->hdr.sentNs = nowNs();
  struct iovec iov;
  iov.iov_base = (char*)&r->hdr + r->hdrSent;
  iov.iov_len = sizeof(GinWireHeader) - r->hdrSent;
  int passFd = (r->hdrSent == 0 && (r->hdr.op & kGinMsgHasFd)) ? r->reg->exportFd : -1;
  size_t sent = 0;
  ML_CHECK(ioWritev(p.sendFd, &iov, 1, nullptr, &sent, passFd));
  r->hdrSent += sent;
  *finished = r->hdrSent == sizeof(GinWireHeader);
  return ncclSuccess;
}

// Copy transport: the headers of the leading header-only messages of `peer`'s queue (copy-path
// puts whose copies completed, signal-only puts, announcements without a descriptor,
// retirements) in one write instead of one write each. Stops at a message that is not ready,
// at a socket-path put and before a message passing a descriptor (that one goes alone, through
// sendHeaderOnly). *finished: messages completed; *stalled: the caller should stop for now.
constexpr size_t kMaxHeaderBatch = 64;
ncclResult_t sendHeaderBatch(GinCollComm* c, GinPeer& p, int peer, size_t* finished, bool* stalled) {
  *finished = 0;
  *stalled = false;
  GinWireHeader batch[kMaxHeaderBatch];
  size_t n = 0;
  const size_t limit = p.issuedCount < p.sendQueue.size() ? p.issuedCount : p.sendQueue.size();
  for (size_t i = 0; i < limit && n < kMaxHeaderBatch; i++) {
    GinRequest* r = p.sendQueue[i];
    if (r->path != GinPath::kCopy || r->hdrSent != 0 || (r->hdr.op & kGinMsgHasFd)) break;
    bool ready = false;
    ML_CHECK(ginCopyFrontReady(c, r, &ready));
    if (!ready) break;
    if (r->kind == GinReqKind::kPut) r->hdr.op |= kGinOpCopied;
    r->hdr.sentNs = nowNs();
    batch[n++] = r->hdr;
  }
  if (n == 0) {
    *stalled = true;
    return ncclSuccess;
  }
  struct iovec iov;
  iov.iov_base = batch;
  iov.iov_len = n * sizeof(GinWireHeader);
  size_t sent = 0;
  ML_CHECK(ioWritev(p.sendFd, &iov, 1, nullptr, &sent));
  for (size_t k = 0; k < sent / sizeof(GinWireHeader); k++) {
    p.sendQueue.front()->hdrSent = sizeof(GinWireHeader);
    finishFront(c, p, peer);
    (*finished)++;
  }
  // A header written in part continues through sendHeaderOnly (the bytes are the same).
  if (sent % sizeof(GinWireHeader) != 0) p.sendQueue.front()->hdrSent = sent % sizeof(GinWireHeader);
  *stalled = sent < iov.iov_len;
  return ncclSuccess;
}

// Socket path: header and payload through the socket, GPU payloads staged through sendBounce.
ncclResult_t sendThroughSocket(GinCollComm* c, GinPeer& p, GinRequest* r, bool* finished, bool* stalled) {
  *finished = *stalled = false;
  TokenBucket* bucket = egressOf(c);
  size_t size = r->hdr.size;
  struct iovec iov[2];
  iov[0].iov_base = (char*)&r->hdr + r->hdrSent;
  iov[0].iov_len = sizeof(GinWireHeader) - r->hdrSent;
  iov[1].iov_base = nullptr;
  iov[1].iov_len = 0;
  if (r->payloadSent < size) {
    char* src = r->src->base + r->srcOff;
    if (r->src->type == NCCL_PTR_HOST) {
      iov[1].iov_base = src + r->payloadSent;
      iov[1].iov_len = size - r->payloadSent;
    } else {
      if (r->payloadSent >= p.stagedEnd) {  // stage the next chunk of GPU memory
        if (p.sendBounce == nullptr) ML_CHECK(ginPinnedAlloc(&c->cuda, kGinBounceBytes, &p.sendBounce));
        size_t n = size - r->payloadSent < kGinBounceBytes ? size - r->payloadSent : kGinBounceBytes;
        ML_CHECK(ginCopy(&c->cuda, p.sendBounce, src + r->payloadSent, n));
        p.stagedBegin = r->payloadSent;
        p.stagedEnd = r->payloadSent + n;
      }
      iov[1].iov_base = p.sendBounce + (r->payloadSent - p.stagedBegin);
      iov[1].iov_len = p.stagedEnd - r->payloadSent;
    }
  }
  size_t sent = 0;
  ML_CHECK(ioWritev(p.sendFd, iov, 2, bucket, &sent));
  size_t h = sent < iov[0].iov_len ? sent : iov[0].iov_len;
  r->hdrSent += h;
  r->payloadSent += sent - h;
  if (r->hdrSent == sizeof(GinWireHeader) && r->payloadSent == size) {
    p.stagedBegin = p.stagedEnd = 0;
    *finished = true;
  }
  *stalled = sent == 0;  // socket full or throttled
  return ncclSuccess;
}

ncclResult_t progressSend(GinCollComm* c, int peer) {
  GinPeer& p = c->peers[peer];
  if (p.copy) {
    ML_CHECK(ginCopyIssue(c, peer));
    ML_CHECK(ginCopyPollReady(c, peer));
  }
  while (!p.sendQueue.empty()) {
    GinRequest* r = p.sendQueue.front();
    bool finished = false, stalled = false;
    if (r->path == GinPath::kSocket) {
      ML_CHECK(sendThroughSocket(c, p, r, &finished, &stalled));
    } else if (r->path == GinPath::kCopy && p.issuedCount > 0 && r->hdrSent == 0 &&
               !(r->hdr.op & kGinMsgHasFd)) {
      size_t done = 0;
      ML_CHECK(sendHeaderBatch(c, p, peer, &done, &stalled));
      if (stalled) break;
      continue;
    } else if (r->path == GinPath::kCopy && p.issuedCount > 0) {
      ML_CHECK(sendHeaderOnly(c, p, r, &finished));
      stalled = !finished;
    } else {
      stalled = true;  // its path is not decided yet (waiting for the peer's announcement)
    }
    if (finished) {
      finishFront(c, p, peer);
      continue;
    }
    if (stalled) break;
  }
  return ncclSuccess;
}

ncclResult_t progressRecv(GinCollComm* c, int peer) {
  GinPeer& p = c->peers[peer];
  TokenBucket* bucket = ingressOf(c);
  for (;;) {
    if (p.rhdrGot < sizeof(GinWireHeader)) {
      size_t got = 0;
      bool eof = false;
      ML_CHECK(ioRead(p.recvFd, (char*)&p.rhdr + p.rhdrGot, sizeof(GinWireHeader) - p.rhdrGot,
                      nullptr, &got, &eof, &p.fds));
      p.rhdrGot += got;
      if (eof && p.rhdrGot == 0) {
        p.recvClosed = true;  // the peer closed between messages: its comm is going away
        return ncclSuccess;
      }
      if (eof && p.rhdrGot < sizeof(GinWireHeader))
        return ML_ERROR(ncclRemoteError, "rank %d: rank %d closed its connection inside a header",
                        c->rank, peer);
      if (p.rhdrGot < sizeof(GinWireHeader)) return ncclSuccess;
      p.rhdrNs = nowNs();
      if (p.rhdr.magic != kGinWireMagic || p.rhdr.seq != p.recvSeq)
        return ML_ERROR(ncclInternalError,
                        "rank %d: corrupt header from rank %d (magic %x, seq %llu, expected %llu)",
                        c->rank, peer, p.rhdr.magic, (unsigned long long)p.rhdr.seq,
                        (unsigned long long)p.recvSeq);
      if (p.rhdr.size > kMaxMessageBytes)
        return ML_ERROR(ncclRemoteError, "rank %d: rank %d announced a %llu-byte put (maximum %zu)",
                        c->rank, peer, (unsigned long long)p.rhdr.size, kMaxMessageBytes);
      if (p.rhdr.op & (kGinMsgRegistration | kGinMsgDeregistration)) {
        ML_CHECK(ginCopyOnMessage(c, peer, p.rhdr));
        p.rhdrGot = 0;
        p.recvSeq++;
        continue;
      }
    }
    const GinWireHeader& h = p.rhdr;
    const bool copied = (h.op & kGinOpCopied) != 0;
    if (!p.inMessage) {
      p.rdst = p.rsig = nullptr;
      if (h.size > 0) {
        Lookup l = lookupRegistration(c, peer, h.dstRegId, h.dstRegSize, h.dstOff, h.size, &p.rdst);
        if (l == Lookup::kNotYet) return waitForRegistration(c, p, peer);  // retried later
        if (l == Lookup::kBad) return ML_ERROR(ncclRemoteError, "rank %d: invalid put from rank %d", c->rank, peer);
      }
      if (h.op & (kGinOpSignalInc | kGinOpSignalAdd)) {
        if (h.sigOff % sizeof(uint64_t) != 0)
          return ML_ERROR(ncclRemoteError, "rank %d: misaligned signal offset %llu from rank %d",
                          c->rank, (unsigned long long)h.sigOff, peer);
        Lookup l = lookupRegistration(c, peer, h.sigRegId, h.sigRegSize, h.sigOff,
                                      sizeof(uint64_t), &p.rsig);
        if (l == Lookup::kNotYet) return waitForRegistration(c, p, peer);
        if (l == Lookup::kBad) return ML_ERROR(ncclRemoteError, "rank %d: invalid signal from rank %d", c->rank, peer);
      }
      p.stallSinceNs = 0;
      p.inMessage = true;
      p.rgot = p.rflushed = copied ? h.size : 0;  // a copied payload is in place already
    }
    while (p.rgot < h.size) {
      char* dst = p.rdst->base + h.dstOff;
      size_t got = 0;
      bool eof = false;
      if (p.rdst->type == NCCL_PTR_HOST) {
        ML_CHECK(ioRead(p.recvFd, dst + p.rgot, h.size - p.rgot, bucket, &got, &eof));
        p.rgot += got;
        p.rflushed = p.rgot;
      } else {
        if (p.recvBounce == nullptr) ML_CHECK(ginPinnedAlloc(&c->cuda, kGinBounceBytes, &p.recvBounce));
        size_t chunkEnd = h.size - p.rflushed < kGinBounceBytes ? h.size : p.rflushed + kGinBounceBytes;
        ML_CHECK(ioRead(p.recvFd, p.recvBounce + (p.rgot - p.rflushed), chunkEnd - p.rgot, bucket, &got, &eof));
        p.rgot += got;
        if (p.rgot == chunkEnd) {
          ML_CHECK(ginCopy(&c->cuda, dst + p.rflushed, p.recvBounce, chunkEnd - p.rflushed));
          p.rflushed = chunkEnd;
        }
      }
      if (eof && p.rgot < h.size)
        return ML_ERROR(ncclRemoteError, "rank %d: rank %d closed its connection inside a %llu-byte put",
                        c->rank, peer, (unsigned long long)h.size);
      if (got == 0) return ncclSuccess;
    }
    // Latency shaping (the sender has applied it to copied puts).
    if (!copied && deliveryDeadline(h.sendNs) > nowNs()) return ncclSuccess;
    // The payload is in place (copies are synchronous, or the sender saw its copies complete):
    // now the signal may become visible. Coalesced (NCCL_MOELOOP_COALESCE=1): written at the
    // latest at the end of this pass, and the put's hops are recorded then.
    const bool timed = copied && h.sentNs != 0 && p.rhdrNs >= h.sentNs;
    if (p.rsig && ginTuning().coalesceSignals) {
      ML_CHECK(ginQueueSignal(c, p.rsig, h.sigOff, h.op, h.sigValue, timed ? p.rhdrNs : 0,
                              timed ? p.rhdrNs - h.sentNs : 0));
    } else {
      if (p.rsig) ML_CHECK(ginApplySignal(c, p.rsig, h.sigOff, h.op, h.sigValue));
      if (timed) recordRecvHops(1, p.rhdrNs - h.sentNs, p.rhdrNs);
    }
    counters().ginBytesApplied.fetch_add(h.size, std::memory_order_relaxed);
    peerStatsOnApply(peer, (int)h.context, h.size, p.rsig != nullptr);
    p.inMessage = false;
    p.rhdrGot = 0;
    p.recvSeq++;
  }
}

}  // namespace

double registrationWaitSec() {
  return gRegistrationWaitOverrideSec > 0 ? gRegistrationWaitOverrideSec : connectTimeoutSec();
}

void setRegistrationWaitForTesting(double sec) { gRegistrationWaitOverrideSec = sec; }

ncclResult_t ginFail(GinCollComm* c, ncclResult_t res) {
  if (res == ncclSuccess) return res;
  if (c->error == ncclSuccess) {
    c->error = res;
    ML_WARN("rank %d: GIN collComm failed (error %d); every later call on it fails", c->rank, (int)res);
  }
  for (GinPeer& p : c->peers) {
    for (GinRequest* r : p.sendQueue) {
      r->state = GinReqState::kError;
      r->error = res;
    }
    p.sendQueue.clear();
    p.issuedCount = 0;
  }
  return res;
}

namespace {

uint64_t signalAddOf(uint32_t op, uint64_t value) { return (op & kGinOpSignalInc) ? 1 : value; }

ncclResult_t addToSignal(GinCollComm* c, GinRegistration* sig, uint64_t sigOff, uint64_t add) {
  uint64_t* word = (uint64_t*)(sig->base + sigOff);
  if (sig->type == NCCL_PTR_CUDA && !sig->sigShadow.empty()) {
    ML_CHECK(ginDeviceAddShadowed(&c->cuda, word, &sig->sigShadow[sigOff / sizeof(uint64_t)], add));
  } else if (sig->type == NCCL_PTR_CUDA) {
    ML_CHECK(ginDeviceAdd(&c->cuda, word, add));
  } else {
    __atomic_fetch_add(word, add, __ATOMIC_SEQ_CST);
  }
  return ncclSuccess;
}

}  // namespace

ncclResult_t ginFlushSignal(GinCollComm* c) {
  if (c->pendingSig == nullptr) return ncclSuccess;
  GinRegistration* sig = c->pendingSig;
  const uint64_t puts = c->pendingHopPuts, wireNs = c->pendingHopWireNs, hdrNs = c->pendingHopHdrNs;
  c->pendingSig = nullptr;
  c->pendingHopPuts = c->pendingHopWireNs = c->pendingHopHdrNs = 0;
  ML_CHECK(addToSignal(c, sig, c->pendingSigOff, c->pendingSigAdd));
  counters().ginSignalWrites.fetch_add(1, std::memory_order_relaxed);
  if (puts > 0) recordRecvHops(puts, wireNs, hdrNs);
  return ncclSuccess;
}

ncclResult_t ginApplySignal(GinCollComm* c, GinRegistration* sig, uint64_t sigOff, uint32_t op,
                            uint64_t value) {
  ML_CHECK(ginFlushSignal(c));
  ML_CHECK(addToSignal(c, sig, sigOff, signalAddOf(op, value)));
  counters().ginSignals.fetch_add(1, std::memory_order_relaxed);
  counters().ginSignalWrites.fetch_add(1, std::memory_order_relaxed);
  return ncclSuccess;
}

ncclResult_t ginQueueSignal(GinCollComm* c, GinRegistration* sig, uint64_t sigOff, uint32_t op,
                            uint64_t value, uint64_t hdrNs, uint64_t wireNs) {
  counters().ginSignals.fetch_add(1, std::memory_order_relaxed);
  if (c->pendingSig != sig || c->pendingSigOff != sigOff) {
    ML_CHECK(ginFlushSignal(c));
    c->pendingSig = sig;
    c->pendingSigOff = sigOff;
    c->pendingSigAdd = 0;
  }
  c->pendingSigAdd += signalAddOf(op, value);
  if (hdrNs != 0) {
    c->pendingHopPuts++;
    c->pendingHopWireNs += wireNs;
    c->pendingHopHdrNs += hdrNs;
  }
  return ncclSuccess;
}

namespace {

ncclResult_t progressPassLocked(GinCollComm* c) {
  if (c->error != ncclSuccess) return c->error;
  for (int peer = 0; peer < c->nranks; peer++) {
    if (peer == c->rank || c->peers[peer].sendQueue.empty()) continue;
    ncclResult_t res = progressSend(c, peer);
    if (res != ncclSuccess) return ginFail(c, res);
  }
  // One poll over the incoming connections instead of a read attempt on each.
  c->pollSet.clear();
  for (int peer = 0; peer < c->nranks; peer++) {
    const GinPeer& p = c->peers[peer];
    if (peer == c->rank || p.recvFd < 0 || p.recvClosed) continue;
    c->pollSet.push_back(pollfd{p.recvFd, POLLIN, 0});
  }
  if (c->pollSet.empty()) return ncclSuccess;
  int n = ::poll(c->pollSet.data(), c->pollSet.size(), 0);
  if (n < 0 && errno != EINTR) return ginFail(c, ML_ERROR(ncclSystemError, "poll() failed: %s", strerror(errno)));
  size_t k = 0;
  for (int peer = 0; peer < c->nranks; peer++) {
    GinPeer& p = c->peers[peer];
    if (peer == c->rank || p.recvFd < 0 || p.recvClosed) continue;
    bool ready = n > 0 && c->pollSet[k].revents != 0;
    k++;
    // A message whose header is in may wait for a registration, its payload or its deadline.
    if (!ready && p.rhdrGot < sizeof(GinWireHeader)) continue;
    ncclResult_t res = progressRecv(c, peer);
    if (res != ncclSuccess) return ginFail(c, res);
  }
  ncclResult_t res = ginFlushSignal(c);  // the pass's last update: visible before it returns
  return res == ncclSuccess ? res : ginFail(c, res);
}

}  // namespace

ncclResult_t ginProgressLocked(GinCollComm* c) {
  ncclResult_t res = progressPassLocked(c);
  // When the pass ended, not when it began: a pass (a poll, event queries, signal writes) often
  // takes longer than test()'s gap, which then ran a whole pass for every request NCCL tests.
  c->lastProgressNs = nowNs();
  return res;
}

ncclResult_t ginConnectMesh(GinCollComm* c, GinListenComm* l, void* handles[]) {
  int n = c->nranks;
  std::vector<Connector> out(n);
  std::vector<const GinHandle*> hs(n, nullptr);
  int missingOut = n - 1, missingIn = n - 1;
  for (int r = 0; r < n; r++) {
    if (r == c->rank) continue;
    hs[r] = (const GinHandle*)handles[r];
    if (hs[r] == nullptr || hs[r]->magic != kGinHandleMagic)
      return ML_ERROR(ncclInvalidArgument, "rank %d: connect with a foreign handle for rank %d", c->rank, r);
    out[r].hello.magic = kHelloMagic;
    out[r].hello.nonce = hs[r]->nonce;
    out[r].hello.kind = kHelloGin;
    out[r].hello.rank = (uint32_t)c->rank;
    out[r].hello.nranks = (uint32_t)n;
    out[r].hello.flags = c->copyWanted ? (uint32_t)kHelloFlagCopy : 0u;
  }
  uint64_t t0 = nowNs();
  ncclResult_t res = ncclSuccess;
  while (missingOut > 0 || missingIn > 0) {
    bool progressed = false;
    for (int r = 0; r < n && res == ncclSuccess; r++) {
      if (r == c->rank || c->peers[r].sendFd >= 0) continue;
      bool done = false;
      res = connectProgress(&out[r], hs[r]->addr, &done);
      if (done) {
        c->peers[r].sendFd = out[r].fd;
        out[r].fd = -1;
        missingOut--;
        progressed = true;
      }
    }
    for (int fd = 0; res == ncclSuccess && missingIn > 0;) {
      Hello hello;
      res = l->acceptor.poll(l->fd, l->nonce, &fd, &hello);
      if (res != ncclSuccess || fd < 0) break;
      int from = (int)hello.rank;
      if (hello.kind != kHelloGin || (int)hello.nranks != n || from < 0 || from >= n ||
          from == c->rank || c->peers[from].recvFd >= 0) {
        close(fd);
        res = ML_ERROR(ncclInternalError, "rank %d: unexpected GIN connection (kind %u, rank %u of %u)",
                       c->rank, hello.kind, hello.rank, hello.nranks);
        break;
      }
      c->peers[from].recvFd = fd;
      c->peers[from].copy = c->copyWanted && (hello.flags & kHelloFlagCopy) != 0;
      missingIn--;
      progressed = true;
    }
    if (res == ncclSuccess && (double)(nowNs() - t0) * 1e-9 > connectTimeoutSec())
      res = ML_ERROR(ncclRemoteError, "rank %d: GIN connect timed out (%d outgoing, %d incoming missing)",
                     c->rank, missingOut, missingIn);
    if (res != ncclSuccess) break;
    if (!progressed) usleep(100);
  }
  for (Connector& k : out) closeFd(&k.fd);
  return res;
}

void ginCloseMesh(GinCollComm* c) {
  for (GinPeer& p : c->peers) {
    closeFd(&p.sendFd);
    closeFd(&p.recvFd);
    ginPinnedFree(p.sendBounce);
    ginPinnedFree(p.recvBounce);
    p.sendBounce = p.recvBounce = nullptr;
  }
}

}  // namespace moeloop
