// GIN (proxy type) of the moeloop plugin: internal structures shared by its files.
//
//   moeloop_gin_tables.cc the tables NCCL loads (GIN v11, GIN v13, RMA v14): thin adapters
//   moeloop_gin.cc        the version-neutral core (moeloop_gin_api.h): comms, registrations,
//                         context sets, puts, requests
//   moeloop_gin_mesh.cc   the collective connect (full mesh of sockets) and the wire protocol
//   moeloop_gin_cuda.cc   CUDA copies: staging GPU memory through pinned host buffers
//
// How a put travels (rank s -> rank t; all contexts of a collComm share its connections):
//  - s: NCCL's proxy thread calls iput / iputSignal. The request joins s's FIFO for t. Progress
//    copies the source (GPU: through a pinned bounce buffer; host: directly) into the socket to t,
//    behind an 88-byte header naming the destination registration and offset. The request
//    completes (test -> done) once every byte is in the socket: the source may then be reused.
//  - t: progress (test / ginProgress / iput on t, driven by NCCL's GIN progress thread) reads
//    the header, resolves the destination in t's own registration with the same sequence number
//    (regMrSym is collective and in the same order everywhere), copies the payload into place
//    (pinned bounce -> GPU, synchronously) and only then applies the signal (read-modify-write of
//    the 64-bit word through the copy engine: no SM is needed, so it never waits for a busy GPU).
//    Messages from one sender are applied strictly in order, so a signal is visible only after
//    the payload of its put and of every earlier put of that collComm (any context) to that rank.
//  - puts to the own rank are applied at once, inside iput.
// Errors are sticky per collComm: logged, returned by every later call, seen by queryLastError.
#pragma once
#include <deque>
#include <mutex>
#include <poll.h>
#include <stddef.h>
#include <stdint.h>
#include <vector>
#include "moeloop_socket.h"

namespace moeloop {

// --- CUDA helpers (moeloop_gin_cuda.cc) ----------------------------------------------------------
struct GinCuda {
  int dev = -1;                 // CUDA device of the comm (from its registrations)
  void* stream = nullptr;       // cudaStream_t, non-blocking, created on first use
  uint64_t* scratch = nullptr;  // pinned word for signal read-modify-write
};
// Device of a CUDA pointer; *isDevice = false for host memory.
ncclResult_t ginPointerDevice(const void* p, int* dev, bool* isDevice);
void ginCudaRelease(GinCuda* g);
ncclResult_t ginPinnedAlloc(GinCuda* g, size_t bytes, char** p);
void ginPinnedFree(char* p);
// Copies n bytes between any host / device pointers of this process and waits for the copy.
ncclResult_t ginCopy(GinCuda* g, void* dst, const void* src, size_t n);
// *word += add for a 64-bit word in device memory, through the copy engine (read, add, write).
// Atomic with respect to every other signal update of this process (one process-wide lock):
// signal words are shared between contexts, comms and NCCL's threads (VA signals target window
// memory). A GPU must not write a signal word while puts to it are in flight (GIN's contract).
ncclResult_t ginDeviceAdd(GinCuda* g, uint64_t* word, uint64_t add);

// The read-modify-write behind ginDeviceAdd, over caller-supplied word accessors, so that the
// CPU tests can check its atomicity with host memory.
struct SignalWordAccess {
  ncclResult_t (*read)(void* env, const uint64_t* word, uint64_t* value);
  ncclResult_t (*write)(void* env, uint64_t* word, uint64_t value);
  void* env;
};
ncclResult_t signalAddLocked(const SignalWordAccess& access, uint64_t* word, uint64_t add);

// --- registrations and requests -----------------------------------------------------------------
struct GinCollComm;

struct GinRegistration {
  uint32_t magic;
  GinCollComm* comm;
  uint64_t id;    // sequence number of regMrSym on this collComm: the same buffer on every rank
  char* base;
  size_t size;
  int type;       // NCCL_PTR_HOST or NCCL_PTR_CUDA
  bool live;      // false after deregMrSym
};
constexpr uint32_t kGinRegMagic = 0x47524547;
constexpr uint64_t kNoRegistration = ~0ull;

enum GinOpBits : uint32_t { kGinOpSignalInc = 1, kGinOpSignalAdd = 2 };

struct GinWireHeader {
  uint32_t magic;
  uint32_t op;          // GinOpBits
  uint64_t seq;         // message number on this connection
  uint64_t size;        // payload bytes
  uint64_t sendNs;      // when iput was called (latency shaping)
  uint64_t dstRegId;    // kNoRegistration when size == 0
  uint64_t dstRegSize;  // sender's size of that registration (symmetry check)
  uint64_t dstOff;
  uint64_t sigRegId;    // kNoRegistration without a signal
  uint64_t sigRegSize;
  uint64_t sigOff;
  uint64_t sigValue;
};
static_assert(sizeof(GinWireHeader) == 88, "GIN header is 88 bytes on the wire");
constexpr uint32_t kGinWireMagic = 0x474d4c31;  // "GML1"

enum class GinReqState : uint8_t { kFree, kQueued, kDone, kError };

struct GinRequest {
  uint32_t magic;
  GinReqState state;
  ncclResult_t error;
  GinCollComm* comm;
  int context;           // context id within its context set (0 for GIN v11)
  uint32_t target;
  GinRegistration* src;  // NULL when size == 0
  uint64_t srcOff;
  GinWireHeader hdr;
  size_t hdrSent;
  size_t payloadSent;
};
constexpr uint32_t kGinReqMagic = 0x47524551;

// One remote rank: an outgoing connection for our puts, an incoming one for theirs.
struct GinPeer {
  int sendFd = -1;
  int recvFd = -1;
  // send side
  std::deque<GinRequest*> sendQueue;
  uint64_t sendSeq = 0;
  char* sendBounce = nullptr;       // pinned, kGinBounceBytes
  size_t stagedBegin = 0, stagedEnd = 0;  // payload range of the front request held in sendBounce
  // receive side
  GinWireHeader rhdr{};
  size_t rhdrGot = 0;
  bool inMessage = false;           // header accepted, payload / completion pending
  GinRegistration* rdst = nullptr;
  GinRegistration* rsig = nullptr;
  size_t rgot = 0;                  // payload bytes read from the socket
  size_t rflushed = 0;              // payload bytes written to the destination
  char* recvBounce = nullptr;       // pinned, kGinBounceBytes
  uint64_t recvSeq = 0;
  bool recvClosed = false;          // peer closed its connection between messages
  uint64_t stallSinceNs = 0;        // a header waits for a registration this rank lacks
  bool stallWarned = false;
};
constexpr size_t kGinBounceBytes = 1u << 20;

// Contexts 0 .. nContexts-1 of one collComm (createContext of GIN v13 / RMA v14).
struct GinContextSet {
  uint32_t magic;
  GinCollComm* comm;  // NULL once orphaned (its comm was closed before it was destroyed)
  int nContexts;
};
constexpr uint32_t kGinContextSetMagic = 0x47435354, kGinContextSetOrphanMagic = 0x4743534f;

struct GinCollComm {
  uint32_t magic;
  std::mutex mu;      // every call on the comm holds it, teardown included
  int rank = 0, nranks = 0, dev = 0;
  std::vector<GinPeer> peers;              // indexed by rank; our own entry is unused
  std::vector<GinRegistration*> regs;      // indexed by id; kept until closeColl
  std::vector<GinRequest*> pool, freeList;
  std::vector<GinContextSet*> contextSets; // live ones, invalidated by closeColl
  ncclResult_t error = ncclSuccess;        // sticky
  GinCuda cuda;
  std::vector<struct pollfd> pollSet;      // scratch for progress
};
constexpr uint32_t kGinCollMagic = 0x47434f4c;

// What listen() writes into NCCL's handle.
struct GinHandle {
  uint64_t magic;
  uint64_t nonce;
  SocketAddress addr;
};
static_assert(sizeof(GinHandle) <= NCCL_NET_HANDLE_MAXSIZE, "GinHandle must fit NCCL's handle");
static_assert(offsetof(GinHandle, addr) == offsetof(ListenHandlePrefix, addr),
              "GinHandle starts with the ListenHandlePrefix fields");
constexpr uint64_t kGinHandleMagic = 0x6d6c2d67696e2d31ull;

struct GinListenComm {
  uint32_t magic;
  int fd = -1;
  int dev = 0;
  uint64_t nonce = 0;
  Acceptor acceptor;
};
constexpr uint32_t kGinListenMagic = 0x474c534e;

// --- mesh and wire (moeloop_gin_mesh.cc) --------------------------------------------------------
// Connects `c` to every other rank (blocking, collective, with NCCL_MOELOOP_CONNECT_TIMEOUT_S).
ncclResult_t ginConnectMesh(GinCollComm* c, GinListenComm* l, void* handles[]);
// Moves bytes on every connection; applies received puts. Caller holds c->mu. A received put
// that names a registration this rank has not made fails the comm after registrationWaitSec().
ncclResult_t ginProgressLocked(GinCollComm* c);
double registrationWaitSec();  // NCCL_MOELOOP_CONNECT_TIMEOUT_S (regMrSym does not synchronise)
void setRegistrationWaitForTesting(double sec);  // 0: back to the default
// Records a sticky error on `c` (first one wins) and returns it.
ncclResult_t ginFail(GinCollComm* c, ncclResult_t res);
// Applies a signal operation to a local registration (after the payload it follows is in place).
ncclResult_t ginApplySignal(GinCollComm* c, GinRegistration* sig, uint64_t sigOff, uint32_t op,
                            uint64_t value);
void ginCloseMesh(GinCollComm* c);

}  // namespace moeloop
