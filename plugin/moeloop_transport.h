// NET transport of the moeloop plugin: one-directional message streams between processes of
// one host over local sockets, with NCCL's NET semantics. A send comm and a receive comm form
// one connection; messages match posted receives in FIFO order; every call is non-blocking and
// progress happens inside isend / irecv / test. Data lives in host memory. No CUDA, no threads:
// the CPU unit tests link this file directly.
//
// Wire format: each message is a 32-byte MessageHeader followed by `size` payload bytes.
#pragma once
#include <deque>
#include <stddef.h>
#include <stdint.h>
#include <vector>
#include "moeloop_socket.h"

namespace moeloop {

// What listen() writes into NCCL's handle. The connecting side records the id of its
// connection in progress in `pendingId` (NCCL passes the same handle to every connect call of one
// connection); the id is looked up in this process's table and checked against the handle's
// nonce and address, so a handle that arrives from a peer with any value there is harmless.
struct NetHandle {
  uint64_t magic;
  uint64_t nonce;
  SocketAddress addr;
  uint64_t pendingId;  // 0: no connection in progress (listen writes 0)
};
static_assert(sizeof(NetHandle) <= NCCL_NET_HANDLE_MAXSIZE, "NetHandle must fit NCCL's handle");
static_assert(offsetof(NetHandle, addr) == offsetof(ListenHandlePrefix, addr),
              "NetHandle starts with the ListenHandlePrefix fields");
constexpr uint64_t kNetHandleMagic = 0x6d6c2d6e65742d31ull;

struct MessageHeader {
  uint32_t magic;
  uint32_t flags;
  uint64_t size;    // payload bytes
  uint64_t sendNs;  // sender's CLOCK_MONOTONIC when it started the message (latency shaping)
  uint64_t seq;     // message number on this connection, from 0
};
static_assert(sizeof(MessageHeader) == 32, "header is 32 bytes on the wire");
constexpr uint32_t kMessageMagic = 0x4d4c4d31;  // "MLM1"

enum class ReqState : uint8_t { kFree, kQueued, kDone, kError };

struct NetComm;
struct NetRequest {
  uint32_t magic;
  bool isSend;
  ReqState state;
  NetComm* comm;
  char* data;
  size_t capacity;   // send: message size; receive: posted buffer size
  size_t msgSize;    // receive: size announced by the sender
  size_t moved;      // payload bytes moved so far
  size_t hdrMoved;   // header bytes moved so far
  uint64_t deadlineNs;
  MessageHeader hdr;
  ncclResult_t error;
};
constexpr uint32_t kRequestMagic = 0x52514d4c;

// State shared by send and receive comms.
struct NetComm {
  uint32_t magic;
  bool isSend;
  int fd = -1;
  int dev = 0;
  uint64_t seq = 0;                // next message number
  bool peerClosed = false;         // receive side saw EOF
  ncclResult_t error = ncclSuccess;  // sticky error
  std::deque<NetRequest*> queue;   // posted, in order
  std::vector<NetRequest*> pool;   // every request this comm owns
  std::vector<NetRequest*> freeList;
};
constexpr uint32_t kSendCommMagic = 0x53434d4c, kRecvCommMagic = 0x52434d4c;

struct NetListenComm {
  uint32_t magic;
  int fd = -1;
  int dev = 0;
  uint64_t nonce = 0;
  Acceptor acceptor;
};
constexpr uint32_t kListenCommMagic = 0x4c434d4c;

// Most requests in flight per comm; beyond it isend / irecv return a NULL request.
constexpr size_t kMaxRequestsPerComm = 4096;

ncclResult_t netListen(int dev, void* handle, NetListenComm** out);
// Non-blocking: *out stays NULL until the connection is established.
ncclResult_t netConnect(int dev, void* handle, NetComm** out);
ncclResult_t netAccept(NetListenComm* listen, NetComm** out);
// *req is NULL when the comm has too many requests in flight (try again).
// size: at most kMaxMessageBytes (larger sends fail with ncclInvalidArgument).
ncclResult_t netIsend(NetComm* comm, const void* data, size_t size, NetRequest** req);
ncclResult_t netIrecv(NetComm* comm, void* data, size_t size, NetRequest** req);
// *done = 1 once the request completed (then it is released); *size = bytes moved.
ncclResult_t netTest(NetRequest* req, int* done, size_t* size);
// Moves as many bytes as the socket accepts now.
ncclResult_t netProgress(NetComm* comm);
ncclResult_t netClose(NetComm* comm);
ncclResult_t netCloseListen(NetListenComm* listen);

}  // namespace moeloop
