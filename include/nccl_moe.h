/*
 * nccl-moe: expert-parallel dispatch / combine for Mixture-of-Experts, built on NCCL.
 *
 * The only header a user includes. Conventions follow nccl.h:
 *  - every call returns ncclResult_t; on failure ncclMoeGetLastError() names the argument and
 *    value at fault (thread-local string);
 *  - operations are stream-ordered and asynchronous unless a parameter says otherwise;
 *  - creation and destruction are collective over the ncclComm_t (every rank calls them, with
 *    the same configuration), like ncclCommInitRank.
 *
 * Threads: an EP context, its handles and its low-latency outputs are not thread-safe. Calls
 * on one context (dispatch, combine, check, destroy, ...) must come from one thread at a time,
 * as for an ncclComm_t; different contexts may be used from different threads concurrently.
 *
 * Objects: every call checks its ncclMoeComm_t and ncclMoeHandle_t against the library's set of
 * live objects before reading them, so a destroyed (or never created) object, a double destroy,
 * or a handle passed as a context, gives ncclInvalidArgument instead of undefined behaviour. The
 * memory of the last 64 destroyed objects of each kind stays reserved, so a stale pointer to any
 * of them is always recognised; an older one whose address was reused by a new object of the
 * same kind cannot be told from that object.
 *
 * Pointer arguments: device memory of the context's device (or managed memory, or mapped pinned
 * host memory; pageable host memory only where the device can read it, HMM/ATS), aligned to its
 * element type (int64 to 8 bytes, float and int32 to 4, token rows to 16). Anything else is
 * rejected with ncclInvalidArgument before a kernel sees it. A pointer is checked once with
 * cudaPointerGetAttributes (about 1 us of host time); the context remembers the last 64
 * accepted addresses, so reused buffers cost nothing after their first call.
 *
 * Errors: a failed call returns at once on the calling rank. Three kinds:
 *  - local argument errors (ncclInvalidArgument / ncclInvalidUsage from a check of the call's
 *    arguments): nothing was enqueued, the context is unchanged and usable; no peer is told, so
 *    if the other ranks made the call they now wait for this one, and time out after timeoutMs
 *    unless this rank makes a valid call of the same kind;
 *  - errors found by kernels (ncclMoeCheckErrors): sticky ones (timeout in high-throughput mode,
 *    protocol error, HT overflow) make every later call on the context fail at once with the
 *    same error, until the context is destroyed with ncclMoeCommDestroy (which works after them)
 *    and created again; local ones (bad expert ids; a low-latency timeout, which puts the late
 *    rank into the failed-rank set) are reported once and do not stop the context;
 *  - a call that enqueued part of its kernels and failed to launch the rest
 *    (ncclUnhandledCudaError): sticky as well; destroy the context and create it again.
 * ncclMoeCommCreate is collective in its failures too (see there).
 *
 * Vocabulary (units are stated next to every parameter):
 *  R        ranks of the communicator (the EP group), all in one NVLink domain for now;
 *  E        experts in total, E/R per rank: expert e lives on rank e / (E/R);
 *  T        tokens this rank sends in one dispatch (T <= maxTokensPerRank);
 *  H        hidden size in elements;
 *  K        top-k: expert ids per token, -1 meaning "no expert";
 *  row      one received token: a token is received once by every rank that owns at least one
 *           of its experts, whatever the number of its experts there.
 */
#ifndef NCCL_MOE_H_
#define NCCL_MOE_H_

#include <stddef.h>
#include <stdint.h>
#include <cuda_runtime.h>
#include <nccl.h>

#ifdef __cplusplus
extern "C" {
#endif

#define NCCL_MOE_MAJOR 0
#define NCCL_MOE_MINOR 1
#define NCCL_MOE_PATCH 0
#define NCCL_MOE_VERSION_CODE (NCCL_MOE_MAJOR * 10000 + NCCL_MOE_MINOR * 100 + NCCL_MOE_PATCH)

/* Version of the library actually loaded (NCCL_MOE_VERSION_CODE of its build). */
ncclResult_t ncclMoeGetVersion(int* version);

/* NCCL versions, in NCCL_VERSION_CODE encoding (2.30.7 -> 23007): `buildVersion` the NCCL whose
 * headers the library was compiled with, `runtimeVersion` the NCCL loaded in this process
 * (ncclGetVersion). Either pointer may be NULL, not both. The library runs only on the
 * major.minor it was built against (its kernels embed NCCL's device structs):
 * ncclMoeCommCreate fails with ncclInvalidUsage, naming both versions, otherwise. Supported
 * lines: 2.28 (from 2.28.9), 2.29, 2.30. */
ncclResult_t ncclMoeGetNcclVersion(int* buildVersion, int* runtimeVersion);

typedef enum {
  ncclMoeHighThroughput = 0, /* training / prefill: exact-sized output, count exchange first */
  ncclMoeLowLatency = 1      /* decode: fixed-size buffers, no host sync, send/complete split */
} ncclMoeMode_t;

typedef enum {
  ncclMoeBf16 = 0,   /* bfloat16 tokens, 2 bytes per element */
  ncclMoeFp8E4m3 = 1 /* float8 e4m3 tokens, 1 byte per element, plus one FP32 scale per
                        128 consecutive channels: scales are [T][H/128] row-major */
} ncclMoeDtype_t;

/* Scales of the low-latency FP8 cast, one per 128 channels of a row:
 *   ncclMoeScaleFp32      FP32 amax/448, [rows][H/128] float
 *   ncclMoeScaleFp32Pow2  FP32, rounded up to a power of two, [rows][H/128] float
 *   ncclMoeScaleUe8m0     the same powers of two as exponent bytes (2^(b-127)), four per int32
 *                         (group 4j+i in byte i, little-endian), [rows][H/512] int32; needs
 *                         hidden % 512 == 0
 * In every format amax is clamped below at 1e-4, so an all-zero group gets a finite scale. */
typedef enum {
  ncclMoeScaleFp32 = 0,
  ncclMoeScaleFp32Pow2 = 1,
  ncclMoeScaleUe8m0 = 2
} ncclMoeScaleFormat_t;

#define NCCL_MOE_CONFIG_MAGIC 0x6d6f6531u /* "moe1" */

typedef struct {
  size_t size;           /* sizeof(ncclMoeConfig_t) as the caller compiled it */
  unsigned int magic;    /* NCCL_MOE_CONFIG_MAGIC */
  unsigned int version;  /* NCCL_MOE_VERSION_CODE the caller compiled against: must have the
                            library's major and not be newer than the library */
  ncclMoeMode_t mode;
  int numExperts;        /* E, > 0 and a multiple of the number of ranks */
  int hidden;            /* H in elements, 8..65536, a multiple of 8 (16-byte rows for BF16);
                            a multiple of 128 when dispatchDtype is FP8 */
  int topK;              /* K, 1..min(E, 32) */
  int maxTokensPerRank;  /* upper bound of T on any rank, > 0 */
  ncclMoeDtype_t dispatchDtype; /* HT: dtype of x in ncclMoeDispatch. LL: x is always BF16 and
                                   FP8 e4m3 means "cast to FP8 in the sending warp". Combine is
                                   always BF16. */
  int numSms;            /* CTAs each dispatch / combine kernel launches (persistent), 1..the
                            device's SM count; the layout kernel uses one CTA per 256 tokens */
  int outputCapacity;    /* rows each rank can receive in one dispatch, at most
                            R*maxTokensPerRank (<= 2^30); 0 = R*maxTokensPerRank (never overflows). A smaller value saves window memory; a dispatch
                            that would exceed it writes nothing and fails (see Dispatch). */
  int timeoutMs;         /* a kernel waiting on a peer gives up after this (ms); 0 = 30000 */
  int numBufferSlots;    /* low-latency mode: operations that may be in flight at once, each with
                            its own buffers, 1..8; 0 = 2. Ignored in HT mode. */
  ncclMoeScaleFormat_t fp8Scales; /* low-latency FP8 cast: format of the per-128 scales */
} ncclMoeConfig_t;

#define NCCL_MOE_CONFIG_INITIALIZER {                                              \
  sizeof(ncclMoeConfig_t), NCCL_MOE_CONFIG_MAGIC, NCCL_MOE_VERSION_CODE,             \
  ncclMoeHighThroughput, /*numExperts*/ 0, /*hidden*/ 0, /*topK*/ 0,                  \
  /*maxTokensPerRank*/ 0, ncclMoeBf16, /*numSms*/ 24, /*outputCapacity*/ 0,           \
  /*timeoutMs*/ 0, /*numBufferSlots*/ 0, ncclMoeScaleFp32 }

typedef struct ncclMoeComm* ncclMoeComm_t;     /* EP context on one ncclComm_t */
typedef struct ncclMoeHandle* ncclMoeHandle_t; /* routing of one dispatch, reused by combine */

/* Creates the EP context on `comm` (collective; blocking; every rank passes an equal config).
 * Allocates and registers the symmetric window that receives tokens (about
 * outputCapacity * (2*H*2 + H/32 + 12*K) bytes per rank) and an ncclDevComm with LSA barriers.
 * The current CUDA device must be comm's device. `comm` must outlive the EP context.
 * Failures are collective: every rank runs its own checks (current device, config, NVLink
 * domain) and then its own allocations, and after each of the two steps all ranks exchange a
 * status; if any rank failed, every rank fails with the same code and the same message, naming
 * the lowest failing rank ("ncclMoeCommCreate: rank 1: config.hidden = 12 must be ..."), and
 * ranks that passed different configs all fail naming the first field that differs. Local
 * only: NULL arguments, and a loaded NCCL of another major.minor (every rank loads the same NCCL:
 * it fails on all of them). Failures inside NCCL's own collectives (window registration, device
 * communicator) are NCCL's and behave as NCCL documents.
 * Several nodes (both modes): comm may span several nodes (NVLink domains) when its ranks are
 * node-contiguous (ranks n*G..n*G+G-1 on node n, as NCCL forms NVLink teams) with the same G on
 * every node. Peers on this rank's node are reached over NVLink as on one node, the others by
 * GPU-initiated networking (NCCL GIN): NCCL needs a NET plugin that provides GIN (an RDMA NIC
 * whose GIN it supports, or the repository's plugin/ on one host).
 *   Low latency: the window also holds, per slot, staging and landing rows for the remote ranks
 *   (about 2*(R-G)*maxTokensPerRank*(record + 2*H) bytes, record = H*dtype + scales + 8*K + 16).
 *   Outputs are the same, bit for bit, as on one node.
 *   High throughput: a token crosses the network at most once per remote node, as one record to
 *   the rank with the sender's local index there, which forwards it over NVLink to every rank of
 *   its node that owns one of its experts. The window also holds, per remote node, staging and
 *   landing rows of maxTokensPerRank records and BF16 partials (about
 *   (N-1)*maxTokensPerRank*(2*record + 4*H + 8*K + 8*G) bytes, record = H*dtype + scales + 8*K + 4*G +
 *   16). Dispatch outputs are the same, bit for bit, as on one node; the combine's rounding
 *   differs (ncclMoeCombine). Every rank must pass the same numSms (it is part of the config): the
 *   kernels' work is cut into numSms channels that pair up across ranks.
 * ncclMoeGetWindowSize does not count the internode rows.
 * Creation then clears the context's GIN signals and proves GIN between every pair of nodes (one
 * put with a signal from every rank to every remote rank, within timeoutMs); a path that does
 * not deliver fails creation on every rank (ncclSystemError, saying how many remote ranks'
 * puts arrived).
 * Errors: ncclInvalidArgument for a bad config (message names the field; also numSms too large
 * for the GIN signals across nodes); ncclInvalidUsage when its ranks are not node-contiguous or the nodes differ in GPUs (the message names the ranks), or when the NCCL
 * loaded is not the major.minor the library was built against (ncclMoeGetNcclVersion); when GIN
 * is unavailable across nodes, NCCL's error with a message saying what is missing. */
ncclResult_t ncclMoeCommCreate(ncclComm_t comm, const ncclMoeConfig_t* config, ncclMoeComm_t* moeComm);

/* Collective. Synchronises the device, frees the window. Handles must be destroyed first. Works
 * after any sticky error (timeout, protocol error). A destroyed context passed again (double
 * destroy, use after destroy): ncclInvalidArgument, nothing else happens. */
ncclResult_t ncclMoeCommDestroy(ncclMoeComm_t moeComm);

/* Routing statistics of `topkIdx` ([numTokens][K] int64, device memory, -1 = none), written to
 * device memory on `stream` (no host synchronisation):
 *   tokensPerRank   [R]  int32: tokens with at least one expert on each rank
 *   tokensPerExpert [E]  int32: (token, k) entries naming each expert (a token naming an expert
 *                        twice counts twice; real routing has no duplicates)
 *   isTokenInRank   [numTokens][R] uint8 (0/1), may be NULL.
 * Expert ids outside [-1, E) are counted nowhere; the next ncclMoeCheckErrors reports them once
 * (a local error, see there). Local (not collective). The layout kernel uses per-context scratch: it
 * must not run concurrently with another ncclMoeGetLayout(Nodes) or ncclMoeDispatch of the same
 * context on another stream. Errors: ncclInvalidArgument naming the argument (numTokens outside
 * 0..maxTokensPerRank, topkIdx NULL with numTokens > 0, a required output NULL, a pointer
 * misaligned or not accessible from the context's device); ncclInvalidUsage on more than 32
 * ranks. */
ncclResult_t ncclMoeGetLayout(ncclMoeComm_t moeComm, const int64_t* topkIdx, int numTokens,
                              int* tokensPerRank, int* tokensPerExpert, uint8_t* isTokenInRank,
                              cudaStream_t stream);

/* Host query, local, no CUDA call: N, the nodes the EP context spans (1 on one NVLink domain).
 * Node n holds ranks n*R/N .. (n+1)*R/N - 1 (ncclMoeCommCreate: node-contiguous ranks). */
ncclResult_t ncclMoeCommNodeCount(ncclMoeComm_t moeComm, int* nNodes);

/* ncclMoeGetLayout plus the per-node statistics, in the same kernel launch (DeepEP's
 * get_dispatch_layout with num_tokens_per_rdma_rank), N = ncclMoeCommNodeCount:
 *   tokensPerNode [N] int32: tokens with at least one expert on any rank of each node; a token
 *                 with experts on several ranks of a node counts once there (what the internode
 *                 path sends it across the network once for). May be NULL.
 *   isTokenInNode [numTokens][N] uint8 (0/1), may be NULL.
 * Device memory, written on `stream`, like the other outputs, whose contract and errors
 * (ncclMoeGetLayout) are unchanged; both new pointers NULL gives exactly ncclMoeGetLayout. On one
 * node tokensPerNode[0] counts the tokens with at least one valid expert and isTokenInNode[t][0]
 * says whether token t goes anywhere. */
ncclResult_t ncclMoeGetLayoutNodes(ncclMoeComm_t moeComm, const int64_t* topkIdx, int numTokens,
                                   int* tokensPerRank, int* tokensPerExpert, uint8_t* isTokenInRank,
                                   int* tokensPerNode, uint8_t* isTokenInNode, cudaStream_t stream);

/* Where a dispatch put its rows on this rank. Every pointer but the counts is device memory
 * inside the EP window and stays valid (and unchanged) until the next ncclMoeDispatch on this EP
 * context is enqueued (to keep rows longer, copy them out: see ncclMoeCombine for several
 * operations in flight); numRecvTokens and expertCounts belong to the handle and stay valid until
 * its next dispatch. Rows are ordered by source rank, then by source token index.
 *   x             [outputCapacity][H] dispatch dtype; rows [0, *numRecvTokens) are valid
 *   xScales       [outputCapacity][H/128] FP32, NULL for BF16
 *   topkIdx       [outputCapacity][K] int64: local expert id (0..E/R-1) or -1 when that expert
 *                 lives on another rank (or was -1)
 *   topkWeights   [outputCapacity][K] FP32, the sender's weights (0 where topkIdx is -1);
 *                 written only when the dispatch was given weights
 *   numRecvTokens [1]   int32 device
 *   expertCounts  [E/R] int32 device: (row, k) entries naming each local expert
 *   combineInput  [outputCapacity][H] BF16: a buffer in the window where the expert kernel can
 *                 write its outputs, so that ncclMoeCombine reads them without a copy.
 * hostNumRecvTokens / hostExpertCounts are filled only when the dispatch was asked for host
 * counts (-1 and NULL otherwise). A cached dispatch (topkIdx = NULL) rewrites every output,
 * the routing ones included (with the same values). */
typedef struct {
  void* x;
  float* xScales;
  int64_t* topkIdx;
  float* topkWeights;
  int* numRecvTokens;
  int* expertCounts;
  void* combineInput;
  int hostNumRecvTokens;
  const int* hostExpertCounts; /* [E/R], owned by the handle, valid until its next dispatch */
} ncclMoeDispatchOutput_t;

/* Flags of ncclMoeDispatch. */
/* Fill the host counts: the call waits until the dispatch kernel has exchanged the counts (the
 * rows may still be moving on `stream`; not allowed while `stream` is being captured). */
#define NCCL_MOE_DISPATCH_HOST_COUNTS 0x1

/* Sends every token of this rank to each rank that owns one of its experts.
 *   x            [numTokens][H] device, BF16 or FP8 as config.dispatchDtype, 16-byte aligned
 *   xScales      [numTokens][H/128] FP32 device, required for FP8, must be NULL for BF16
 *   topkIdx      [numTokens][K] int64 device, expert ids or -1; NULL = reuse the routing already
 *                in *handle (the backward pass: same routing, other data, no layout)
 *   topkWeights  [numTokens][K] FP32 device, or NULL (then no weights are delivered)
 *   numTokens    T, 0..maxTokensPerRank; must equal the handle's T when topkIdx is NULL
 *   flags        NCCL_MOE_DISPATCH_* bits
 *   handle       in/out: *handle == NULL creates a handle (allocates device memory in stream
 *                order on `stream`: not graph-capturable); a non-NULL handle is reused, its
 *                routing recomputed from
 *                topkIdx unless topkIdx is NULL. The handle is what ncclMoeCombine needs.
 *   out          where the rows are (see ncclMoeDispatchOutput_t)
 * Without NCCL_MOE_DISPATCH_HOST_COUNTS the call never synchronises the host and a handle that
 * exists can be captured in a CUDA graph with it. With it, the host waits for the counts only
 * (as DeepEP's dispatch does), not for the rows: a failure the kernel finds after the counts (a
 * peer that stops taking part while rows move) is returned by the next call or
 * ncclMoeCheckErrors. Kernel-detected failures (see "Errors found by
 * kernels" at ncclMoeCheckErrors):
 *   - a rank would receive more than outputCapacity rows: no rank writes any row, the counts
 *     (numRecvTokens, expertCounts, host counts) say 0 rows and a combine or copy enqueued
 *     behind it reads nothing (its out is all zeros); sticky, ncclInvalidUsage;
 *   - an expert id outside [-1, E) on this rank: local and not fatal; the entry is treated as -1,
 *     the dispatch still runs on every rank, and this call (with host counts) or the next
 *     ncclMoeCheckErrors returns ncclInvalidArgument once;
 *   - a peer does not take part within timeoutMs (ncclSystemError), or a peer is ahead of this
 *     rank by whole operations (ncclInvalidUsage, "protocol error"): sticky and fatal.
 * Every rank must call dispatch and combine in the same order. The source buffers may be reused
 * once `stream` passes the call. expertOut of combine must be 16-byte aligned and not NULL. */
ncclResult_t ncclMoeDispatch(ncclMoeComm_t moeComm, const void* x, const float* xScales,
                             const int64_t* topkIdx, const float* topkWeights, int numTokens,
                             unsigned int flags, ncclMoeHandle_t* handle,
                             ncclMoeDispatchOutput_t* out, cudaStream_t stream);

/* Returns to each source rank the expert outputs of the rows it sent in `handle`'s dispatch and
 * sums them per token, in rank order with an FP32 accumulator (bitwise deterministic):
 *   out[t] = sum over ranks r that received token t of  w(t, r) * expertOut_r[row of t on r]
 * with w(t, r) = sum of topkWeights[t][k] over the k whose expert lives on r when topkWeights is
 * given, 1 otherwise. Tokens that went nowhere come out as zeros.
 *   expertOut    [numRecvTokens][H] BF16 device on this rank (rows as the dispatch delivered
 *                them). Zero-copy when it lies inside the EP window (out->combineInput, or out->x
 *                of a BF16 dispatch); other memory is first copied into the window. Each rank
 *                chooses for itself: the kernel publishes where its rows are with its ready
 *                signal and every rank reads each peer's rows where that peer put them.
 *   topkWeights  [T][K] FP32 device on this (source) rank, or NULL for unweighted
 *   out          [T][H] BF16 device on this rank, 16-byte aligned; T is the handle's numTokens
 * Across nodes (ncclMoeCommNodeCount > 1) each remote node that received t returns one partial:
 * its ranks' terms in rank order, summed in FP32 and rounded once to BF16; the source then sums in
 * FP32, in node order, its own node's terms (rank order, not rounded) and those partials, and
 * rounds once. So there is one extra BF16 rounding per remote node, and the FP32 sum is grouped by
 * node; on one node the result is the formula above, bit for bit. Still deterministic.
 * Must follow the dispatch that filled `handle`. expertOut inside the window must be exactly
 * out->combineInput or (BF16) out->x; any other in-window address is refused
 * (ncclInvalidArgument).
 *
 * Several operations in flight (two micro-batches, as Megatron's 1F1B overlap runs them): the
 * window holds the rows of the context's latest dispatch only, but a handle keeps its own
 * routing and counts, so an older handle can still be combined, from memory outside the window:
 *   dispatch(A); copy A's rows out of the window (x, topkIdx, topkWeights as needed);
 *   dispatch(B); ... combine(A, expertOut in caller memory); combine(B, any source)
 * A combine of a handle whose dispatch is not the latest (combine(h1) after dispatch(h2)) with
 * an expertOut inside the window is refused (ncclInvalidUsage: those rows are h2's now). The
 * copy into the window is the library's, stream-ordered behind the dispatches, and the
 * combine's completion keeps every peer from overwriting rows still read, so any interleaving
 * that every rank makes in the same order is safe. The HT calls of one context must run on the
 * device in the order they are called (one stream, or streams ordered by events). */
ncclResult_t ncclMoeCombine(ncclMoeComm_t moeComm, ncclMoeHandle_t handle, const void* expertOut,
                            const float* topkWeights, void* out, cudaStream_t stream);

/* ncclMoeCombine that also returns per-row top-k values to their token: the backward of a
 * dispatch, which returns the gradient of recv_x to x (the combine) and the gradient of the
 * received top-k weights to the routing weights (DeepEP's combine(topk_weights=...) output,
 * what Megatron's FusedDispatch.backward needs):
 *   recvTopkWeights [numRecvTokens][K] FP32 device on this (expert) rank, rows as the dispatch
 *                   delivered them (typically the gradient of out->topkWeights)
 *   outTopkWeights  [T][K] FP32 device on this (source) rank:
 *     outTopkWeights[t][k] = sum over ranks r in increasing order that received t of
 *                            recvTopkWeights_r[row of t on r][k]
 *     accumulated in FP32 from +0.0f (bitwise deterministic); 0 for tokens that went nowhere.
 *     Every column is summed over every rank that received t, as DeepEP does; values that are
 *     zero outside the rank's own experts (as out->topkWeights is) give the owner's value.
 * expertOut, topkWeights, out: as ncclMoeCombine (DeepEP's backward passes topkWeights NULL).
 * recvTopkWeights is read in place when it is out->topkWeights of the handle's dispatch (while
 * that dispatch is the latest); any other memory is first copied into that window region, which
 * overwrites the latest dispatch's out->topkWeights. Another in-window address:
 * ncclInvalidArgument. Every rank must make this call (not ncclMoeCombine) for the operation.
 * outTopkWeights may be NULL when T is 0; recvTopkWeights is never NULL. Across nodes the rows
 * follow ncclMoeCombine's contract and the values are grouped the same way: each remote node
 * sums its ranks' values in rank order (FP32, not rounded), the source adds its own node's sum
 * and those in node order; on one node exactly the formula above. */
ncclResult_t ncclMoeCombineWithWeights(ncclMoeComm_t moeComm, ncclMoeHandle_t handle,
                                       const void* expertOut, const float* topkWeights,
                                       const float* recvTopkWeights, float* outTopkWeights,
                                       void* out, cudaStream_t stream);

/* ---------------------------------------------------------------------------------------------
 * Low-latency mode (config.mode = ncclMoeLowLatency): decode-sized batches, fixed buffers.
 *
 * Each operation uses one buffer slot of the EP window, chosen round-robin by the dispatch
 * (slot = dispatch count % numBufferSlots); its combine uses the same slot. The outputs of a
 * slot stay valid until the dispatch numBufferSlots dispatches later: at most numBufferSlots
 * operations may be in flight, on every rank. No call synchronises the host; with the same
 * output struct, dispatch and combine (one-shot or split) can be captured in a CUDA graph and
 * replayed with new data and new routing in the same input buffers.
 *
 * Split ("hook") form: a call with NCCL_MOE_LL_SEND_ONLY launches a kernel that issues this
 * rank's stores and returns without waiting for any peer; the matching *Complete call, on any
 * stream ordered after it, waits for the peers' data and finishes. Between the two the library
 * holds no SM. The one-shot form is the two back to back and gives identical results (on one
 * node, a one-shot call of few tokens on this rank runs both in one kernel, same results:
 * NCCL_MOE_LL_ONE_LAUNCH, read at ncclMoeCommCreate, "D" or "D,C" = at most D tokens for the
 * dispatch and C for the combine, default "4,1", 0 = never).
 * Operations on different slots may run concurrently on different streams.
 * ------------------------------------------------------------------------------------------- */

#define NCCL_MOE_LL_SEND_ONLY 0x2 /* dispatch / combine: issue the sends only */

/* Bytes of EP window each rank allocates for `config` on nRanks ranks (either mode): what
 * ncclMoeCommCreate will take on one node, so that users can plan memory (several nodes add
 * the internode rows: see ncclMoeCommCreate). */
ncclResult_t ncclMoeGetWindowSize(const ncclMoeConfig_t* config, int nRanks, size_t* bytes);

/* Rows a low-latency dispatch delivered to this rank, expert-major. Let L = E/R local experts,
 * M = maxTokensPerRank, B = R*M rows per expert. The rows that source rank s sent to local expert
 * l are x[l][s*M + i] for i < recvCountsPerSource[l][s], in no particular order (srcToken names
 * each row's token). All pointers are device memory in the slot's part of the window.
 *   x                  [L][B][H] BF16, or FP8 e4m3 when config.dispatchDtype is FP8
 *   xScales            FP8 only: [L][B][H/128] float, or [L][B][H/512] int32 for UE8M0
 *   srcToken           [L][B] int32: the row's token index on its source rank
 *   recvCountsPerSource[L][R] int32, valid once the dispatch's completion has run
 *   expertCounts       [L] int32: rows per local expert (sum over sources), likewise
 *   combineInput       [L][B][H] BF16: where the expert kernel may write its outputs (same row
 *                      positions as x) so that the combine reads them in place; the library
 *                      never writes it
 *   slot               the buffer slot (0..numBufferSlots-1) */
typedef struct {
  void* x;
  void* xScales;
  int* srcToken;
  int* recvCountsPerSource;
  int* expertCounts;
  void* combineInput;
  int slot;
  int numTokens; /* this rank's T of the dispatch (its combine produces T rows) */
  unsigned long long sequence; /* the dispatch's number on the context (1, 2, ...): the calls
                                  that take this struct accept it only while its dispatch is the
                                  latest on its slot; 0 (a zeroed struct) is never valid */
} ncclMoeLowLatencyOutput_t;

/* Low-latency dispatch of this rank's T tokens.
 *   x            [T][H] BF16 device, 16-byte aligned; cast to FP8 in the sending warp when
 *                config.dispatchDtype is FP8
 *   topkIdx      [T][K] int64 device, expert ids or -1 (distinct within a token)
 *   topkWeights  [T][K] FP32 device, or NULL: the weights the combine of this operation applies
 *                (NULL: it sums unweighted). They travel with the tokens, so that each expert
 *                rank can sum its experts' outputs for a token before sending them back.
 *   numTokens    T, 0..maxTokensPerRank
 *   flags        0 (one-shot) or NCCL_MOE_LL_SEND_ONLY (then ncclMoeLowLatencyDispatchComplete)
 *   out          filled at once (pointers are known before the data arrives)
 * x, topkIdx and topkWeights may be reused once `stream` passes this call (the send copies what
 * the combine needs into the window). Every token-expert pair is one row at the destination (a token with two experts on a rank is
 * stored twice). A token crosses NVLink once per destination rank, whatever the number of its
 * experts there: the send stores it (LSA) into the row of its first expert on that rank and the
 * completion copies it to the rows of the others (local HBM). */
ncclResult_t ncclMoeLowLatencyDispatch(ncclMoeComm_t moeComm, const void* x, const int64_t* topkIdx,
                                       const float* topkWeights, int numTokens, unsigned int flags,
                                       ncclMoeLowLatencyOutput_t* out, cudaStream_t stream);

/* Waits (on `stream`) for every peer's rows of the send-only dispatch that returned `out`,
 * copies each token to its further expert rows on this rank, and writes out->expertCounts
 * (out->recvCountsPerSource is written by the sources). */
ncclResult_t ncclMoeLowLatencyDispatchComplete(ncclMoeComm_t moeComm,
                                               const ncclMoeLowLatencyOutput_t* out,
                                               cudaStream_t stream);

/* Low-latency combine of the operation `dispatched` (this rank's dispatch output):
 *   expertOut    [L][B][H] BF16 device on this rank, rows at the positions of dispatched->x
 *                (dispatched->combineInput, or any other buffer of that shape), 16-byte aligned
 *   out          [T][H] BF16 device on this rank (T = dispatched->numTokens), 16-byte aligned
 *   flags        0 or NCCL_MOE_LL_SEND_ONLY (then ncclMoeLowLatencyCombineComplete)
 * The routing and weights are those of the dispatch. Each expert rank r sums, for every token t
 * it received, its rows of t in k order (FP32, weights of the dispatch or 1) and sends the sum
 * rounded to BF16, p(t, r), back once; the source adds these partials in rank order (FP32) and
 * rounds once more:  out[t] = bf16( sum over r in increasing order of p(t, r) ),
 *   p(t, r) = bf16( sum over k in increasing order with expert(t, k) on r of w(t, k) * y(t, k) ).
 * Bitwise deterministic; tokens that went nowhere come out as zeros.
 * `dispatched` must be the struct its dispatch filled, while that dispatch is the latest on its
 * slot (this and the *Complete calls compare its `sequence` and numTokens with the slot's): a
 * zeroed struct gives ncclInvalidArgument, an older or altered one ncclInvalidUsage. */
ncclResult_t ncclMoeLowLatencyCombine(ncclMoeComm_t moeComm, const ncclMoeLowLatencyOutput_t* dispatched,
                                      const void* expertOut, void* out, unsigned int flags,
                                      cudaStream_t stream);

/* Waits for every peer's partial sums of the send-only combine and adds them into out (the same
 * `out` as the send-only call). */
ncclResult_t ncclMoeLowLatencyCombineComplete(ncclMoeComm_t moeComm,
                                              const ncclMoeLowLatencyOutput_t* dispatched, void* out,
                                              cudaStream_t stream);

/* ---------------------------------------------------------------------------------------------
 * Low-latency fault tolerance: the failed-rank set.
 *
 * In low-latency mode a rank that does not take part within timeoutMs does not end the context
 * (as it does in high-throughput mode): the wait that timed out puts that rank into this
 * context's failed-rank set, ncclMoeCheckErrors reports it once (ncclRemoteError, naming the
 * rank), and the context stays usable. The caller may also put ranks there itself (e.g. when
 * its framework learns of a dead rank) with ncclMoeMarkRankFailed. The set only grows; a rank
 * leaves it only with a new context (destroy + create, which every rank must call).
 *
 * What an operation does on this rank once the rank is in the set as the host sees it (enqueued
 * after ncclMoeMarkRankFailed, or after ncclMoeGetFailedRanks / ncclMoeCheckErrors showed it):
 *  - dispatch: entries of topkIdx naming an expert of a failed rank are dropped (as -1); nothing
 *    is sent to a failed rank and nothing is awaited from one; recvCountsPerSource[l][s] of a
 *    failed source s reads 0 (a failed rank that is in fact alive may still write it: skip
 *    failed sources) and expertCounts counts live sources only. Rows from live sources are exact.
 *  - combine: a failed rank's partial sums count as zero: a token's result is the sum over its
 *    experts on live ranks (in rank order, as usual), zeros if all its experts were on failed
 *    ranks; nothing is awaited from failed ranks.
 *  - operations that do not involve a failed rank give the same bits as without the set.
 * The operation during which a wait times out has undefined outputs on the rank that waited
 * (its kernels may disagree about the late rank; they stay within the slot's buffers), and so do
 * the operations enqueued before the host saw the rank in the set (their waits for it give up at
 * once, but they may still send to it); from then on, the above holds. A failed rank that is alive but was only slow will itself
 * time out on the ranks that stopped sending to it, and put them into its own set.
 * High-throughput contexts: both calls give ncclInvalidUsage (a timeout there is fatal).
 * ------------------------------------------------------------------------------------------- */

/* Puts `rank` (0..R-1, not the calling rank) into this rank's failed-rank set. Host-only, takes
 * effect for the operations enqueued after it returns. Local: other ranks are not told. */
ncclResult_t ncclMoeMarkRankFailed(ncclMoeComm_t moeComm, int rank);

/* failed[r] = 1 for every rank r in this rank's failed-rank set (marked, or found by a kernel
 * that has finished), else 0. failed: host memory of count = R ints. No synchronisation. */
ncclResult_t ncclMoeGetFailedRanks(ncclMoeComm_t moeComm, int* failed, int count);

/* Frees a handle (synchronises the device). A destroyed handle passed again: ncclInvalidArgument. */
ncclResult_t ncclMoeHandleDestroy(ncclMoeHandle_t handle);

/* Frees a handle in stream order, without synchronising: the handle is dead at once for the
 * host (every later call naming it, release and destroy included, fails with
 * ncclInvalidArgument, as after ncclMoeHandleDestroy) and its device memory goes back to the
 * device's memory pool (cudaFreeAsync) when `stream` reaches this point. `stream` must be ordered
 * after every kernel that uses the handle (its last dispatch and combine: usually the stream they
 * ran on). A framework that drops one handle per layer per step can release it right after its
 * last combine. Handles are created in stream order too (cudaMallocAsync on the dispatch's
 * stream, from the device's current pool), so create + release costs no synchronisation. On a
 * device without memory pools (cudaDevAttrMemoryPoolsSupported = 0) the call synchronises
 * `stream` and frees. Not capturable: a stream being captured gives ncclInvalidUsage. */
ncclResult_t ncclMoeHandleRelease(ncclMoeHandle_t handle, cudaStream_t stream);

/* Reports an error that a kernel found after its call returned. Does not synchronise: it sees
 * kernels that have finished. ncclSuccess otherwise.
 *
 * Errors found by kernels, like ncclCommGetAsyncError's, come in two classes:
 *  - sticky (the context is unusable; like an NCCL communicator after an asynchronous error,
 *    it must be destroyed with ncclMoeCommDestroy, which works after any of them, and created
 *    again): in high-throughput mode, a peer that did not take part within timeoutMs
 *    (ncclSystemError; every later wait
 *    gives up at once, so later operations end quickly, and every later call fails at once with
 *    the same message); a peer ahead of this rank by whole operations, i.e. the ranks did not
 *    make the same calls in the same order (ncclInvalidUsage, "protocol error", reported on
 *    every rank that sees it, the others time out); an HT dispatch over outputCapacity
 *    (ncclInvalidUsage, seen by every rank). Every API call on the context checks these first.
 *  - local (bad input of this rank only: an expert id outside [-1, E), an LL token naming an
 *    expert twice): the entry is dropped, the operation completes and communicates on every
 *    rank, no peer waits or fails; ncclMoeCheckErrors (or an HT dispatch with host counts)
 *    reports the first such error once (ncclInvalidArgument) and clears it. Other calls do not
 *    fail because of it, so the ranks stay in step. Also local: a low-latency wait that timed
 *    out (ncclRemoteError, naming the rank now in the failed-rank set; see there). */
ncclResult_t ncclMoeCheckErrors(ncclMoeComm_t moeComm);

/* Thread-local description of this thread's last failure ("" if none). */
const char* ncclMoeGetLastError(void);

#ifdef __cplusplus
}
#endif
#endif /* NCCL_MOE_H_ */
