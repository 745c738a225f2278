// Local stream sockets of the moeloop plugin (see moeloop_socket.h).
#include "moeloop_socket.h"

#include <atomic>
#include <errno.h>
#include <limits.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include "moeloop_log.h"

namespace moeloop {
namespace {

std::atomic<size_t> gIoLimit{0};
std::atomic<uint32_t> gFamilyOverride{0};
std::atomic<uint32_t> gListenerCounter{0};

int socketBufferBytes() {
  static const int bytes = [] {
    const char* v = getenv("NCCL_MOELOOP_SOCKBUF");
    long b = v ? strtol(v, nullptr, 0) : 0;
    return b > 0 && b <= INT_MAX ? (int)b : 4 << 20;
  }();
  return bytes;
}

void tuneSocket(int fd, uint32_t family) {
  int buf = socketBufferBytes();
  // Best effort: the kernel caps the sizes at its limits.
  (void)setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buf, sizeof(buf));
  (void)setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof(buf));
  if (family == kFamilyTcp) {
    int one = 1;
    (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  }
}

// Builds the sockaddr of `addr`; returns its length (0 if the address is invalid).
socklen_t toSockaddr(const SocketAddress& addr, struct sockaddr_storage* ss) {
  memset(ss, 0, sizeof(*ss));
  if (addr.family == kFamilyUnix) {
    struct sockaddr_un* un = (struct sockaddr_un*)ss;
    size_t len = strnlen(addr.name, sizeof(addr.name));
    if (len == 0 || len >= sizeof(addr.name) || len + 1 > sizeof(un->sun_path)) return 0;
    un->sun_family = AF_UNIX;
    un->sun_path[0] = '\0';  // abstract namespace: no file in the file system
    memcpy(un->sun_path + 1, addr.name, len);
    return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + len);
  }
  if (addr.family == kFamilyTcp) {
    struct sockaddr_in* in = (struct sockaddr_in*)ss;
    if (addr.port == 0 || addr.port > 65535) return 0;
    in->sin_family = AF_INET;
    in->sin_port = htons((uint16_t)addr.port);
    in->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return sizeof(*in);
  }
  return 0;
}

int domainOf(uint32_t family) { return family == kFamilyTcp ? AF_INET : AF_UNIX; }

}  // namespace

uint32_t defaultFamily() {
  uint32_t forced = gFamilyOverride.load(std::memory_order_relaxed);
  if (forced != 0) return forced;
  static const uint32_t family = [] {
    const char* v = getenv("NCCL_MOELOOP_SOCKET");
    if (v == nullptr || *v == '\0' || strcasecmp(v, "unix") == 0) return (uint32_t)kFamilyUnix;
    if (strcasecmp(v, "tcp") == 0) return (uint32_t)kFamilyTcp;
    ML_WARN("NCCL_MOELOOP_SOCKET=%s is neither 'unix' nor 'tcp'; using unix", v);
    return (uint32_t)kFamilyUnix;
  }();
  return family;
}

uint64_t randomNonce() {
  uint64_t v = 0;
  int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
  if (fd >= 0) {
    ssize_t n = read(fd, &v, sizeof(v));
    close(fd);
    if (n == (ssize_t)sizeof(v) && v != 0) return v;
  }
  // Fallback: mix time, pid and a counter.
  static std::atomic<uint64_t> counter{0};
  v = nowNs() ^ ((uint64_t)getpid() << 32) ^ (counter.fetch_add(1) * 0x9e3779b97f4a7c15ull);
  return v ? v : 1;
}

double connectTimeoutSec() {
  static const double sec = [] {
    const char* v = getenv("NCCL_MOELOOP_CONNECT_TIMEOUT_S");
    double d = v ? strtod(v, nullptr) : 0;
    return d > 0 ? d : 120.0;
  }();
  return sec;
}

void closeFd(int* fd) {
  if (*fd >= 0) {
    close(*fd);
    *fd = -1;
  }
}

ncclResult_t openListenHandle(uint64_t magic, void* handle, int* fd, uint64_t* nonce) {
  ListenHandlePrefix h;
  memset(&h, 0, sizeof(h));
  h.magic = magic;
  h.nonce = randomNonce();
  ncclResult_t res = createListener(defaultFamily(), &h.addr, fd);
  if (res != ncclSuccess) return res;
  memset(handle, 0, NCCL_NET_HANDLE_MAXSIZE);
  memcpy(handle, &h, sizeof(h));
  *nonce = h.nonce;
  return ncclSuccess;
}

ncclResult_t createListener(uint32_t family, SocketAddress* addr, int* fdOut) {
  *fdOut = -1;
  memset(addr, 0, sizeof(*addr));
  addr->family = family;
  int fd = socket(domainOf(family), SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return ML_ERROR(ncclSystemError, "socket() failed: %s", strerror(errno));
  struct sockaddr_storage ss;
  socklen_t len;
  if (family == kFamilyUnix) {
    snprintf(addr->name, sizeof(addr->name), "moeloop-%d-%u-%016llx", (int)getpid(),
             gListenerCounter.fetch_add(1), (unsigned long long)randomNonce());
    len = toSockaddr(*addr, &ss);
  } else {
    struct sockaddr_in* in = (struct sockaddr_in*)&ss;
    memset(&ss, 0, sizeof(ss));
    in->sin_family = AF_INET;
    in->sin_port = 0;  // ephemeral
    in->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    len = sizeof(*in);
  }
  if (len == 0 || bind(fd, (struct sockaddr*)&ss, len) != 0) {
    int e = errno;
    close(fd);
    return ML_ERROR(ncclSystemError, "bind() of a %s listener failed: %s",
                    family == kFamilyTcp ? "tcp" : "unix", strerror(e));
  }
  if (family == kFamilyTcp) {
    struct sockaddr_in bound;
    socklen_t blen = sizeof(bound);
    if (getsockname(fd, (struct sockaddr*)&bound, &blen) != 0) {
      int e = errno;
      close(fd);
      return ML_ERROR(ncclSystemError, "getsockname() failed: %s", strerror(e));
    }
    addr->port = ntohs(bound.sin_port);
  }
  if (listen(fd, 1024) != 0) {
    int e = errno;
    close(fd);
    return ML_ERROR(ncclSystemError, "listen() failed: %s", strerror(e));
  }
  *fdOut = fd;
  return ncclSuccess;
}

ncclResult_t connectProgress(Connector* c, const SocketAddress& addr, bool* done) {
  *done = false;
  if (c->stage == 0) {
    c->startNs = nowNs();
    c->stage = 1;
  }
  if ((double)(nowNs() - c->startNs) * 1e-9 > connectTimeoutSec()) {
    closeFd(&c->fd);
    return ML_ERROR(ncclRemoteError, "connection to %s%s%u timed out after %.0f s",
                    addr.family == kFamilyTcp ? "127.0.0.1:" : "@", addr.name, addr.port,
                    connectTimeoutSec());
  }
  if (c->stage == 1) {
    struct sockaddr_storage ss;
    socklen_t len = toSockaddr(addr, &ss);
    if (len == 0) return ML_ERROR(ncclInternalError, "invalid address in connection handle");
    if (c->fd < 0) {
      c->fd = socket(domainOf(addr.family), SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
      if (c->fd < 0) return ML_ERROR(ncclSystemError, "socket() failed: %s", strerror(errno));
      tuneSocket(c->fd, addr.family);
      if (connect(c->fd, (struct sockaddr*)&ss, len) == 0) {
        c->stage = 2;
      } else if (errno == EINPROGRESS) {
        return ncclSuccess;  // TCP: completes later, checked below on the next call
      } else if (errno == EAGAIN || errno == ECONNREFUSED || errno == EINTR) {
        // Unix backlog full or listener not yet there: retry with a fresh socket.
        closeFd(&c->fd);
        return ncclSuccess;
      } else {
        int e = errno;
        closeFd(&c->fd);
        return ML_ERROR(ncclRemoteError, "connect() failed: %s", strerror(e));
      }
    } else {
      struct pollfd p = {c->fd, POLLOUT, 0};
      int r = ::poll(&p, 1, 0);
      if (r < 0 && errno != EINTR) return ML_ERROR(ncclSystemError, "poll() failed: %s", strerror(errno));
      if (r <= 0) return ncclSuccess;
      int err = 0;
      socklen_t elen = sizeof(err);
      if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &elen) != 0) err = errno;
      if (err == ECONNREFUSED) {
        closeFd(&c->fd);
        return ncclSuccess;
      }
      if (err != 0) {
        closeFd(&c->fd);
        return ML_ERROR(ncclRemoteError, "connect() failed: %s", strerror(err));
      }
      c->stage = 2;
    }
  }
  if (c->stage == 2) {
    struct iovec iov = {(char*)&c->hello + c->helloSent, sizeof(Hello) - c->helloSent};
    size_t sent = 0;
    ncclResult_t res = ioWritev(c->fd, &iov, 1, nullptr, &sent);
    if (res != ncclSuccess) {
      closeFd(&c->fd);
      return res;
    }
    c->helloSent += sent;
    if (c->helloSent == sizeof(Hello)) {
      c->stage = 3;
      *done = true;
    }
  }
  return ncclSuccess;
}

namespace {
double gHelloDeadlineOverrideSec = 0;
}  // namespace

double helloDeadlineSec() {
  return gHelloDeadlineOverrideSec > 0 ? gHelloDeadlineOverrideSec : connectTimeoutSec();
}

void setHelloDeadlineForTesting(double sec) { gHelloDeadlineOverrideSec = sec; }

ncclResult_t Acceptor::poll(int listenFd, uint64_t nonce, int* fdOut, Hello* hello) {
  *fdOut = -1;
  for (;;) {
    int fd = accept4(listenFd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR || errno == ECONNABORTED) break;
      return ML_ERROR(ncclSystemError, "accept() failed: %s", strerror(errno));
    }
    int one = 1;
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);
    uint32_t family = kFamilyUnix;
    if (getsockname(fd, (struct sockaddr*)&ss, &len) == 0 && ss.ss_family == AF_INET) {
      family = kFamilyTcp;
      (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    }
    if (pending_.size() >= kMaxPendingHellos) {
      ML_WARN("dropping an incoming connection: %zu connections already wait for their hello",
              pending_.size());
      close(fd);
      continue;
    }
    tuneSocket(fd, family);
    pending_.push_back(Pending{fd, 0, Hello{}, nowNs()});
  }
  const uint64_t now = nowNs();
  for (size_t i = 0; i < pending_.size();) {
    Pending& p = pending_[i];
    if ((double)(now - p.acceptedNs) * 1e-9 > helloDeadlineSec()) {
      ML_WARN("dropping an incoming connection that sent %zu of %zu hello bytes in %.0f s", p.got,
              sizeof(Hello), helloDeadlineSec());
      close(p.fd);
      pending_.erase(pending_.begin() + i);
      continue;
    }
    size_t got = 0;
    bool eof = false;
    ncclResult_t res = ioRead(p.fd, (char*)&p.hello + p.got, sizeof(Hello) - p.got, nullptr, &got, &eof);
    p.got += got;
    bool complete = p.got == sizeof(Hello);
    if (res != ncclSuccess || (eof && !complete)) {
      ML_WARN("dropping an incoming connection that closed before its hello");
      close(p.fd);
      pending_.erase(pending_.begin() + i);
      continue;
    }
    if (!complete) {
      ++i;
      continue;
    }
    if (p.hello.magic != kHelloMagic || p.hello.nonce != nonce) {
      ML_WARN("dropping an incoming connection with a foreign hello (magic %llx)",
              (unsigned long long)p.hello.magic);
      close(p.fd);
      pending_.erase(pending_.begin() + i);
      continue;
    }
    *fdOut = p.fd;
    *hello = p.hello;
    pending_.erase(pending_.begin() + i);
    return ncclSuccess;
  }
  return ncclSuccess;
}

void Acceptor::closeAll() {
  for (Pending& p : pending_) close(p.fd);
  pending_.clear();
}

ncclResult_t ioWritev(int fd, const struct iovec* iov, int iovcnt, TokenBucket* bucket,
                      size_t* sent, int passFd) {
  *sent = 0;
  size_t want = 0;
  for (int i = 0; i < iovcnt; i++) want += iov[i].iov_len;
  if (want == 0) return ncclSuccess;
  size_t limit = gIoLimit.load(std::memory_order_relaxed);
  if (limit != 0 && want > limit) want = limit;
  size_t grant = bucket ? bucket->take(want) : want;
  if (grant == 0) return ncclSuccess;
  struct iovec local[4];
  int n = 0;
  size_t left = grant;
  for (int i = 0; i < iovcnt && n < 4 && left > 0; i++) {
    if (iov[i].iov_len == 0) continue;
    size_t take = iov[i].iov_len < left ? iov[i].iov_len : left;
    local[n].iov_base = iov[i].iov_base;
    local[n].iov_len = take;
    left -= take;
    n++;
  }
  struct msghdr msg;
  memset(&msg, 0, sizeof(msg));
  msg.msg_iov = local;
  msg.msg_iovlen = n;
  alignas(struct cmsghdr) char control[CMSG_SPACE(sizeof(int))];
  if (passFd >= 0) {  // the descriptor travels with the first byte this call sends
    memset(control, 0, sizeof(control));
    msg.msg_control = control;
    msg.msg_controllen = sizeof(control);
    struct cmsghdr* cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cm), &passFd, sizeof(int));
  }
  ssize_t w;
  do {
    w = sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
  } while (w < 0 && errno == EINTR);
  if (w < 0) {
    int e = errno;
    if (bucket) bucket->giveBack(grant);
    if (e == EAGAIN || e == EWOULDBLOCK) return ncclSuccess;
    if (e == EPIPE || e == ECONNRESET || e == ENOTCONN)
      return ML_ERROR(ncclRemoteError, "send failed, peer closed the connection: %s", strerror(e));
    return ML_ERROR(ncclSystemError, "send failed: %s", strerror(e));
  }
  if (bucket && (size_t)w < grant) bucket->giveBack(grant - (size_t)w);
  *sent = (size_t)w;
  return ncclSuccess;
}

ncclResult_t ioRead(int fd, void* buf, size_t len, TokenBucket* bucket, size_t* got, bool* eof,
                    std::vector<int>* fds) {
  *got = 0;
  *eof = false;
  if (len == 0) return ncclSuccess;
  size_t limit = gIoLimit.load(std::memory_order_relaxed);
  if (limit != 0 && len > limit) len = limit;
  size_t grant = bucket ? bucket->take(len) : len;
  if (grant == 0) return ncclSuccess;
  struct iovec iov = {buf, grant};
  struct msghdr msg;
  memset(&msg, 0, sizeof(msg));
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(struct cmsghdr) char control[CMSG_SPACE(kMaxFdsPerRead * sizeof(int))];
  if (fds != nullptr) {
    msg.msg_control = control;
    msg.msg_controllen = sizeof(control);
  }
  ssize_t r;
  do {
    r = recvmsg(fd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
  } while (r < 0 && errno == EINTR);
  if (r >= 0 && fds != nullptr) {
    for (struct cmsghdr* cm = CMSG_FIRSTHDR(&msg); cm != nullptr; cm = CMSG_NXTHDR(&msg, cm)) {
      if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS) continue;
      size_t n = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < n; i++) {
        int received;
        memcpy(&received, CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
        fds->push_back(received);
      }
    }
    if (msg.msg_flags & MSG_CTRUNC)
      return ML_ERROR(ncclSystemError, "recvmsg: more than %d descriptors arrived at once; some were lost",
                      kMaxFdsPerRead);
  }
  if (r < 0) {
    int e = errno;
    if (bucket) bucket->giveBack(grant);
    if (e == EAGAIN || e == EWOULDBLOCK) return ncclSuccess;
    if (e == ECONNRESET || e == ENOTCONN || e == EPIPE) {
      *eof = true;
      return ncclSuccess;
    }
    return ML_ERROR(ncclSystemError, "recv failed: %s", strerror(e));
  }
  if (bucket && (size_t)r < grant) bucket->giveBack(grant - (size_t)r);
  if (r == 0) *eof = true;
  *got = (size_t)r;
  return ncclSuccess;
}

void setIoLimitForTesting(size_t bytes) { gIoLimit.store(bytes); }
void setSocketFamilyForTesting(uint32_t family) { gFamilyOverride.store(family); }

}  // namespace moeloop
