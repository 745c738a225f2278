// Local stream sockets of the moeloop plugin: addresses small enough for an NCCL handle,
// non-blocking listen / connect / accept with a fixed-size hello, and non-blocking I/O that
// honours the fake NIC's token buckets. Unix-domain sockets in the abstract namespace by default;
// NCCL_MOELOOP_SOCKET=tcp uses TCP on 127.0.0.1 instead. No CUDA, no threads.
#pragma once
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>
#include <vector>
#include "nccl_plugin_abi.h"
#include "moeloop_shaping.h"

namespace moeloop {

enum : uint32_t { kFamilyUnix = 1, kFamilyTcp = 2 };

struct SocketAddress {
  uint32_t family;  // kFamilyUnix or kFamilyTcp
  uint32_t port;    // TCP port (host order)
  char name[56];    // abstract unix name (without the leading NUL), NUL-terminated
};

// Hello sent by a connecting side, checked by the accepting side.
struct Hello {
  uint64_t magic;
  uint64_t nonce;  // the listener's nonce, from its handle
  uint32_t kind;   // kHelloNet or kHelloGin
  uint32_t rank;   // GIN: the connecting rank
  uint32_t nranks; // GIN: ranks of the collective comm
  uint32_t flags;  // GIN: kHelloFlag* of the connecting rank
};
constexpr uint64_t kHelloMagic = 0x6d6f656c6f6f7031ull;  // "moeloop1"
enum : uint32_t { kHelloNet = 1, kHelloGin = 2 };
enum : uint32_t { kHelloFlagCopy = 1 };  // GIN: the connecting rank uses the copy transport

uint32_t defaultFamily();      // from NCCL_MOELOOP_SOCKET (unix | tcp)
// Unit tests: use `family` for new listeners (0: back to the environment's choice).
void setSocketFamilyForTesting(uint32_t family);
uint64_t randomNonce();
double connectTimeoutSec();    // NCCL_MOELOOP_CONNECT_TIMEOUT_S, default 120

// Creates a non-blocking listening socket of `family` and describes it in `addr`.
ncclResult_t createListener(uint32_t family, SocketAddress* addr, int* fd);
void closeFd(int* fd);

// What NCCL's opaque connection handle starts with, for NET and GIN connections alike: a magic
// number naming the kind, the listener's nonce (checked by the hello) and its address.
struct ListenHandlePrefix {
  uint64_t magic;
  uint64_t nonce;
  SocketAddress addr;
};
// Opens a listener of the default family and writes {magic, a new nonce, its address} at the
// start of `handle` (NCCL_NET_HANDLE_MAXSIZE bytes, the rest zeroed). Returns fd and nonce.
ncclResult_t openListenHandle(uint64_t magic, void* handle, int* fd, uint64_t* nonce);

// Non-blocking connection establishment: connect, then send the hello.
struct Connector {
  int fd = -1;
  int stage = 0;         // 0: not started, 1: connecting, 2: sending hello, 3: done
  size_t helloSent = 0;
  uint64_t startNs = 0;
  Hello hello{};
};
// Advances `c`; sets *done when the connection is up and the hello is sent (c->fd then belongs
// to the caller). Gives up with an error after connectTimeoutSec().
ncclResult_t connectProgress(Connector* c, const SocketAddress& addr, bool* done);

// Accepted connections waiting for their hello: at most this many per listener (more are
// closed at once), each for at most helloDeadlineSec() (then it is closed).
constexpr size_t kMaxPendingHellos = 64;
double helloDeadlineSec();  // NCCL_MOELOOP_CONNECT_TIMEOUT_S
void setHelloDeadlineForTesting(double sec);  // 0: back to the default

// Accepts connections on a listening socket and collects their hellos.
class Acceptor {
 public:
  // Returns in *fd (else -1) one accepted connection whose hello is complete and carries
  // `nonce`; connections with a wrong, late or missing hello are closed with a warning.
  ncclResult_t poll(int listenFd, uint64_t nonce, int* fd, Hello* hello);
  void closeAll();
  size_t pendingCount() const { return pending_.size(); }
  ~Acceptor() { closeAll(); }

 private:
  struct Pending {
    int fd;
    size_t got;
    Hello hello;
    uint64_t acceptedNs;  // nowNs() at accept
  };
  std::vector<Pending> pending_;
};

// Non-blocking writev of as much of iov[0..iovcnt) as the socket and `bucket` (may be NULL)
// accept now; *sent = bytes written. A closed peer gives ncclRemoteError.
// passFd >= 0 (unix sockets only): the descriptor is passed (SCM_RIGHTS) with the first byte this
// call sends; pass it on every attempt until *sent > 0, then never again for that message.
ncclResult_t ioWritev(int fd, const struct iovec* iov, int iovcnt, TokenBucket* bucket,
                      size_t* sent, int passFd = -1);
// Non-blocking read of up to len bytes; *got = bytes read, *eof = peer closed (or reset).
// fds != NULL: descriptors passed with the bytes read are appended to *fds (the caller owns them).
// The kernel hands a passed descriptor to the read that takes the first byte of the send it came
// with, so a reader that reads each message's first bytes with fds != NULL never loses one.
ncclResult_t ioRead(int fd, void* buf, size_t len, TokenBucket* bucket, size_t* got, bool* eof,
                    std::vector<int>* fds = nullptr);
constexpr int kMaxFdsPerRead = 16;

// Unit tests: limit every read/write to at most `bytes` (0: no limit), to force partial I/O.
void setIoLimitForTesting(size_t bytes);

}  // namespace moeloop
