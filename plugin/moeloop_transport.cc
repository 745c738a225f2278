// NET transport of the moeloop plugin (see moeloop_transport.h).
#include "moeloop_transport.h"

#include <mutex>
#include <string.h>
#include <unistd.h>
#include <unordered_map>
#include "moeloop_log.h"
#include "moeloop_net_props.h"

namespace moeloop {
namespace {

TokenBucket* egressOf(const NetComm* c) {
  FakeNic* nic = fakeNic(c->dev);
  return nic ? &nic->egress : nullptr;
}
TokenBucket* ingressOf(const NetComm* c) {
  FakeNic* nic = fakeNic(c->dev);
  return nic ? &nic->ingress : nullptr;
}

NetRequest* allocRequest(NetComm* c) {
  NetRequest* r;
  if (!c->freeList.empty()) {
    r = c->freeList.back();
    c->freeList.pop_back();
  } else {
    if (c->pool.size() >= kMaxRequestsPerComm) return nullptr;
    r = new NetRequest();
    c->pool.push_back(r);
  }
  memset(r, 0, sizeof(*r));
  r->magic = kRequestMagic;
  r->comm = c;
  r->isSend = c->isSend;
  r->state = ReqState::kQueued;
  r->error = ncclSuccess;
  return r;
}

void releaseRequest(NetRequest* r) {
  r->state = ReqState::kFree;
  r->comm->freeList.push_back(r);
}

// Marks the comm failed and fails every queued request with `res`.
ncclResult_t failComm(NetComm* c, ncclResult_t res) {
  if (c->error == ncclSuccess) c->error = res;
  for (NetRequest* r : c->queue) {
    r->state = ReqState::kError;
    r->error = res;
  }
  c->queue.clear();
  return res;
}

ncclResult_t progressSend(NetComm* c) {
  TokenBucket* bucket = egressOf(c);
  while (!c->queue.empty()) {
    NetRequest* r = c->queue.front();
    struct iovec iov[2];
    iov[0].iov_base = (char*)&r->hdr + r->hdrMoved;
    iov[0].iov_len = sizeof(MessageHeader) - r->hdrMoved;
    iov[1].iov_base = r->data + r->moved;
    iov[1].iov_len = r->capacity - r->moved;
    size_t sent = 0;
    ncclResult_t res = ioWritev(c->fd, iov, 2, bucket, &sent);
    if (res != ncclSuccess) return failComm(c, res);
    size_t h = sent < iov[0].iov_len ? sent : iov[0].iov_len;
    r->hdrMoved += h;
    r->moved += sent - h;
    if (r->hdrMoved == sizeof(MessageHeader) && r->moved == r->capacity) {
      r->state = ReqState::kDone;
      c->queue.pop_front();
      counters().netMsgsSent.fetch_add(1, std::memory_order_relaxed);
      counters().netBytesSent.fetch_add(r->capacity, std::memory_order_relaxed);
      continue;
    }
    if (sent == 0) break;  // socket full or throttled
  }
  return ncclSuccess;
}

ncclResult_t peerClosed(NetComm* c, const NetRequest* r) {
  c->peerClosed = true;
  return failComm(c, ML_ERROR(ncclRemoteError,
                              "peer closed the connection with %zu receive(s) pending "
                              "(message %llu: %zu of %zu header bytes, %zu of %zu payload bytes)",
                              c->queue.size(), (unsigned long long)c->seq, r->hdrMoved,
                              sizeof(MessageHeader), r->moved, r->msgSize));
}

ncclResult_t progressRecv(NetComm* c) {
  TokenBucket* bucket = ingressOf(c);
  while (!c->queue.empty()) {
    NetRequest* r = c->queue.front();
    if (r->hdrMoved < sizeof(MessageHeader)) {
      size_t got = 0;
      bool eof = false;
      ncclResult_t res = ioRead(c->fd, (char*)&r->hdr + r->hdrMoved,
                                sizeof(MessageHeader) - r->hdrMoved, nullptr, &got, &eof);
      if (res != ncclSuccess) return failComm(c, res);
      r->hdrMoved += got;
      if (eof && r->hdrMoved < sizeof(MessageHeader)) return peerClosed(c, r);
      if (r->hdrMoved < sizeof(MessageHeader)) break;
      if (r->hdr.magic != kMessageMagic || r->hdr.seq != c->seq)
        return failComm(c, ML_ERROR(ncclInternalError,
                                    "corrupt message header (magic %x, seq %llu, expected %llu)",
                                    r->hdr.magic, (unsigned long long)r->hdr.seq,
                                    (unsigned long long)c->seq));
      if (r->hdr.size > kMaxMessageBytes)
        return failComm(c, ML_ERROR(ncclRemoteError, "message %llu announces %llu bytes (maximum %zu)",
                                    (unsigned long long)c->seq, (unsigned long long)r->hdr.size,
                                    kMaxMessageBytes));
      if (r->hdr.size > r->capacity)
        return failComm(c, ML_ERROR(ncclInvalidUsage,
                                    "message %llu of %llu bytes does not fit the posted receive "
                                    "of %zu bytes",
                                    (unsigned long long)c->seq, (unsigned long long)r->hdr.size,
                                    r->capacity));
      r->msgSize = r->hdr.size;
      r->deadlineNs = deliveryDeadline(r->hdr.sendNs);
      c->seq++;
    }
    if (r->moved < r->msgSize) {
      size_t got = 0;
      bool eof = false;
      ncclResult_t res = ioRead(c->fd, r->data + r->moved, r->msgSize - r->moved, bucket, &got, &eof);
      if (res != ncclSuccess) return failComm(c, res);
      r->moved += got;
      if (eof && r->moved < r->msgSize) return peerClosed(c, r);
      if (r->moved < r->msgSize) break;
    }
    if (r->deadlineNs > nowNs()) break;  // latency shaping: not yet delivered
    r->state = ReqState::kDone;
    c->queue.pop_front();
    counters().netMsgsRecv.fetch_add(1, std::memory_order_relaxed);
    counters().netBytesRecv.fetch_add(r->msgSize, std::memory_order_relaxed);
  }
  return ncclSuccess;
}

NetComm* newComm(bool isSend, int fd, int dev) {
  NetComm* c = new NetComm();
  c->magic = isSend ? kSendCommMagic : kRecvCommMagic;
  c->isSend = isSend;
  c->fd = fd;
  c->dev = dev;
  counters().netConnections.fetch_add(1, std::memory_order_relaxed);
  return c;
}

bool validComm(const NetComm* c, bool isSend) {
  return c != nullptr && c->magic == (isSend ? kSendCommMagic : kRecvCommMagic);
}

// Connections in progress of this process, by the id stored in NCCL's handle.
struct PendingConnect {
  Connector* connector;
  uint64_t nonce;        // of the handle that started it
  SocketAddress addr;
};
struct PendingTable {
  std::mutex mu;
  std::unordered_map<uint64_t, PendingConnect> byId;
  uint64_t nextId = 1;
};
PendingTable& pendingTable() {
  static PendingTable t;
  return t;
}

// The connector of handle `h`: a new one when h->pendingId is 0, else the table's entry, which
// must have been started by a handle with the same nonce and address.
ncclResult_t pendingConnector(NetHandle* h, Connector** out) {
  *out = nullptr;
  PendingTable& t = pendingTable();
  std::lock_guard<std::mutex> lock(t.mu);
  if (h->pendingId == 0) {
    Connector* c = new Connector();
    c->hello.magic = kHelloMagic;
    c->hello.nonce = h->nonce;
    c->hello.kind = kHelloNet;
    uint64_t id = t.nextId++;
    t.byId[id] = PendingConnect{c, h->nonce, h->addr};
    h->pendingId = id;
    *out = c;
    return ncclSuccess;
  }
  auto it = t.byId.find(h->pendingId);
  if (it == t.byId.end() || it->second.nonce != h->nonce ||
      memcmp(&it->second.addr, &h->addr, sizeof(SocketAddress)) != 0)
    return ML_ERROR(ncclInvalidArgument, "connect with a handle naming connection %llu, which this "
                    "process did not start from that handle", (unsigned long long)h->pendingId);
  *out = it->second.connector;
  return ncclSuccess;
}

void releaseConnector(NetHandle* h) {
  PendingTable& t = pendingTable();
  std::lock_guard<std::mutex> lock(t.mu);
  auto it = t.byId.find(h->pendingId);
  if (it != t.byId.end()) {
    delete it->second.connector;
    t.byId.erase(it);
  }
  h->pendingId = 0;
}

}  // namespace

ncclResult_t netListen(int dev, void* handle, NetListenComm** out) {
  *out = nullptr;
  if (fakeNic(dev) == nullptr) return ML_ERROR(ncclInvalidArgument, "listen on unknown device %d", dev);
  NetListenComm* l = new NetListenComm();
  l->magic = kListenCommMagic;
  l->dev = dev;
  ncclResult_t res = openListenHandle(kNetHandleMagic, handle, &l->fd, &l->nonce);
  if (res != ncclSuccess) {
    delete l;
    return res;
  }
  *out = l;
  return ncclSuccess;
}

ncclResult_t netConnect(int dev, void* handle, NetComm** out) {
  *out = nullptr;
  NetHandle* h = (NetHandle*)handle;
  if (h == nullptr || h->magic != kNetHandleMagic)
    return ML_ERROR(ncclInvalidArgument, "connect with a handle that moeloop did not create");
  if (fakeNic(dev) == nullptr) return ML_ERROR(ncclInvalidArgument, "connect on unknown device %d", dev);
  Connector* pending = nullptr;
  ML_CHECK(pendingConnector(h, &pending));
  bool done = false;
  ncclResult_t res = connectProgress(pending, h->addr, &done);
  if (res != ncclSuccess || done) {
    int fd = pending->fd;
    pending->fd = -1;
    releaseConnector(h);
    if (res != ncclSuccess) {
      closeFd(&fd);
      return res;
    }
    *out = newComm(true, fd, dev);
  }
  return ncclSuccess;
}

ncclResult_t netAccept(NetListenComm* l, NetComm** out) {
  *out = nullptr;
  if (l == nullptr || l->magic != kListenCommMagic)
    return ML_ERROR(ncclInvalidArgument, "accept on an invalid listen comm");
  int fd = -1;
  Hello hello;
  ML_CHECK(l->acceptor.poll(l->fd, l->nonce, &fd, &hello));
  if (fd < 0) return ncclSuccess;
  if (hello.kind != kHelloNet) {
    close(fd);
    return ML_ERROR(ncclInternalError, "a GIN connection reached a NET listener");
  }
  *out = newComm(false, fd, l->dev);
  return ncclSuccess;
}

ncclResult_t netIsend(NetComm* c, const void* data, size_t size, NetRequest** req) {
  *req = nullptr;
  if (!validComm(c, true)) return ML_ERROR(ncclInvalidArgument, "isend on an invalid send comm");
  if (c->error != ncclSuccess) return c->error;
  if (size > 0 && data == nullptr) return ML_ERROR(ncclInvalidArgument, "isend of %zu bytes from NULL", size);
  if (size > kMaxMessageBytes)
    return ML_ERROR(ncclInvalidArgument, "isend of %zu bytes exceeds the plugin's maximum of %zu "
                    "(maxP2pBytes)", size, kMaxMessageBytes);
  NetRequest* r = allocRequest(c);
  if (r == nullptr) return ncclSuccess;
  r->data = (char*)data;
  r->capacity = size;
  r->hdr.magic = kMessageMagic;
  r->hdr.size = size;
  r->hdr.sendNs = nowNs();
  r->hdr.seq = c->seq++;
  c->queue.push_back(r);
  *req = r;
  return progressSend(c);
}

ncclResult_t netIrecv(NetComm* c, void* data, size_t size, NetRequest** req) {
  *req = nullptr;
  if (!validComm(c, false)) return ML_ERROR(ncclInvalidArgument, "irecv on an invalid receive comm");
  if (c->error != ncclSuccess) return c->error;
  if (size > 0 && data == nullptr) return ML_ERROR(ncclInvalidArgument, "irecv of %zu bytes into NULL", size);
  NetRequest* r = allocRequest(c);
  if (r == nullptr) return ncclSuccess;
  r->data = (char*)data;
  r->capacity = size;
  c->queue.push_back(r);
  *req = r;
  return progressRecv(c);
}

ncclResult_t netProgress(NetComm* c) {
  if (c->error != ncclSuccess) return c->error;
  return c->isSend ? progressSend(c) : progressRecv(c);
}

ncclResult_t netTest(NetRequest* r, int* done, size_t* size) {
  *done = 0;
  if (r == nullptr || r->magic != kRequestMagic || r->state == ReqState::kFree)
    return ML_ERROR(ncclInvalidArgument, "test of an invalid request");
  if (r->state == ReqState::kQueued) {
    ncclResult_t res = netProgress(r->comm);
    if (res != ncclSuccess && r->state == ReqState::kQueued) return res;
  }
  if (r->state == ReqState::kError) return r->error;
  if (r->state == ReqState::kDone) {
    *done = 1;
    if (size) *size = r->isSend ? r->capacity : r->msgSize;
    releaseRequest(r);
  }
  return ncclSuccess;
}

ncclResult_t netClose(NetComm* c) {
  if (c == nullptr) return ncclSuccess;
  if (c->magic != kSendCommMagic && c->magic != kRecvCommMagic)
    return ML_ERROR(ncclInvalidArgument, "close of an invalid comm");
  if (c->isSend && !c->queue.empty() && c->error == ncclSuccess)
    ML_INFO(MOELOOP_LOG_NET, "closing a send comm with %zu message(s) not fully sent", c->queue.size());
  closeFd(&c->fd);
  for (NetRequest* r : c->pool) {
    r->magic = 0;
    delete r;
  }
  c->magic = 0;
  delete c;
  return ncclSuccess;
}

ncclResult_t netCloseListen(NetListenComm* l) {
  if (l == nullptr) return ncclSuccess;
  if (l->magic != kListenCommMagic) return ML_ERROR(ncclInvalidArgument, "close of an invalid listen comm");
  l->acceptor.closeAll();
  closeFd(&l->fd);
  l->magic = 0;
  delete l;
  return ncclSuccess;
}

}  // namespace moeloop
