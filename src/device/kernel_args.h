// The contract between the host runtime and the kernels: limits, the arguments of every kernel
// and its host launcher (one launcher per kernel file), the device state and error records.
// The bottom layer: host code (src/*.cc, net/) and kernels (src/device/**) include it, and it
// includes nothing of either (only CUDA's runtime and NCCL's device-API types).
#pragma once
#include <stdint.h>
#include <cuda_runtime.h>
#include <nccl.h>
#include <nccl_device.h>

namespace nccl_moe {

// Limits that kernels size their arrays by; the host validates configs against them (config.h).
constexpr int kMaxTopK = 32;        // one warp lane per top-k entry
constexpr int kMaxRanks = 256;      // ranks of an EP communicator (world ranks, all nodes)
constexpr int kMaxHtRanks = 32;     // high-throughput mode and the layout kernel: one warp lane
                                    // per peer, 32-bit rank masks
constexpr int kFp8GroupSize = 128;  // channels sharing one FP32 scale

// Per-token rank masks of the low-latency kernels: bit r % 32 of word r / 32 stands for rank r.
// Up to 32 ranks they are one word, as the kernels' fast paths assume.
constexpr int kRankMaskWords = kMaxRanks / 32;
__host__ __device__ constexpr int rankMaskWords(int nRanks) { return (nRanks + 31) / 32; }

// A set of ranks (bit r % 32 of word r / 32), passed by value: the failed ranks the host knew of
// when it enqueued a low-latency kernel (ncclMoeMarkRankFailed and earlier timeouts).
struct RankSet {
  uint32_t words[kRankMaskWords];
  __host__ __device__ bool has(int r) const { return (words[r / 32] >> (r % 32)) & 1u; }
};

// Signal kinds of the high-throughput kernels (rows of the window's signals region, each
// [kMaxRanks] uint64 indexed by the writing rank). kSigCombineSource is not a counter: rank s
// stores there the window offset of its expert outputs, before its kSigCombineReady signal.
// kSigNetCounts (several nodes): rank r stores the dispatch's sequence number there once the
// counts rows of its rail peers on every other node have landed in its window.
enum SignalKind { kSigDispatchCounts = 0, kSigDispatchDone = 1, kSigCombineReady = 2,
                  kSigCombineDone = 3, kSigCombineSource = 4, kSigNetCounts = 5, kSignalKinds = 6 };

// Kernel-detected failures, written once (first error wins) into host-mapped memory so that a
// later API call reports them without synchronising. code: one of DeviceErrorCode.
// Each context has two records (ncclMoeComm::errorHost[2]):
//  [kErrorSticky] timeouts, protocol errors and overflows: every rank of the operation sees them
//                 (or stops in step), and every later call on the context fails with them;
//  [kErrorLocal]  bad input found on this rank only (expert ids out of range, an LL expert
//                 repeated within a token): the entry is dropped, the operation still
//                 communicates; ncclMoeCheckErrors reports the record once and clears it.
enum DeviceErrorCode : int {
  kDevOk = 0,
  kDevTimeout = 1,      // a = signal kind, b = peer rank, c = value seen
  kDevOverflow = 2,     // a = destination rank, b = rows it would receive, c = capacity
  kDevBadExpert = 3,    // a = token, b = k, c = expert id (truncated to int)
  kDevPeerAhead = 4,    // a = signal kind, b = peer rank, c = how many operations it is ahead
  kDevRepeatedExpert = 5,  // LL: a = token, b = k, c = expert id named twice by the token
  kDevRankFailed = 6,   // LL: a = wait kind, b = the rank that timed out, c = value seen; the rank
                        // joined the failed set (local record: the context stays usable)
};
constexpr int kErrorSticky = 0, kErrorLocal = 1, kErrorRecords = 2;
// Wait kinds of the low-latency kernels in timeout reports (HT waits report their SignalKind).
constexpr int kWaitLlDispatch = 16;
constexpr int kWaitLlCombine = 17;
constexpr int kWaitGinSignal = 18;  // net/: a GIN signal (peer = the rank whose puts it counts)

struct DeviceError {
  int code, a, b, c;  // the first error of the record
  int fatal;          // sticky record: set by every timeout and protocol error, whatever error
                      // came first; every later wait of the context then gives up at once
  int claimed;        // 1 once a thread owns the record: it writes a, b, c, fences, and only
                      // then publishes `code`, so a reader that sees code != 0 sees the payload
};

constexpr int kMaxBufferSlots = 8;  // low-latency operations in flight

// Per-context device state (device memory, zeroed at creation).
struct DeviceState {
  unsigned long long dispatchSeq;  // dispatch kernels completed on this rank
  unsigned long long combineSeq;   // combine kernels completed on this rank
  unsigned int dispatchArrived;    // CTAs of the running dispatch kernel that finished
  unsigned int combineArrived;     // likewise for combine
  unsigned long long dispatchClaim; // HT intranode dispatch: ((seq mod 2^32) << 32) | next token
                                    // to claim, of the dispatch with sequence number seq; never
                                    // reset by the host (ht/token_claim.h)
  // Low-latency mode, per buffer slot: sends issued on this rank (the epoch of the slot's
  // signals; equal on every rank since all ranks run the same operations in the same order).
  unsigned long long llDispatchSends[kMaxBufferSlots];
  unsigned long long llCombineSends[kMaxBufferSlots];
  unsigned int llDispatchArrived[kMaxBufferSlots];  // CTAs of the running send, per slot, so
                                                    // that sends of two slots may overlap
  unsigned int llCombineArrived[kMaxBufferSlots];   // likewise for the combine send (used on
                                                    // several nodes only: its last CTA puts)
  // Layout kernel (one at a time per context, stream-ordered like the dispatch that uses it).
  unsigned int layoutTicket;        // tiles claimed by the running layout's CTAs
  unsigned long long layoutEpoch;   // layouts completed: the tile flags' value of the next one
  // Low-latency failed-rank set as the kernels found it: a wait that timed out on rank r sets
  // bit r (atomicOr), and every later wait for r gives up at once. Mirrored into host-mapped
  // memory (WindowView::failedHost) for ncclMoeGetFailedRanks.
  unsigned int failedRanks[kRankMaskWords];
  // Low-latency one-launch form (one_launch_lsa.cu), per buffer slot; never reset, only the
  // kernels of that form touch them:
  unsigned long long llOneLaunchTickets[kMaxBufferSlots];  // dispatch CTAs started so far: each
      // launch takes exactly its grid's count, so ticket % grid is a CTA's rank in its launch and
      // ticket / grid the launch's number (64 bits: never wraps)
  unsigned long long llOneLaunchGo[kMaxBufferSlots];  // ((launch number + 1) mod 2^32) << 32 |
      // (epoch mod 2^32) of the last dispatch launch whose first CTA finished waiting for the
      // sources: releases that launch's other CTAs and tells them the epoch
  unsigned int llOneLaunchArrived[kMaxBufferSlots];  // combine CTAs past their signal share in
      // the running launch (the last one completes; it resets the count)
};

// Scratch of the layout kernel, [tiles] = ceil(maxTokensPerRank / kLayoutTileTokens) (device).
constexpr int kLayoutTileTokens = 256;
struct LayoutScratch {
  int* tileTokens;               // [tiles][2R]: tokens of the tile going to each rank, then to
                                 // each node (R + N columns used; N <= R)
  int* tileExperts;              // [tiles][E]: (token, k) entries of the tile per expert
  unsigned long long* tileFlags; // [tiles]: epoch of the layout that published the tile
  // Device bytes for a context, and the arrays carved out of such an allocation `mem`.
  static size_t bytes(int maxTokens, int nRanks, int numExperts);
  static LayoutScratch carve(void* mem, int maxTokens, int nRanks, int numExperts);
};

// Routing of one dispatch, on the device (owned by the handle). R = ranks, K = top-k.
struct RoutingView {
  int* sendPos;          // [maxTokens][R]: row of token t among those this rank sends to rank r
                         // (0-based, in token order), -1 if t does not go to r
  int64_t* topkIdx;      // [maxTokens][K]: copy of the routing's expert ids (-1 = none), so
                         // that a reused routing needs no input from the caller
  int* tokensPerRank;    // [R]
  int* tokensPerExpert;  // [E]
  int* sendOffset;       // [R]: first row of this rank's tokens in rank r's output (dispatch)
  int* recvCounts;       // [1 + E/R]: rows received, then rows per local expert (dispatch)
  int* dispatchEmpty;    // [1]: 1 when the routing's last dispatch delivered no row (overflow,
                         // or a wait that failed): its counts are 0 and its combine reads nothing
  // Several nodes only (NULL on one node; N nodes of G ranks, INTERNODE.md §3):
  int* nodeSlot;         // [maxTokens][N]: t's slot in the dense list of this rank's tokens that
                         // need node n (token order), -1 if none (layout)
  int* nodeList;         // [N][maxTokens]: slot -> token of those lists (layout)
  int* tokensPerNode;    // [N]: length of each list: records to node n (layout)
  int* netRows;          // [N][maxTokens][G]: for the records that landed here from node a's rail
                         // peer of this rank (slot order), the row on each rank j of this node
                         // (-1: none); written by the dispatch, read by the combine
  int* netRecords;       // [N]: records landed from each node (0 for this node; dispatch)
};

struct LayoutArgs {
  const int64_t* topkIdx;  // [T][K]
  int numTokens, topK, numExperts, nRanks;
  int ranksPerNode;        // G: rank r is on node r / G, of N = nRanks / G (NodeMap)
  int* sendPos;            // [T][R] or NULL
  int64_t* topkIdxCopy;    // [T][K] or NULL: receives a copy of topkIdx
  int* tokensPerRank;      // [R]
  int* tokensPerExpert;    // [E]
  uint8_t* isTokenInRank;  // [T][R] or NULL
  int* tokensPerNode;      // [N] or NULL
  uint8_t* isTokenInNode;  // [T][N] or NULL
  int* nodeSlot;           // [T][N] or NULL: t's index among the tokens to node n, -1 if none
  int* nodeList;           // [N][maxTokens] or NULL: nodeList[n][nodeSlot[t][n]] = t
  int maxTokens;           // row stride of nodeList
  DeviceError* error;      // the local record: ids outside [-1, E)
  DeviceState* state;      // layoutTicket / layoutEpoch
  LayoutScratch scratch;
};
// ceil(T / kLayoutTileTokens) CTAs (at least one), one token per thread.
cudaError_t launchLayout(const LayoutArgs& args, cudaStream_t stream);
cudaError_t loadLayoutKernel();  // loads it without running it (see loadLlDispatchNetKernels)

// Where the ranks of the EP communicator are, as the kernels see them (the peer abstraction;
// device helpers in device/common/peers.cuh). A node is a run of lsaSize consecutive world
// ranks sharing one NVLink domain: NCCL forms LSA teams that way, and net/node_map.h checks it
// (equal GPUs per node, node-contiguous ranks), so the map is arithmetic, with nothing to load:
//   world rank r is on node r / lsaSize, at local index r % lsaSize;
//   r is an LSA peer of this rank (NVLink load/store, LSA index r - lsaBase) iff it is on this
//   rank's node; every other rank is remote (GIN, net/).
// A single-node context has lsaBase 0 and lsaSize nRanks: every peer is LSA, LSA index = rank.
constexpr int kPeerRemote = -1;
struct PeerMap {
  int rank;     // this rank in the EP communicator (world rank)
  int nRanks;   // ranks of the EP communicator
  int lsaBase;  // world rank of this node's first rank (node(rank) * lsaSize)
  int lsaSize;  // ranks per node; divides nRanks
  __host__ __device__ int node(int r) const { return r / lsaSize; }
  __host__ __device__ int localIndex(int r) const { return r % lsaSize; }
  __host__ __device__ int nodes() const { return nRanks / lsaSize; }
  // LSA index of world rank r (for ncclGetLsaPointer), or kPeerRemote when r is on another node.
  __host__ __device__ int lsaIndex(int r) const {
    return (unsigned)(r - lsaBase) < (unsigned)lsaSize ? r - lsaBase : kPeerRemote;
  }
};

// Everything the HT kernels need to find the window and synchronise with peers.
struct WindowView {
  ncclWindow_t win;
  PeerMap peers;
  size_t signalsOff, countsOff;   // byte offsets in the window (WindowLayout)
  DeviceState* state;
  DeviceError* error;       // the sticky record
  DeviceError* localError;  // the local record (bad input of this rank)
  unsigned int* failedHost; // [kRankMaskWords] host-mapped mirror of state->failedRanks
  long long timeoutNs;
};

struct DispatchArgs {
  WindowView w;
  RoutingView routing;
  const void* x;                // [T][H] dispatch dtype
  const float* xScales;         // [T][H/128] or NULL
  const float* topkWeights;     // [T][K] or NULL
  int numTokens, hidden, topK, numExperts, capacity;
  int rowBytes;                 // bytes of one token row (H * dtype bytes)
  int scaleCols;                // H/128 for FP8, 0 for BF16
  size_t recvXOff, recvScalesOff, recvTopkIdxOff, recvTopkWeightsOff;
  // Host counts (NULL: none): host-mapped int32 [2 + E/R]. CTA 0 stores the counts it leaves in
  // routing.recvCounts to [1..], then, after a system-scope fence, hostSeq to [0]: the host
  // reads the counts once [0] == hostSeq, while the rows still move.
  int* hostCounts;
  int hostSeq;
};
cudaError_t launchDispatchHtIntranode(const DispatchArgs& args, int numCtas, cudaStream_t stream);

struct CombineArgs {
  WindowView w;
  RoutingView routing;
  size_t inOff;                 // byte offset of this rank's expert outputs [rows][H] BF16 in its
                                // window, published to the peers (each reads it per rank)
  const float* topkWeights;     // [T][K] or NULL (unweighted)
  uint16_t* out;                // [T][H] BF16
  int numTokens, hidden, topK, numExperts;
  // Per-row top-k values returned with the rows (ncclMoeCombineWithWeights); outTopkWeights NULL
  // selects the kernel without them. recvWeightsOff: byte offset of every rank's [rows][K] FP32
  // values in its window (the same on every rank); outTopkWeights [T][K] FP32: their sums.
  size_t recvWeightsOff;
  float* outTopkWeights;
};
cudaError_t launchCombineHtIntranode(const CombineArgs& args, int numCtas, cudaStream_t stream);
// The same combine with Hopper bulk copies (combine_tma.cu; sm_90, NCCL_MOE_HT_COMBINE=tma):
// each CTA pulls rows through kTmaStages shared-memory stages of kTmaChunkBytes bytes, split
// into one ring per consumer group (dynamic shared memory: kTmaStages * kTmaChunkBytes). Bitwise
// the same outputs; the top-k
// values of ncclMoeCombineWithWeights are not supported (outTopkWeights must be NULL).
// Full rows of H 7168 BF16 in one copy: the measured kernel paid ~0.4 us per bulk copy per SM
// whatever its size (8 KiB stages: 901 us at 8 SMs), so fewer, larger copies move more bytes.
constexpr int kTmaStages = 12;
constexpr int kTmaChunkBytes = 14336;
cudaError_t launchCombineHtTma(const CombineArgs& args, int numCtas, cudaStream_t stream);

// The internode part of the high-throughput kernels (several nodes; INTERNODE.md §3, the
// dense-slot mirror; host side net/ht_regions.h and net/gin_setup.h). Regions are byte offsets
// in the window; "remote node index" counts the other nodes in node order, this rank's skipped.
// Work is cut into chunks of one dense per-node list (dispatchChunk records, kHtNetChunk
// partials); chunk k belongs to channel (CTA) k % numCtas on every rank, which is why every rank
// launches numSms CTAs: the puts of one channel to one peer land in order, and the channel's GIN
// signal at the receiver counts the slots (records, partials) landed so far, plus 2^32 once
// the channel's last one has (GinSignalPlan, net/device/channels.h). Both sides derive the chunks
// from the same counts.
struct HtNetArgs {
  ncclDevComm devComm;     // with GIN contexts and the HT signal plan's signals
  int maxTokens;           // M: slots per remote node (config.maxTokensPerRank)
  int dispatchChunk;       // records per dispatch put (chunk of the dispatch's channels): about
                           // kHtNetMessageBytes of records, a power of two in [16, 256]
  int recordBytes;         // record layout (net/ht_regions.h HtRecordLayout), multiples of 16
  int recordPos, recordExpert, recordWeight, recordData, recordScales;
  int partialBytes;        // combine only (set per call): one partial row, H BF16, then (per-row
                           // values, ncclMoeCombineWithWeights) K FP32 sums; a multiple of 16
  int countsBytes;         // one counts row: int32 [R] rows to every rank, int32 records, int32
                           // [G][L] rows per expert of the destination node's ranks; padded to 16
  size_t dispatchStage;    // [N-1][M][record] this rank's records, by remote node, dense slots
  size_t dispatchLand;     // [N-1][M][record] records from the rail peer on each remote node
  size_t countsStage;      // [N-1][countsBytes]
  size_t countsLand;       // [N-1][countsBytes] the rail peers' counts rows for this node
  size_t combineStage;     // [N-1][M][partialBytes] partials returned to each remote node's rail peer
  size_t combineLand;      // [N-1][M][partialBytes] partials of this rank's records, by remote node
  size_t weightStage;      // [N-1][M][G] FP32 combine weights of this rank's records, per rank of
                           // the remote node (1 for every rank when unweighted: always sent)
  size_t weightLand;       // [N-1][M][G] the rail peers' combine weights for their records
  int sigData0;            // GIN signal ids (GinSignalPlan): + src * numCtas + channel
  int sigPartials0;
  int sigWeights0;         // + src (one put per source and operation, on channel 0's context)
  int sigCounts0;          // + src
  int sigDispatchDone0;    // + src
  int sigCombineDone0;     // + src
};
constexpr int kHtNetChunk = 64;  // slots per chunk of the combine: partials (or weights) per GIN put
constexpr size_t kHtNetMessageBytes = 1 << 20;  // the dispatch's records per put, in bytes (about)

struct DispatchNetArgs {
  DispatchArgs d;
  HtNetArgs net;
};
// numCtas must be the config's numSms on every rank (the channel map). Same outputs as the
// intranode dispatch; also fills routing.netRows / netRecords for the combine.
cudaError_t launchDispatchHtNet(const DispatchNetArgs& args, int numCtas, cudaStream_t stream);

struct CombineNetArgs {
  CombineArgs c;
  HtNetArgs net;
  int withValues;  // ncclMoeCombineWithWeights on every rank (c.outTopkWeights may be NULL when
                   // this rank has no tokens); net.partialBytes must include the K values
};
// numCtas: as launchDispatchHtNet.
cudaError_t launchCombineHtNet(const CombineNetArgs& args, int numCtas, cudaStream_t stream);
// Load the internode HT kernels now (see loadLlDispatchNetKernels for why).
cudaError_t loadHtDispatchNetKernel();
cudaError_t loadHtCombineNetKernel();

// Copies rows [0, *numRows) of src ([*][rowBytes]) to dst with numCtas CTAs (rowBytes % 16 == 0).
cudaError_t launchCopyRows(void* dst, const void* src, const int* numRows, int rowBytes,
                           int numCtas, cudaStream_t stream);
// Loads both copy kernels without running them (see loadLlDispatchNetKernels).
cudaError_t loadCopyRowsKernels();
// Copies rows [0, *numRows) of src ([*][topK] FP32) to dst with numCtas CTAs.
cudaError_t launchCopyTopkRows(float* dst, const float* src, const int* numRows, int topK,
                               int numCtas, cudaStream_t stream);

// Byte offsets of one low-latency buffer slot, relative to the slot's start in the window.
// L = local experts, B = R * maxTokensPerRank rows per expert, M = maxTokensPerRank.
struct LowLatencySlotLayout {
  size_t dispatchSignals;  // uint64 [R]: ((epoch mod 2^32) << 32) | tokens sent, by source rank s
  size_t combineSignals;   // uint64 [R]: CTAs of rank r's combine send that finished (adds)
  size_t recvCounts;       // int32 [L][R] then [L]: rows per (expert, source) (written by the
                           // sources), rows per expert (written by the completion)
  size_t route;            // LlRouteEntry [R][M][K]: where source s's token t went on this rank
  size_t tokenRanks;       // uint32 [M][rankMaskWords(R)]: rank mask of the ranks this rank's
                           // token t went to
  size_t recvX;            // [L][B][rowBytes]
  size_t recvScales;       // [L][B][scaleBytesPerRow]
  size_t srcToken;         // int32 [L][B]: token index on the source rank
  size_t combineRecv;      // BF16 [M][R][H]: partial sums returned to this rank, per (t, rank)
  size_t combineInput;     // BF16 [L][B][H]: optional in-window expert outputs
  size_t bytes;            // size of one slot (a multiple of 4096)
};

// Pair (t, k) of source s as seen by the rank that owns its expert: the row it fills in x
// (l * B + s * M + pos), -1 when expert k of t lives on another rank (or k is unused), and the
// pair's combine weight (1 for an unweighted dispatch). 8 bytes, written by the source.
struct LlRouteEntry {
  int row;
  float weight;
};

// The internode part of one low-latency slot (INTERNODE.md §4; host side net/regions.h,
// net/gin_setup.h). Empty (enabled = 0) on a single node: the kernels then run their LSA-only
// instantiation. Regions are byte offsets of this slot's internode part in the window; rows per
// remote rank are indexed by remoteIndex (net/device/rail.h). Record: see LlRecordLayout.
struct LlNetArgs {
  int enabled;              // 1 when the communicator spans several nodes
  ncclDevComm devComm;      // with GIN contexts and the signal plan's signals
  int recordBytes;          // record size (multiple of 16): header, then data, then scales
  int recordData;           // offset of the row in a record (= header bytes)
  int recordScales;         // offset of the scales in a record
  int countsBytes;          // bytes of one counts row: int32 [L] rows per local expert, then
                            // int32 records, padded to 16
  size_t dispatchStage;     // [remote][M][record] records this rank sends, per destination
  size_t dispatchLand;      // [remote][M][record] records received, per source
  size_t countsStage;       // [remote][countsBytes] this rank's counts for each destination
  size_t countsLand;        // [remote][countsBytes] each source's counts for this rank
  size_t combineStage;      // [remote][M][H] BF16 partials returned, per source (record order)
  size_t combineLand;       // [remote][M][H] BF16 partials received, per expert rank
  size_t sendIndex;         // int32 [M][remote]: record index of token t at each destination
                            // (-1: none), this rank's own bookkeeping
  size_t destCount;         // int32 [remote]: records reserved per destination in the running
                            // send (zero between sends)
  int dispatchSignal0;      // GIN signal id of (this slot, source 0) for dispatch; + source rank
  int combineSignal0;       // likewise for combine (+ the expert rank that puts)
};
constexpr int kLlNetBatch = 16;  // records (or partials) per GIN put

struct LlDispatchArgs {
  WindowView w;
  LlNetArgs net;
  size_t slotOff;          // byte offset of the slot in the window
  LowLatencySlotLayout slot;
  int slotIndex;
  const uint16_t* x;       // [T][H] BF16
  const int64_t* topkIdx;  // [T][K]
  const float* topkWeights;  // [T][K] or NULL (unweighted)
  int numTokens, hidden, topK, numExperts, maxTokens;
  int fp8;                 // cast to FP8 e4m3 in the sending warp
  int scaleFormat;         // ncclMoeScaleFormat_t
  int scaleBytes;          // bytes of one row's scales (0 for BF16)
  int* posCounter;         // [E] device: rows of this rank per expert in the running send
  RankSet failed;          // ranks this operation skips: no rows to them, no wait for them
};
// Send: numCtas CTAs, waits for no peer. Complete: numCtas CTAs, waits for every source, then
// copies each token from its first expert row to its other expert rows on this rank.
cudaError_t launchLlDispatchSend(const LlDispatchArgs& args, int numCtas, cudaStream_t stream);
cudaError_t launchLlDispatchComplete(const LlDispatchArgs& args, int numCtas, cudaStream_t stream);

struct LlCombineArgs {
  WindowView w;
  LlNetArgs net;
  size_t slotOff;
  LowLatencySlotLayout slot;
  int slotIndex;
  const uint16_t* expertOut;  // [L][B][H] BF16 (send)
  uint16_t* out;              // [T][H] BF16 (complete)
  int numTokens, hidden, topK, numExperts, maxTokens;
  RankSet failed;             // ranks this operation skips (their partials count as zero)
  int signalTotal;            // what every rank's send adds to each peer's combine signal per
                              // operation, whatever its CTA count (the config's numSms)
};
// What CTA `cta` of a combine send of numCtas (1..total) CTAs adds to each peer's combine
// signal: CTA 0 total - (numCtas - 1), the others 1. The shares sum to `total` for every numCtas
// and each is >= 1, so a waiter sees exactly total * epoch only once every CTA has added its own.
__host__ __device__ inline uint64_t llCombineSignalShare(int cta, int numCtas, int total) {
  return cta == 0 ? (uint64_t)(total - (numCtas - 1)) : 1u;
}
// Send: numCtas (<= signalTotal) CTAs, waits for no peer. Complete: at most maxCtas CTAs, as many
// as this rank's tokens need; waits for every rank's signalTotal, then sums the partials.
cudaError_t launchLlCombineSend(const LlCombineArgs& args, int numCtas, cudaStream_t stream);
cudaError_t launchLlCombineComplete(const LlCombineArgs& args, int maxCtas, cudaStream_t stream);

// One-launch form of one-shot low-latency calls on one node (one_launch_lsa.cu): the same
// protocol, rows, signals and bits as the send + completion pair, in one kernel, for batches
// where the fixed cost of two launches and of the send's grid-wide end dominates (the host
// picks it by this rank's T: llOneLaunchChosen in config.h; ranks need not agree). Each
// launcher sizes its grid from the context's shape alone (the most tokens the sources can send:
// R * maxTokensPerRank, llOneLaunchCtas), at most maxCtas (the config's numSms), so the grid is
// the same on every launch of a context.
//  - Dispatch: the first CTA to start (ticket order) sends all T tokens alone (per-expert row
//    counters in its shared memory: no atomics across CTAs, no last-CTA chain), signals, waits
//    for every source and writes the counts; the CTAs share out the fan-out as the completion's
//    do, the others starting once that CTA's wait is over (it tells them the epoch). Dynamic
//    shared memory: E ints.
//  - Combine: from the tokens the sources sent here (their dispatch signals) each CTA computes
//    how many CTAs the send items need (llOneLaunchCtas), the others return at once; each
//    working CTA sends its share of partials and adds its share of signalTotal; the last one
//    to finish (with one CTA, that one) waits for every rank and sums this rank's T tokens.
// No CTA waits for a CTA of its launch that may not have started: the dispatch's other CTAs wait
// for its first CTA, which has (it took the first ticket), and that one waits only for peers;
// the combine's finisher waits only for peers.
cudaError_t launchLlDispatchOneLaunch(const LlDispatchArgs& args, int maxCtas, cudaStream_t stream);
cudaError_t launchLlCombineOneLaunch(const LlCombineArgs& args, int maxCtas, cudaStream_t stream);
// Allows the one-launch dispatch kernel maxExperts ints of dynamic shared memory on the current
// device (the host passes config.h's kMaxExperts); called at each low-latency context's creation
// on one node, it also loads both one-launch kernels (no lazy load inside the first operation).
cudaError_t prepareLlOneLaunchKernels(int maxExperts);
// Items (token, chunk) one CTA of the one-launch kernels takes before another CTA is used: two
// per warp of 16.
constexpr int kLlOneLaunchItemsPerCta = 32;
// CTAs for `items` one-launch items: 1 up to kLlOneLaunchItemsPerCta, at most maxCtas (>= 1).
__host__ __device__ inline int llOneLaunchCtas(long long items, int maxCtas) {
  const long long n = (items + kLlOneLaunchItemsPerCta - 1) / kLlOneLaunchItemsPerCta;
  return n < 1 ? 1 : n > maxCtas ? maxCtas : (int)n;
}
// Loads every low-latency kernel of the multi-node (kNet) form into the current device's context
// without running it (cudaFuncGetAttributes: CUDA's lazy loading loads a kernel at its first
// launch, under the context's lock and after the context's running kernels end).
cudaError_t loadLlDispatchNetKernels();
cudaError_t loadLlCombineNetKernels();

// One CTA syncs LSA barrier 0 of devComm with every LSA peer (creation-time check).
cudaError_t launchLsaBarrier(const ncclDevComm& devComm, cudaStream_t stream);

// Sets GIN signals 0 .. count-1 of every GIN context of devComm to 0. NCCL (2.28) keeps the
// signal words per communicator, not per device communicator: a new device communicator gets
// the id range a destroyed one freed, with the values it left (ncclDevCommCreate does not clear
// them). Run at creation, before any peer may signal (a collective step follows).
cudaError_t launchGinSignalReset(const ncclDevComm& devComm, int count, cudaStream_t stream);

// Creation's proof that GIN delivers between every pair of nodes, before any operation: every
// rank puts `bytes` from its staging row for each remote rank d (stageOff + remoteIndex(d) *
// rowBytes) to its row in d's landing region (landOff + its remote index at d * rowBytes) with
// +1 on GIN signal `signal` (signals cleared and every rank past a vote first), then waits up to
// timeoutNs until its own `signal` counts every remote rank. *arrived (host-mapped): the count
// seen. The regions are the LL internode ones, which no operation reads before writing.
struct GinHandshakeArgs {
  ncclDevComm devComm;
  ncclWindow_t win;
  PeerMap peers;
  size_t stageOff, landOff, rowBytes, bytes;  // byte offsets / sizes in the window
  int signal;
  long long timeoutNs;
  unsigned long long* arrived;  // device address of a host-mapped word
};
cudaError_t launchGinHandshake(const GinHandshakeArgs& args, cudaStream_t stream);

}  // namespace nccl_moe
