// High-throughput combine across nodes: the mirror of dispatch_gin.cu (INTERNODE.md §3). GIN has
// no get, so a remote node's rows come back pushed, one BF16 partial per (token, node): the rank
// that forwarded a record (the source's rail peer) sums that record's rows on the ranks of its
// node and puts the sum back at the record's slot; the source adds the partials of the nodes and
// its own node's rows, which it pulls over NVLink as intranode.
//
// One launch of numSms CTAs (channels, net_channels.cuh), every CTA:
//  1. ready: this rank's expert-output offset to the ranks of its node (combine_sync.cuh).
//  2. weights out: for each remote node B, one CTA writes, per slot of this rank's dense list for
//     B, the combine weight w(t, r) of each rank r of B (the sum of t's topkWeights whose expert is
//     on r, k order, from 0; 1 when unweighted) into weightStage and puts the list to the rail
//     peer on B at the same slots in one put (htWeights(me)).
//  3. partials: for each remote node A, the CTA's chunks of the records that A's rail peer sent in
//     the dispatch (routing.netRows: their rows on the ranks of this node): once the source's
//     weights have landed (unweighted: the first chunk while they travel, checked after), each
//     record's rows in rank order, w * y in FP32, rounded once to BF16, into combineStage at the
//     slot, the chunk put back to the source's combineLand (htPartials(me, channel)).
//  4. tokens (reduceTokensNet: units of 16 slots of the first remote node's list as their chunks'
//     partials land, spread over the CTAs, then the others); out[t] = nodes in node order, in
//     FP32: this node's rank-ordered sum (not rounded) when t has rows here, each remote node's
//     BF16 partial (waited for by its chunk's channel signal) when t went there; rounded once to
//     BF16.
//  5. every channel signal of the operation exact, then the node barrier and the rail barrier
//     (htCombineDone), so that no rank's next operation overwrites rows or regions still read.
// Rounding contract (nccl_moe.h, testing/ht_net_protocol.h): on one node the intranode combine's
// result; across nodes one BF16 rounding per remote node and the FP32 sum regrouped by node.
// kValues (ncclMoeCombineWithWeights): each partial row also carries the K FP32 sums of the
// record's per-row values over the node's ranks, and the source groups the values the same way.
// Deterministic. After a dispatch that delivered nothing every output row is zero.
#include "device/kernel_args.h"
#include "device/common/peer_sync.cuh"
#include "device/common/vec_io.cuh"
#include "device/ht/combine_sync.cuh"
#include "device/ht/net_channels.cuh"

namespace nccl_moe {

constexpr int kNetCombineThreads = 512;
constexpr int kNetCombineUnroll = 4;  // 16-byte vectors (8 BF16) per lane per rank in flight
// Slots of the first remote node's list per CTA step of the token phase: one token per warp.
constexpr int kNetReduceUnit = kNetCombineThreads / 32;
static_assert(kHtNetChunk % kNetReduceUnit == 0, "a reduce unit lies within one chunk of partials");

namespace {

// acc[u] += sum over the ranks of srcMask in increasing order of weight(lane r) * rows[r][row of
// lane r] for the vectors base + u * 32 + lane (one warp; srcMask warp-uniform).
__device__ __forceinline__ void sumRanks(const char* const* rows, unsigned srcMask, int rowIndex, float weight,
                                         int hidden, int base, int lane, float (&acc)[kNetCombineUnroll][8]) {
  const int rowVecs = hidden / 8;
  const size_t rowBytes = (size_t)hidden * 2;
  for (unsigned m = srcMask; m != 0; m &= m - 1) {
    const int r = __ffs(m) - 1;
    const int row = __shfl_sync(0xffffffffu, rowIndex, r);
    const float scale = __shfl_sync(0xffffffffu, weight, r);
    const uint4* src = (const uint4*)(rows[r] + (size_t)row * rowBytes);
    uint4 v[kNetCombineUnroll];
#pragma unroll
    for (int u = 0; u < kNetCombineUnroll; ++u) {
      const int idx = base + u * 32 + lane;
      v[u] = idx < rowVecs ? loadPeer(src + idx) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kNetCombineUnroll; ++u) accumulateBf16x8(acc[u], v[u], scale);
  }
}

__device__ __forceinline__ void zero(float (&acc)[kNetCombineUnroll][8]) {
#pragma unroll
  for (int u = 0; u < kNetCombineUnroll; ++u)
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[u][i] = 0.0f;
}


// Phase 2: CTA bi % numCtas (bi: remote node index of B) stages the weights of this rank's whole
// list for node B and puts them to B's rail peer in one put, adding 2^32 to htWeights(me) there
// (channel 0's context): one message per node, instead of a small one per chunk, because every
// message costs the NIC (or the plugin) a fixed overhead. Every thread of the CTA stages its own
// (slot, node rank) entries: the remote node's partials wait for this put.
__device__ void sendWeights(const CombineNetArgs& a, bool empty) {
  const CombineArgs& c = a.c;
  const WindowView& w = c.w;
  const PeerMap& p = w.peers;
  const int G = p.lsaSize, N = p.nodes(), n0 = p.node(p.rank), M = a.net.maxTokens;
  const size_t row = (size_t)G * sizeof(float);
  for (int B = 0; B < N; ++B) {
    if (B == n0 || remoteNodeIndex(p, B) % (int)gridDim.x != (int)blockIdx.x) continue;
    const int f = railPeer(p, B), total = empty ? 0 : c.routing.tokensPerNode[B];
    const size_t stage = a.net.weightStage + (size_t)remoteNodeIndex(p, B) * M * row;
    const size_t land = a.net.weightLand + (size_t)myNodeIndexAt(p, B) * M * row;
    float* staged = (float*)windowLocal(w, stage);
    for (int i = threadIdx.x; i < total * G; i += blockDim.x)
      staged[i] = combineWeight(c, c.routing.nodeList[(size_t)B * M + i / G], B * G + i % G);
    __syncthreads();
    if (threadIdx.x == 0) {
      __threadfence_system();
      const ncclGin gin(a.net.devComm, channelContext(a.net, 0));
      const ncclGinSignal_t sig = (ncclGinSignal_t)(a.net.sigWeights0 + p.rank);
      if (total > 0)
        putWithSignal(gin, w.win, f, land, stage, (size_t)total * row, sig, kHtNetDone, ncclCoopThread());
      else
        gin.signal(ncclTeamWorld(gin.comm), f, ncclGin_SignalAdd{sig, kHtNetDone}, ncclCoopThread());
    }
  }
}


// Phase 3, one warp: record `slot` of node A's list (A's rows here: netRows), its rows on this
// node's ranks in rank order, w * y in FP32 (w = 1 when unitWeights, else the landed weight),
// rounded once to BF16, into the stage at the slot; with kValues also the K value sums.
template <bool kValues>
__device__ void sumRecord(const CombineNetArgs& a, char* const* peer, const char* const* rows, const int* netRows,
                          const char* weights, size_t stage, int slot, bool unitWeights, int lane) {
  const CombineArgs& c = a.c;
  const PeerMap& p = c.w.peers;
  const int G = p.lsaSize, rowVecs = c.hidden / 8, j = lane - p.lsaBase;
  const int row = j >= 0 && j < G ? netRows[(size_t)slot * G + j] : -1;
  const float weight = row < 0 ? 0.0f
                       : unitWeights ? 1.0f
                                     : __int_as_float(loadPeerInt((const int*)(weights + slot * G * sizeof(float)) + j));
  const unsigned srcMask = __ballot_sync(0xffffffffu, row >= 0);
  uint4* dst = (uint4*)(windowLocal(c.w, stage) + (size_t)slot * a.net.partialBytes);
  for (int base = 0; base < rowVecs; base += 32 * kNetCombineUnroll) {
    float acc[kNetCombineUnroll][8];
    zero(acc);
    sumRanks(rows, srcMask, row, weight, c.hidden, base, lane, acc);
#pragma unroll
    for (int u = 0; u < kNetCombineUnroll; ++u) {
      const int idx = base + u * 32 + lane;
      if (idx < rowVecs) dst[idx] = packBf16x8(acc[u]);
    }
  }
  if constexpr (kValues) {
    const float v = sumRankValues(c, peer, srcMask, row, lane);
    if (lane < c.topK) ((float*)((char*)dst + (size_t)c.hidden * 2))[lane] = v;
  }
}

// Phase 3: this CTA's chunks of the records every remote node's rail peer sent here.
template <bool kValues>
__device__ bool sendPartials(const CombineNetArgs& a, char* const* peer, const char* const* rows, uint64_t seq,
                             int warp, int warps, int lane) {
  const CombineArgs& c = a.c;
  const WindowView& w = c.w;
  const PeerMap& p = w.peers;
  const int G = p.lsaSize, N = p.nodes(), n0 = p.node(p.rank), li = p.localIndex(p.rank), M = a.net.maxTokens;
  const size_t wrow = (size_t)G * sizeof(float), prow = (size_t)a.net.partialBytes;
  for (int A = 0; A < N; ++A) {
    if (A == n0) continue;
    const int s = A * G + li, ai = remoteNodeIndex(p, A);
    const ChannelChunks ch{c.routing.netRecords[A], (int)blockIdx.x, (int)gridDim.x};
    const int psig = a.net.sigPartials0 + p.rank * gridDim.x + blockIdx.x;
    const char* weights = windowLocal(w, a.net.weightLand + (size_t)ai * M * wrow);
    const size_t stage = a.net.combineStage + (size_t)ai * M * prow;
    const size_t land = a.net.combineLand + (size_t)myNodeIndexAt(p, A) * M * prow;
    const int* netRows = c.routing.netRows + (size_t)A * M * G;
    // Weights: a weighted combine waits for A's weights (one put) before its first chunk. An
    // unweighted one sums its first chunk with weight 1 for every row while they travel, then
    // checks them: if A's source sent a weight other than 1 for one of the chunk's rows (the source
    // decides), the chunk is summed again with the weights; 1 * y is y, so the result is the same
    // bits either way.
    bool known = c.topkWeights != nullptr;
    // Thread 0 waits; the barrier hands every thread the same answer.
    if (known && ch.chunks() > ch.c &&
        !__syncthreads_and(threadIdx.x != 0 || waitChannelDone(w, a.net, a.net.sigWeights0 + s, 0, seq, s)))
      return false;
    for (int k = ch.c; k < ch.chunks(); k += ch.S) {
      const int first = k * kHtNetChunk, n = ch.size(k);
      bool unitWeights = !known;
      for (;;) {
        for (int i = warp; i < n; i += warps)
          sumRecord<kValues>(a, peer, rows, netRows, weights, stage, first + i, unitWeights, lane);
        if (!unitWeights) break;
        if (!__syncthreads_and(threadIdx.x != 0 || waitChannelDone(w, a.net, a.net.sigWeights0 + s, 0, seq, s)))
          return false;
        known = true;
        bool ones = true;
        for (int i = warp; i < n; i += warps) {
          const int slot = first + i, j = lane - p.lsaBase;
          const int row = j >= 0 && j < G ? netRows[(size_t)slot * G + j] : -1;
          if (row >= 0) ones &= __int_as_float(loadPeerInt((const int*)(weights + slot * wrow) + j)) == 1.0f;
        }
        if (__syncthreads_and(ones)) break;
        unitWeights = false;
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        __threadfence_system();
        putChunk(a.net, w.win, s, land + (size_t)first * prow, stage + (size_t)first * prow, (size_t)n * prow, psig,
                 ch, k);
      }
    }
    if (threadIdx.x == 0 && ch.last() < 0) signalEmptyChannel(a.net, s, psig, ch);
  }
  return true;
}

// Lane 0 of a warp: waits until the partial of list slot `slot` of remote node b (from b's rail
// peer, on the channel of the slot's chunk) has landed here.
__device__ bool waitPartial(const CombineNetArgs& a, bool empty, uint64_t seq, int b, int slot) {
  const CombineArgs& c = a.c;
  const int k = slot / kHtNetChunk, f = railPeer(c.w.peers, b);
  const ChannelChunks ch{empty ? 0 : c.routing.tokensPerNode[b], k % (int)gridDim.x, (int)gridDim.x};
  return waitChannelAtLeast(c.w, a.net, a.net.sigPartials0 + f * gridDim.x + ch.c, ch.c, seq, ch.through(k), f);
}

// Phase 4, one warp: token t. Its partials from the remote nodes other than `waited` (whose chunk
// the caller waited for) are waited for here by lane 0. Returns false if a wait failed (the row
// is then not written).
template <bool kValues>
__device__ bool reduceTokenNet(const CombineNetArgs& a, char* const* peer, const char* const* rows, bool empty,
                               uint64_t seq, int t, int waited, int lane) {
  const CombineArgs& c = a.c;
  const WindowView& w = c.w;
  const PeerMap& p = w.peers;
  const int R = p.nRanks, G = p.lsaSize, N = p.nodes(), n0 = p.node(p.rank), M = a.net.maxTokens;
  const size_t prow = (size_t)a.net.partialBytes;
  const int rowVecs = c.hidden / 8;
  // Lane b < N: t's slot in node b's list (-1: none).
  const int slot = !empty && lane < N && lane != n0 ? c.routing.nodeSlot[(size_t)t * N + lane] : -1;
  const unsigned remote = __ballot_sync(0xffffffffu, slot >= 0);
  bool arrived = true;
  for (unsigned m = remote & ~(1u << waited); m != 0; m &= m - 1) {
    const int b = __ffs(m) - 1;
    const int sb = __shfl_sync(0xffffffffu, slot, b);
    if (lane == 0 && arrived) arrived = waitPartial(a, empty, seq, b, sb);
  }
  __syncwarp();  // lane 0's wait orders the other lanes' reads of the partials after it
  if (!__shfl_sync(0xffffffffu, arrived, 0)) return false;
  const bool inNode = lane >= p.lsaBase && lane < p.lsaBase + G;
  const int pos = inNode && !empty ? c.routing.sendPos[(size_t)t * R + lane] : -1;
  const unsigned ownMask = __ballot_sync(0xffffffffu, pos >= 0);
  const float rankWeight = combineWeightWarp(c, t, lane);  // warp-collective: every lane
  const float weight = pos >= 0 ? rankWeight : 0.0f;
  const int rowIndex = pos >= 0 ? c.routing.sendOffset[lane] + pos : 0;
  uint4* dst = (uint4*)(c.out + (size_t)t * c.hidden);
  // The first remote node's partial: its loads are issued before the own node's rows are read,
  // so that both are in flight at once (the sums keep their node order).
  const int b1 = remote != 0 ? __ffs(remote) - 1 : -1;
  const uint4* partial1 = nullptr;
  if (b1 >= 0)
    partial1 = (const uint4*)(windowLocal(w, a.net.combineLand + (size_t)remoteNodeIndex(p, b1) * M * prow) +
                              (size_t)__shfl_sync(0xffffffffu, slot, b1) * prow);
  for (int base = 0; base < rowVecs; base += 32 * kNetCombineUnroll) {
    float acc[kNetCombineUnroll][8];
    zero(acc);
    uint4 first[kNetCombineUnroll];
#pragma unroll
    for (int u = 0; u < kNetCombineUnroll; ++u) {
      const int idx = base + u * 32 + lane;
      first[u] = b1 >= 0 && idx < rowVecs ? loadPeer(partial1 + idx) : make_uint4(0, 0, 0, 0);
    }
    for (int b = 0; b < N; ++b) {
      if (b == n0) {
        if (ownMask == 0) continue;
        float part[kNetCombineUnroll][8];
        zero(part);
        sumRanks(rows, ownMask, rowIndex, weight, c.hidden, base, lane, part);
#pragma unroll
        for (int u = 0; u < kNetCombineUnroll; ++u)
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[u][i] = __fadd_rn(acc[u][i], part[u][i]);
      } else if (b == b1) {
#pragma unroll
        for (int u = 0; u < kNetCombineUnroll; ++u) accumulateBf16x8(acc[u], first[u], 1.0f);
      } else if ((remote >> b) & 1u) {
        const int sb = __shfl_sync(0xffffffffu, slot, b);
        const uint4* partial =
            (const uint4*)(windowLocal(w, a.net.combineLand + (size_t)remoteNodeIndex(p, b) * M * prow) + (size_t)sb * prow);
#pragma unroll
        for (int u = 0; u < kNetCombineUnroll; ++u) {
          const int idx = base + u * 32 + lane;
          if (idx < rowVecs) accumulateBf16x8(acc[u], loadPeer(partial + idx), 1.0f);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kNetCombineUnroll; ++u) {
      const int idx = base + u * 32 + lane;
      if (idx < rowVecs) dst[idx] = packBf16x8(acc[u]);
    }
  }
  if constexpr (kValues) {  // the same grouping for the K values (lane k): nodes in node order
    float acc = 0.0f;
    for (int b = 0; b < N; ++b) {
      if (b == n0) {
        if (ownMask != 0) acc = __fadd_rn(acc, sumRankValues(c, peer, ownMask, rowIndex, lane));
      } else if ((remote >> b) & 1u) {
        const int sb = __shfl_sync(0xffffffffu, slot, b);
        const char* partial = windowLocal(w, a.net.combineLand + (size_t)remoteNodeIndex(p, b) * M * prow) +
                              (size_t)sb * prow + (size_t)c.hidden * 2;
        if (lane < c.topK) acc = __fadd_rn(acc, __int_as_float(loadPeerInt((const int*)partial + lane)));
      }
    }
    if (lane < c.topK) c.outTopkWeights[(size_t)t * c.topK + lane] = acc;
  }
  return true;
}

// Phase 4, every CTA: the first remote node's list P in units of kNetReduceUnit slots, unit u to
// CTA u % numCtas, each unit once its chunk's partials have landed (one poller per CTA), then the
// tokens outside that list, spread over the grid; partials of other remote nodes are waited for
// per token. The final sums thus overlap the partials still in flight, and the chunk that lands
// last is summed by kHtNetChunk / kNetReduceUnit CTAs, not one. Returns false if a wait failed.
template <bool kValues>
__device__ bool reduceTokensNet(const CombineNetArgs& a, char* const* peer, const char* const* rows, bool empty,
                                uint64_t seq, int warp, int warps, int lane) {
  const CombineArgs& c = a.c;
  const PeerMap& p = c.w.peers;
  const int N = p.nodes(), n0 = p.node(p.rank), M = a.net.maxTokens, P = n0 == 0 ? 1 : 0;
  const int total = empty ? 0 : c.routing.tokensPerNode[P];
  bool ok = true;
  for (int first = blockIdx.x * kNetReduceUnit; first < total; first += gridDim.x * kNetReduceUnit) {
    const int n = min(kNetReduceUnit, total - first);
    // Thread 0 waits (a unit lies within one chunk); the barrier hands every thread the answer.
    if (!__syncthreads_and(threadIdx.x != 0 || waitPartial(a, empty, seq, P, first + n - 1))) return false;
    for (int i = warp; i < n; i += warps)
      ok &= reduceTokenNet<kValues>(a, peer, rows, empty, seq, c.routing.nodeList[(size_t)P * M + first + i], P, lane);
  }
  for (int t = blockIdx.x * warps + warp; t < c.numTokens; t += gridDim.x * warps)
    if (empty || c.routing.nodeSlot[(size_t)t * N + P] < 0) ok &= reduceTokenNet<kValues>(a, peer, rows, empty, seq, t, P, lane);
  return __syncthreads_and(ok) != 0;
}

}  // namespace

template <bool kValues>
__global__ void __launch_bounds__(kNetCombineThreads, 1) combineHtNetKernel(CombineNetArgs a) {
  const CombineArgs& c = a.c;
  const WindowView& w = c.w;
  const PeerMap& p = w.peers;
  const int R = p.nRanks, G = p.lsaSize, N = p.nodes(), n0 = p.node(p.rank), li = p.localIndex(p.rank);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  __shared__ char* peer[kMaxHtRanks];
  __shared__ const char* rows[kMaxHtRanks];  // node ranks' expert outputs, at the offsets they published
  const uint64_t seq = *(volatile unsigned long long*)&w.state->combineSeq + 1;
  const bool empty = *(volatile int*)c.routing.dispatchEmpty != 0;
  if (threadIdx.x < R) peer[threadIdx.x] = peerWindow(w, threadIdx.x, 0);
  __syncthreads();
  const bool ready = publishSourceAndAwaitPeers(w, c.inOff, seq, peer, rows);

  bool ok = ready;
  if (ready) {
    sendWeights(a, empty);
    ok = __syncthreads_and(sendPartials<kValues>(a, peer, rows, seq, warp, warps, lane)) != 0;
  }
  if (ok) ok = reduceTokensNet<kValues>(a, peer, rows, empty, seq, warp, warps, lane);
  // Phase 5, thread b < N (b != this node): this CTA's channel of partials from the rail peer on
  // node b ended exactly; in CTA 0 also the weights from b's source arrived (CTAs without records
  // from a source never waited for them).
  if (ok && threadIdx.x < N && threadIdx.x != n0) {
    const int b = threadIdx.x, s = b * G + li, f = railPeer(p, b);
    if (waitChannelDone(w, a.net, a.net.sigPartials0 + f * gridDim.x + blockIdx.x, blockIdx.x, seq, f) &&
        blockIdx.x == 0)
      waitChannelDone(w, a.net, a.net.sigWeights0 + s, 0, seq, s);
  }
  finishNetOperation(w, a.net, kSigCombineDone, a.net.sigCombineDone0, seq, &w.state->combineArrived,
                     &w.state->combineSeq);
}

cudaError_t loadHtCombineNetKernel() {
  cudaFuncAttributes attr;
  const cudaError_t e = cudaFuncGetAttributes(&attr, combineHtNetKernel<false>);
  return e == cudaSuccess ? cudaFuncGetAttributes(&attr, combineHtNetKernel<true>) : e;
}

cudaError_t launchCombineHtNet(const CombineNetArgs& args, int numCtas, cudaStream_t stream) {
  if (args.withValues)
    combineHtNetKernel<true><<<numCtas, kNetCombineThreads, 0, stream>>>(args);
  else
    combineHtNetKernel<false><<<numCtas, kNetCombineThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace nccl_moe
