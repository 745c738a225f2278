// GIN (proxy type) of the moeloop plugin: internal structures shared by its files.
//
//   moeloop_gin_tables.cc the tables NCCL loads (GIN v11, GIN v13, RMA v14): thin adapters
//   moeloop_gin.cc        the version-neutral core (moeloop_gin_api.h): comms, registrations,
//                         context sets, puts, requests
//   moeloop_gin_mesh.cc   the collective connect (full mesh of sockets) and the wire protocol
//   moeloop_gin_copy.cc   the copy transport: GPU -> GPU puts by the copy engine
//   moeloop_gin_cuda.cc   CUDA copies, streams and events; signal updates
//
// How a put travels (rank s -> rank t; all contexts of a collComm share its connections):
//  - s: NCCL's proxy thread calls iput / iputSignal. The request joins s's FIFO for t.
//    Socket path: progress copies the source (GPU: through a pinned bounce buffer; host:
//    directly) into the socket to t, behind a 96-byte header naming the destination registration
//    and offset. Copy path (both ranks offer the copy transport, the source is GPU memory and t
//    exported the destination's cuMem allocation to s): progress copies the source straight into
//    s's mapping of t's memory on a stream of s for t, then, once the copies completed (event)
//    and the shaped latency passed, sends the header alone (kGinOpCopied). Either way the request
//    completes (test -> done) once its header is in the socket: the source may then be reused.
//  - t: progress (test / ginProgress / iput on t, driven by NCCL's GIN progress thread) reads
//    the header, resolves the destination in t's own registration with the same sequence number
//    (regMrSym is collective and in the same order everywhere), copies a socket payload into place
//    (pinned bounce -> GPU, synchronously) and only then applies the signal (read-modify-write of
//    the 64-bit word through the copy engine: no SM is needed, so it never waits for a busy GPU;
//    consecutive updates of one word within a progress pass are summed into one write, unless
//    NCCL_MOELOOP_COALESCE=0).
//    Messages from one sender are applied strictly in order, so a signal is visible only after
//    the payload of its put and of every earlier put of that collComm (any context) to that rank.
//  - puts to the own rank are applied at once, inside iput.
// Errors are sticky per collComm: logged, returned by every later call, seen by queryLastError.
#pragma once
#include <deque>
#include <functional>
#include <mutex>
#include <poll.h>
#include <stddef.h>
#include <stdint.h>
#include <vector>
#include "moeloop_cumem.h"
#include "moeloop_socket.h"

namespace moeloop {

// --- CUDA helpers (moeloop_gin_cuda.cc) ----------------------------------------------------------
struct GinCuda {
  int dev = -1;                 // CUDA device of the comm (from its registrations)
  void* stream = nullptr;       // cudaStream_t, non-blocking, created on first use
};
// Device of a CUDA pointer; *isDevice = false for host memory.
ncclResult_t ginPointerDevice(const void* p, int* dev, bool* isDevice);
void ginCudaRelease(GinCuda* g);
// Creates what the data path will need on g->dev (the comm's stream, the device's signal lane)
// now, from a host call that no kernel waits for. Creating them on first use inside the proxy's
// progress would deadlock: page-locked allocations wait for the device to go idle, while a
// kernel may be waiting (gin.flush, a signal) for that very progress.
ncclResult_t ginPrepareDevice(GinCuda* g);
ncclResult_t ginPinnedAlloc(GinCuda* g, size_t bytes, char** p);
void ginPinnedFree(char* p);
// Copies n bytes between any host / device pointers of this process and waits for the copy.
ncclResult_t ginCopy(GinCuda* g, void* dst, const void* src, size_t n);
// *word += add for a 64-bit word in device memory, through the copy engine (read and wait, add,
// write without waiting, on one stream per device: the next update's read is ordered after it).
// Atomic with respect to every other signal update of this process (one process-wide lock):
// signal words are shared between contexts, comms and NCCL's threads (VA signals target window
// memory). Only the process owning a signal word updates it (puts from peers are applied by the
// target). A GPU must not write a signal word while puts to it are in flight (GIN's contract).
ncclResult_t ginDeviceAdd(GinCuda* g, uint64_t* word, uint64_t add);
// The same for a word this process alone writes and whose value it keeps in *shadow (a signal
// registration flagged NCCL_NET_MR_FLAG_SIGNAL_NEVER_RESET): *shadow += add, then the new value
// is written to *word asynchronously on the device's signal lane (from a pinned ring slot), with
// no read back and no wait. Signal updates of one device stay in order on that lane.
ncclResult_t ginDeviceAddShadowed(GinCuda* g, uint64_t* word, uint64_t* shadow, uint64_t add);
// Waits until every signal update issued on g->dev's lane has landed (before its memory is freed).
ncclResult_t ginSignalLaneSync(GinCuda* g);

// Copy transport: a non-blocking stream of g->dev, asynchronous copies on it, events after them.
ncclResult_t ginStreamCreate(GinCuda* g, void** stream);
// Waits for the stream's work, then destroys it (NULL: nothing to do).
void ginStreamDestroy(GinCuda* g, void* stream);
ncclResult_t ginStreamSync(GinCuda* g, void* stream);
ncclResult_t ginCopyAsync(GinCuda* g, void* stream, void* dst, const void* src, size_t n);
// Records *event (created on first use, kept for reuse) on `stream`.
ncclResult_t ginEventRecord(GinCuda* g, void** event, void* stream);
// Later work on `stream` waits for the work before `event`'s last record (cudaStreamWaitEvent).
ncclResult_t ginStreamWaitEvent(GinCuda* g, void* stream, void* event);
// *done once the work before the event's last record has completed.
ncclResult_t ginEventDone(void* event, bool* done);
// Records timing event *event (created on first use) on `stream`; *ns = the GPU time between two
// completed timing events' last records.
ncclResult_t ginTimingEventRecord(GinCuda* g, void** event, void* stream);
ncclResult_t ginTimingEventElapsed(GinCuda* g, void* start, void* end, uint64_t* ns);
void ginEventDestroy(GinCuda* g, void* event);

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
  // Registered with NCCL_NET_MR_FLAG_SIGNAL_NEVER_RESET (NCCL 2.30.7's GIN proxy signal buffer,
  // backend version >= 2): no GPU ever writes these words (resetSignal moves an offset instead),
  // so the values this process wrote are the values: one word per 8 bytes, zero at registration
  // (NCCL zeroes the buffer before registering it). Empty: signals use the read-modify-write.
  std::vector<uint64_t> sigShadow;
  // Copy transport: the exported cuMem allocation holding the registration. exportFd stays open
  // until every copy peer's announcement carrying it is sent (announcesLeft), -1 otherwise.
  int exportFd = -1;
  int announcesLeft = 0;
  uint64_t exportOffset = 0;   // of `base` inside the allocation
  uint64_t exportMapSize = 0;  // bytes of the allocation
};
constexpr uint32_t kGinRegMagic = 0x47524547;
constexpr uint64_t kNoRegistration = ~0ull;

// What a message is. A put: optional signal bits, kGinOpCopied when the copy engine has already
// put its payload in place (no payload follows on the socket). Copy transport only: an
// announcement of a registration of the sender (kGinMsgRegistration, with kGinMsgHasFd when its
// allocation's fd is passed with the message's first byte) and a retirement (deregMrSym).
enum GinOpBits : uint32_t {
  kGinOpSignalInc = 1,
  kGinOpSignalAdd = 2,
  kGinOpCopied = 4,
  kGinMsgRegistration = 8,
  kGinMsgHasFd = 16,
  kGinMsgDeregistration = 32,
};

// A put, or (copy transport) an announcement: dstRegId / dstRegSize name the sender's
// registration, dstOff is its offset in the exported allocation and sigValue the allocation's size;
// or a retirement: dstRegId.
struct GinWireHeader {
  uint32_t magic;
  uint32_t op;          // GinOpBits
  uint64_t seq;         // message number on this connection
  uint64_t size;        // payload bytes
  uint64_t sendNs;      // when iput was called (latency shaping of the socket transport)
  uint64_t dstRegId;    // kNoRegistration when size == 0
  uint64_t dstRegSize;  // sender's size of that registration (symmetry check)
  uint64_t dstOff;
  uint64_t sigRegId;    // kNoRegistration without a signal
  uint64_t sigRegSize;
  uint64_t sigOff;
  uint64_t sigValue;
  uint32_t context;     // GIN context of the put (counters)
  uint32_t reserved;
  uint64_t sentNs;      // copy transport: when the header was handed to the socket (hop timing)
};
static_assert(sizeof(GinWireHeader) == 104, "GIN header is 104 bytes on the wire");
constexpr uint32_t kGinWireMagic = 0x474d4c33;  // "GML3"

enum class GinReqState : uint8_t { kFree, kQueued, kDone, kError };
// A put of NCCL's, or an internal message of the copy transport (freed by the plugin once sent).
enum class GinReqKind : uint8_t { kPut, kAnnounce, kRetire };
// How a put's payload travels: decided when the put reaches the copy transport's issue cursor.
enum class GinPath : uint8_t { kUndecided, kSocket, kCopy };

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
  GinReqKind kind;
  GinPath path;
  GinRegistration* reg;  // kAnnounce / kRetire: the registration announced or retired
  // copy path
  uint64_t remoteId;     // the peer's registration written into
  char* copyDst;         // its bytes in this process's mapping
  size_t issued;         // payload bytes handed to the copy engine
  int stream;            // index into its peer's streams (the copies and the event)
  bool streamChosen;     // `stream` is set (and waits for overlapping puts are enqueued)
  bool recorded;         // event recorded after the last copy
  uint64_t issuedNs;     // when the issue cursor passed it (its copies handed to the engine)
  uint64_t readyNs;      // when its own copies were seen complete (0: not yet; size 0: issuedNs)
  uint64_t waitSinceNs;  // waiting for the peer's announcement of the destination since
  void* event;           // cudaEvent_t, kept when the request is reused
  // NCCL_MOELOOP_COPY_TIMING=1: timing events before its first and after its last copy (kept when
  // the request is reused); `timed` while both are recorded and not yet read.
  void* timedStart;
  void* timedEnd;
  bool timed;
};
constexpr uint32_t kGinReqMagic = 0x47524551;

// A registration of a peer as the copy transport sees it (from the peer's announcement).
struct GinRemoteRegistration {
  uint64_t size = 0;       // bytes
  CuMemMapping map;        // empty when the peer could not export it or we could not import it
  uint64_t offset = 0;     // of the registration inside `map`
  bool live = true;        // false once the peer retired it
};

constexpr int kGinCopyStreams = 4;

// One remote rank: an outgoing connection for our puts, an incoming one for theirs.
struct GinPeer {
  int sendFd = -1;
  int recvFd = -1;
  bool copy = false;                 // both ranks use the copy transport (see moeloop_gin_copy.cc)
  // copy: cudaStream_t of our copies to this peer, used round robin by put (a copy engine's
  // round trip, issue -> event seen complete, is several us: one stream would serialise them)
  void* streams[kGinCopyStreams] = {};
  GinRequest* lastOnStream[kGinCopyStreams] = {};  // the latest put issued on each stream
  int nextStream = 0;
  size_t issuedCount = 0;            // copy: leading sendQueue entries whose copies are all issued
  std::vector<GinRemoteRegistration> remote;  // copy: the peer's registrations by id
  std::vector<int> fds;              // descriptors received from the peer, not yet consumed
  // send side
  std::deque<GinRequest*> sendQueue;
  uint64_t sendSeq = 0;
  char* sendBounce = nullptr;       // pinned, kGinBounceBytes
  size_t stagedBegin = 0, stagedEnd = 0;  // payload range of the front request held in sendBounce
  // receive side
  GinWireHeader rhdr{};
  size_t rhdrGot = 0;
  uint64_t rhdrNs = 0;      // when rhdr was fully read (hop timing)
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
  // Signal updates received in this progress pass and not yet written: consecutive updates of one
  // word are summed into one write (the LL kernels' batches of a source all add to one signal),
  // and the sum is written before an update of another word and at the end of the pass. Every
  // payload they follow is already in place (see ginQueueSignal).
  GinRegistration* pendingSig = nullptr;
  uint64_t pendingSigOff = 0, pendingSigAdd = 0;
  // Hop timing of the timed puts folded into the pending update (recorded when it is written, so
  // the apply hop includes the wait for the end of the pass): count, summed wire ns, summed
  // header-read times (rhdrNs).
  uint64_t pendingHopPuts = 0, pendingHopWireNs = 0, pendingHopHdrNs = 0;
  bool copyWanted = false;                 // this rank offers the copy transport (hello flag)
  uint64_t lastProgressNs = 0;             // nowNs() at the end of the last ginProgressLocked (test throttling)
  bool importWarned = false;               // one warning per comm for a failed import
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

// A cleared request of `c` in state kQueued (its CUDA event kept); back with ginFreeRequest.
GinRequest* ginAllocRequest(GinCollComm* c);
void ginFreeRequest(GinCollComm* c, GinRequest* r);

// --- mesh and wire (moeloop_gin_mesh.cc) --------------------------------------------------------
// Connects `c` to every other rank (blocking, collective, with NCCL_MOELOOP_CONNECT_TIMEOUT_S).
ncclResult_t ginConnectMesh(GinCollComm* c, GinListenComm* l, void* handles[]);
// Moves bytes on every connection; applies received puts. Caller holds c->mu. A received put
// that names a registration this rank has not made fails the comm after registrationWaitSec().
ncclResult_t ginProgressLocked(GinCollComm* c);
double registrationWaitSec();  // NCCL_MOELOOP_CONNECT_TIMEOUT_S (regMrSym does not synchronise)
void setRegistrationWaitForTesting(double sec);  // 0: back to the default
// Switches read once per process from the environment (at the first GIN init; logged there), so
// that a GPU session can A/B the behaviours of the fourth session's plugin commits:
//  - NCCL_MOELOOP_COALESCE=1 (default) | 0: signal updates received in one progress pass are
//    summed per word and written at the end of the pass (4bc4d5d), or each written as soon as
//    its header is read (before 4bc4d5d).
//  - NCCL_MOELOOP_OVERLAP_SCAN=64 (default) | N | 0: a new copy-transport put scans at most N puts
//    in flight to its peer for overlapping destinations; with more in flight its stream waits for
//    the latest put of every other stream instead (fedde70). 0 (or `all`): always scan (before
//    fedde70).
//  - NCCL_MOELOOP_COPY_TIMING=0 (default) | 1: time every copy-path put's copies on the GPU with
//    CUDA events (moeloopStats_t::hopCopyGpuNs), a diagnostic.
struct GinTuning {
  bool coalesceSignals = true;
  size_t overlapScanLimit = 64;  // 0: no limit
  bool copyTiming = false;
};
const GinTuning& ginTuning();
// The switches as the environment would set them (nullptr: unset); a malformed value warns and
// keeps the default.
GinTuning ginTuningFrom(const char* coalesce, const char* overlapScan);
// Unit tests: use *t instead of the environment's switches (nullptr: back to the environment).
void setGinTuningForTesting(const GinTuning* t);

// Records a sticky error on `c` (first one wins) and returns it.
ncclResult_t ginFail(GinCollComm* c, ncclResult_t res);
// Applies a signal operation to a local registration (after the payload it follows is in place),
// after any queued update.
ncclResult_t ginApplySignal(GinCollComm* c, GinRegistration* sig, uint64_t sigOff, uint32_t op,
                            uint64_t value);
// The same for a put received in a progress pass: summed into the pending update when it is for
// the same word, else queued after writing the pending one (GinCollComm::pendingSig). Payloads are
// in place before their headers are read, so a later write shows nothing early; writes of
// different words keep their order. hdrNs != 0: a timed put (header fully read at hdrNs, wireNs
// on the wire), whose wire and apply hops are recorded when the update is written.
ncclResult_t ginQueueSignal(GinCollComm* c, GinRegistration* sig, uint64_t sigOff, uint32_t op,
                            uint64_t value, uint64_t hdrNs = 0, uint64_t wireNs = 0);
// Writes the pending update, if any (the end of every progress pass).
ncclResult_t ginFlushSignal(GinCollComm* c);
void ginCloseMesh(GinCollComm* c);

// --- copy transport (moeloop_gin_copy.cc) -------------------------------------------------------
// Whether this process offers the copy transport: NCCL_MOELOOP_TRANSPORT=copy (default) or
// socket, the CUDA driver's VMM entry points and unix sockets (descriptors travel over them).
// A fallback to sockets is logged once per process.
bool ginCopyWanted();
// Unit tests: 1 offers the copy transport whatever the environment and the driver (host-memory
// registrations are never exported, so their puts still use the socket path), 0 never, -1 back to
// the environment.
void setCopyTransportForTesting(int mode);
// regMrSym: exports a CUDA registration and queues its announcement to every copy peer.
ncclResult_t ginCopyAnnounce(GinCollComm* c, GinRegistration* r);
// deregMrSym: queues the registration's retirement to every copy peer.
ncclResult_t ginCopyRetire(GinCollComm* c, GinRegistration* r);
// Decides the path of queued puts to `peer` and hands their payloads to the copy engine, as far
// as the token bucket allows, in queue order. Stops at the first put taking the socket path.
ncclResult_t ginCopyIssue(GinCollComm* c, int peer);
// Stamps readyNs of every issued copy-path put to `peer` whose copies are seen complete, in each
// stream's order (one pending event query per stream and pass), so that a put's shaped latency
// starts when its own copies complete, not when the puts before it have been sent.
ncclResult_t ginCopyPollReady(GinCollComm* c, int peer);
// Whether the header of `r` (front of peer's queue, not a socket-path put) may be sent now: its
// copies completed and the shaped latency has passed since.
ncclResult_t ginCopyFrontReady(GinCollComm* c, GinRequest* r, bool* ready);
// The puts in flight to p (p.sendQueue[0, p.issuedCount)) that put r, its stream chosen, must
// wait for before its copies, each passed to `wait` (its event is recorded): with at most
// scanLimit in flight (0: any number) those on other streams writing bytes r writes; with more,
// the latest put of every other stream (p.lastOnStream).
ncclResult_t ginCopyWaitsFor(const GinPeer& p, const GinRequest& r, size_t scanLimit,
                             const std::function<ncclResult_t(const GinRequest*)>& wait);
// Called once `r`'s header is sent: releases what the message held (an exported fd).
void ginCopySent(GinCollComm* c, GinRequest* r);
// An announcement or retirement from `peer` (its header is `h`).
ncclResult_t ginCopyOnMessage(GinCollComm* c, int peer, const GinWireHeader& h);
// Waits for copies in flight, unmaps every peer mapping, frees streams, events and descriptors.
void ginCopyTeardown(GinCollComm* c);

}  // namespace moeloop
