// High-throughput dispatch across nodes: the dense-slot mirror (INTERNODE.md §3). A token goes
// over the network at most once per remote node, as one record to this rank's rail peer there,
// which forwards it over NVLink into its final row on every rank of its node that owns one of the
// token's experts. Same outputs as the intranode dispatch (dispatch_lsa.cu), bit for bit.
//
// One launch of numSms CTAs (channels, net_channels.cuh). N nodes of G ranks, this rank `me` on
// node `n0` with local index li; rail peer on node B: B * G + li. Phases of every CTA:
//  1. counts (CTA 0): this rank's counts row into every rank of its node (LSA, the intranode
//     format: tokens to each of the R ranks, then tokens to each of the destination's experts),
//     released by kSigDispatchCounts; and one row per remote node B (net/ht_regions.h) put to
//     the rail peer on B with +1 on its htCounts(me) signal.
//  2. records: for each remote node B, the CTA packs the records of its chunks of B's dense list
//     (routing.nodeList) into the stage at their slots and puts each chunk to the rail peer's
//     landing rows for n0 at the same slots (htData(me, channel)).
//  3. counts in: CTA 0 waits for the counts rows of the rail peers of every other node, then
//     stores kSigNetCounts = seq into every rank of its node. Every CTA waits for both signals
//     of every rank of the node; the whole R x R count matrix is then readable over LSA (own
//     node's rows in this rank's counts region, remote sources' rows in the landing region of the
//     rank of this node that is their rail peer). From it: overflow (the same decision on every
//     rank of every node), the base of each source's rows on each rank of this node, and, in
//     CTA 0, the counts this rank receives (device, host-mapped when asked) and routing.sendOffset
//     of the ranks of its node (for the combine).
//  4. own node: this rank's tokens straight into their rows on the ranks of its node (16-byte
//     NVLink stores, as intranode).
//  5. forwarding: for each remote node A, the CTA waits for each of its chunks of the records from
//     A's rail peer (its channel signal counts the chunk's slots) and stores every record into
//     its row on each rank of this node that the record's pos[] names; routing.netRows keeps
//     those rows for the combine. Then the channel's signal must read exactly seq * 2^32.
//  6. done: node barrier (kSigDispatchDone, finishAndWaitPeers), then in the last CTA the rail
//     barrier (htDispatchDone): no rank starts the next operation's puts into a landing region
//     that a forwarder still reads.
// On overflow every rank writes no row (records still travel; nobody forwards them), reports
// kDevOverflow and leaves empty counts, as intranode.
#include "device/kernel_args.h"
#include "device/common/peer_sync.cuh"
#include "device/common/vec_io.cuh"
#include "device/ht/net_channels.cuh"
#include "device/ht/store_row.cuh"

namespace nccl_moe {

constexpr int kNetDispatchThreads = 512;

namespace {

// Tokens that rank s sends to rank d, from the count matrix (phase 3): own-node sources' rows in
// this rank's counts region (row s, [R + L]), remote sources' rows in the landing region of the
// rank of this node with s's local index.
__device__ __forceinline__ const int* countsRowOf(const DispatchNetArgs& a, int s) {
  const WindowView& w = a.d.w;
  const PeerMap& p = w.peers;
  const int R = p.nRanks, L = a.d.numExperts / R;
  if (p.lsaIndex(s) != kPeerRemote) return (const int*)(windowLocal(w, w.countsOff)) + (size_t)s * (R + L);
  const int holder = p.lsaBase + p.localIndex(s);
  return (const int*)(lsaPointer(w, holder, a.net.countsLand) +
                      (size_t)remoteNodeIndex(p, p.node(s)) * a.net.countsBytes);
}

// Phase 1, CTA 0.
__device__ void publishCountsNet(const DispatchNetArgs& a, uint64_t seq) {
  const DispatchArgs& d = a.d;
  const WindowView& w = d.w;
  const PeerMap& p = w.peers;
  const int R = p.nRanks, G = p.lsaSize, N = p.nodes(), L = d.numExperts / R, n0 = p.node(p.rank);
  const int rowLen = R + L;
  for (int i = threadIdx.x; i < G * rowLen; i += blockDim.x) {  // node peers (LSA)
    const int dst = p.lsaBase + i / rowLen, j = i % rowLen;
    const int v = j < R ? d.routing.tokensPerRank[j] : d.routing.tokensPerExpert[dst * L + j - R];
    ((int*)lsaPointer(w, dst, w.countsOff) + (size_t)p.rank * rowLen)[j] = v;
  }
  const int netLen = R + 1 + G * L;  // remote nodes: staged rows
  for (int i = threadIdx.x; i < (N - 1) * netLen; i += blockDim.x) {
    const int bi = i / netLen, j = i % netLen, B = bi < n0 ? bi : bi + 1;
    const int v = j < R ? d.routing.tokensPerRank[j]
                        : j == R ? d.routing.tokensPerNode[B] : d.routing.tokensPerExpert[B * G * L + j - R - 1];
    ((int*)(windowLocal(w, a.net.countsStage) + (size_t)bi * a.net.countsBytes))[j] = v;
  }
  __syncthreads();
  if (threadIdx.x == 0) __threadfence_system();
  __syncthreads();
  for (int i = threadIdx.x; i < G; i += blockDim.x) signalStore(w, p.lsaBase + i, kSigDispatchCounts, seq);
  for (int B = threadIdx.x; B < N; B += blockDim.x) {
    if (B == n0) continue;
    const int f = railPeer(p, B);
    const ncclGin gin(a.net.devComm, ginContextOf(a.net.devComm, f));
    putWithSignal(gin, w.win, f, a.net.countsLand + (size_t)myNodeIndexAt(p, B) * a.net.countsBytes,
                  a.net.countsStage + (size_t)remoteNodeIndex(p, B) * a.net.countsBytes, (size_t)a.net.countsBytes,
                  (ncclGinSignal_t)(a.net.sigCounts0 + p.rank), 1, ncclCoopThread());
  }
}

// Phase 2, one warp: the record of token t at `rec` (net/ht_regions.h).
__device__ __forceinline__ void packRecord(const DispatchNetArgs& a, char* rec, int t, int B, int lane) {
  const DispatchArgs& d = a.d;
  const PeerMap& p = d.w.peers;
  const int G = p.lsaSize, K = d.topK;
  if (lane == 0) *(int2*)rec = make_int2(t, d.topkWeights != nullptr ? 1 : 0);
  if (lane < G) ((int*)(rec + a.net.recordPos))[lane] = d.routing.sendPos[(size_t)t * p.nRanks + B * G + lane];
  if (lane < K) {
    ((int*)(rec + a.net.recordExpert))[lane] = (int)d.routing.topkIdx[(size_t)t * K + lane];
    ((float*)(rec + a.net.recordWeight))[lane] = d.topkWeights ? d.topkWeights[(size_t)t * K + lane] : 0.0f;
  }
  const uint4* src = (const uint4*)((const char*)d.x + (size_t)t * d.rowBytes);
  uint4* dst = (uint4*)(rec + a.net.recordData);
  for (int v = lane; v < d.rowBytes / 16; v += 32) dst[v] = loadStreaming(src + v);
  const float* scales = d.xScales + (size_t)t * d.scaleCols;
  for (int j = lane; j < d.scaleCols; j += 32) ((float*)(rec + a.net.recordScales))[j] = scales[j];
}

// Phase 2, every CTA: its chunks of every remote node's list, packed and put.
__device__ void sendRecords(const DispatchNetArgs& a, int warp, int warps, int lane) {
  const DispatchArgs& d = a.d;
  const WindowView& w = d.w;
  const PeerMap& p = w.peers;
  const int N = p.nodes(), n0 = p.node(p.rank), maxTokens = a.net.maxTokens;
  const size_t rec = (size_t)a.net.recordBytes;
  const int sig = a.net.sigData0 + p.rank * gridDim.x + blockIdx.x;
  for (int B = 0; B < N; ++B) {
    if (B == n0) continue;
    const int bi = remoteNodeIndex(p, B), f = railPeer(p, B);
    const ChannelChunks ch{d.routing.tokensPerNode[B], (int)blockIdx.x, (int)gridDim.x, a.net.dispatchChunk};
    const size_t stage = a.net.dispatchStage + (size_t)bi * maxTokens * rec;
    const size_t land = a.net.dispatchLand + (size_t)myNodeIndexAt(p, B) * maxTokens * rec;
    for (int k = ch.c; k < ch.chunks(); k += ch.S) {
      const int first = k * ch.chunk, n = ch.size(k);
      for (int i = warp; i < n; i += warps) {
        const int slot = first + i;
        packRecord(a, windowLocal(w, stage + (size_t)slot * rec), d.routing.nodeList[(size_t)B * maxTokens + slot], B,
                   lane);
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        __threadfence_system();  // the CTA's records, then the put that reads them
        putChunk(a.net, w.win, f, land + (size_t)first * rec, stage + (size_t)first * rec, (size_t)n * rec, sig, ch, k);
      }
    }
    if (threadIdx.x == 0 && ch.last() < 0) signalEmptyChannel(a.net, f, sig, ch);
  }
}

}  // namespace

__global__ void __launch_bounds__(kNetDispatchThreads, 1) dispatchHtNetKernel(DispatchNetArgs a) {
  const DispatchArgs& d = a.d;
  const WindowView& w = d.w;
  const PeerMap& p = w.peers;
  const int R = p.nRanks, G = p.lsaSize, N = p.nodes(), n0 = p.node(p.rank), li = p.localIndex(p.rank);
  const int L = d.numExperts / R, K = d.topK;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  __shared__ char* peer[kMaxHtRanks];
  __shared__ int base[kMaxHtRanks];  // [A * G + j]: first row on rank lsaBase + j of source A * G + li
  __shared__ int overflow;
  const uint64_t seq = *(volatile unsigned long long*)&w.state->dispatchSeq + 1;
  if (threadIdx.x < R) peer[threadIdx.x] = peerWindow(w, threadIdx.x, 0);
  if (threadIdx.x == 0) overflow = 0;
  __syncthreads();
  const size_t rec = (size_t)a.net.recordBytes;
  const int maxTokens = a.net.maxTokens;

  if (blockIdx.x == 0) publishCountsNet(a, seq);
  sendRecords(a, warp, warps, lane);

  // Phase 3: the counts rows of this node's rail peers elsewhere, relayed by each rank of the node.
  if (blockIdx.x == 0) {
    bool ok = true;
    for (int A = threadIdx.x; A < N; A += blockDim.x) {
      if (A == n0) continue;
      const int s = A * G + li;
      const ncclGin gin(a.net.devComm, ginContextOf(a.net.devComm, p.rank));
      ok &= waitGinSignal(w, gin, (ncclGinSignal_t)(a.net.sigCounts0 + s), seq, s);
    }
    if (__syncthreads_and(ok)) {
      if (threadIdx.x == 0) __threadfence_system();
      __syncthreads();
      for (int i = threadIdx.x; i < G; i += blockDim.x) signalStore(w, p.lsaBase + i, kSigNetCounts, seq);
    }
  }
  const bool arrived = ctaWaitAllPeers(w, kSigDispatchCounts, seq) && ctaWaitAllPeers(w, kSigNetCounts, seq);
  if (arrived) {
    for (int dst = threadIdx.x; dst < R; dst += blockDim.x) {  // the same decision on every rank
      int total = 0;
      for (int s = 0; s < R; ++s) total += loadPeerInt(countsRowOf(a, s) + dst);
      if (total > d.capacity) {
        atomicExch(&overflow, 1);
        if (blockIdx.x == 0) reportError(w.error, kDevOverflow, dst, total, d.capacity);
      }
    }
    for (int i = threadIdx.x; i < N * G; i += blockDim.x) {
      const int src = (i / G) * G + li, dst = p.lsaBase + i % G;
      int before = 0;
      for (int s = 0; s < src; ++s) before += loadPeerInt(countsRowOf(a, s) + dst);
      base[i] = before;
    }
  }
  __syncthreads();
  const bool empty = !arrived || overflow;
  if (blockIdx.x == 0) {  // the counts, as intranode (dispatch_lsa.cu), and the combine's bookkeeping
    for (int j = threadIdx.x; j < 1 + L; j += blockDim.x) {
      int sum = 0;
      for (int s = 0; s < R && !empty; ++s) {
        const int* row = countsRowOf(a, s);
        sum += loadPeerInt(row + (j == 0 ? p.rank : p.lsaIndex(s) != kPeerRemote ? R + j - 1 : R + 1 + li * L + j - 1));
      }
      d.routing.recvCounts[j] = sum;
      if (d.hostCounts) d.hostCounts[1 + j] = sum;
    }
    for (int i = threadIdx.x; i < G; i += blockDim.x) d.routing.sendOffset[p.lsaBase + i] = base[n0 * G + i];
    for (int A = threadIdx.x; A < N; A += blockDim.x)
      d.routing.netRecords[A] = A == n0 || empty ? 0 : loadPeerInt(countsRowOf(a, A * G + li) + R);
    if (threadIdx.x == 0) *d.routing.dispatchEmpty = empty ? 1 : 0;
    if (d.hostCounts) {
      __syncthreads();
      if (threadIdx.x == 0) {
        __threadfence_system();  // the counts, then the sequence number that releases them
        *(volatile int*)d.hostCounts = d.hostSeq;
      }
    }
  }

  if (!empty) {  // phase 4: own node, as intranode
    const bool inNode = lane >= p.lsaBase && lane < p.lsaBase + G;
    for (int t = blockIdx.x * warps + warp; t < d.numTokens; t += gridDim.x * warps) {
      const int pos = inNode ? d.routing.sendPos[(size_t)t * R + lane] : -1;
      const unsigned destMask = __ballot_sync(0xffffffffu, pos >= 0);
      if (destMask == 0) continue;
      storeSourceToken(d, peer, t, destMask, pos >= 0 ? base[n0 * G + lane - p.lsaBase] + pos : 0, lane);
    }
  }

  // Phase 5: forward the records of this CTA's chunks from every remote node's rail peer.
  bool ok = arrived;
  for (int A = 0; A < N && arrived; ++A) {
    if (A == n0) continue;
    const int s = A * G + li, ai = remoteNodeIndex(p, A);
    const int sig = a.net.sigData0 + s * gridDim.x + blockIdx.x;
    const ChannelChunks ch{loadPeerInt(countsRowOf(a, s) + R), (int)blockIdx.x, (int)gridDim.x, a.net.dispatchChunk};
    const char* land = windowLocal(w, a.net.dispatchLand + (size_t)ai * maxTokens * rec);
    int* netRows = d.routing.netRows + (size_t)A * maxTokens * G;
    for (int k = ch.c; k < ch.chunks() && !empty; k += ch.S) {
      // Thread 0 waits; the barrier hands every thread the same answer (no shared flag to race on).
      if (!__syncthreads_and(threadIdx.x != 0 || waitChannelAtLeast(w, a.net, sig, ch.c, seq, ch.through(k), s))) {
        ok = false;
        break;
      }
      const int first = k * ch.chunk, n = ch.size(k);
      for (int i = warp; i < n; i += warps) {
        const int slot = first + i;
        const char* r = land + (size_t)slot * rec;
        const int j = lane - p.lsaBase;
        const int pos = j >= 0 && j < G ? loadPeerInt((const int*)(r + a.net.recordPos) + j) : -1;
        const int row = pos >= 0 ? base[A * G + j] + pos : -1;
        if (j >= 0 && j < G) netRows[(size_t)slot * G + j] = row;
        const unsigned destMask = __ballot_sync(0xffffffffu, pos >= 0);
        const int64_t e = lane < K ? loadPeerInt((const int*)(r + a.net.recordExpert) + lane) : -1;
        const float wt = lane < K ? __int_as_float(loadPeerInt((const int*)(r + a.net.recordWeight) + lane)) : 0.0f;
        const bool withWeights = (loadPeerInt((const int*)r + 1) & 1) != 0;
        storeRowToRanks<false>(d, peer, (const uint4*)(r + a.net.recordData), (const float*)(r + a.net.recordScales),
                               e, wt, withWeights, destMask, row < 0 ? 0 : row, lane);
      }
    }
    if (threadIdx.x == 0 && ok) ok = waitChannelDone(w, a.net, sig, ch.c, seq, s);
  }
  (void)ok;  // failures are recorded; the barriers below give up at once after one

  finishNetOperation(w, a.net, kSigDispatchDone, a.net.sigDispatchDone0, seq, &w.state->dispatchArrived,
                     &w.state->dispatchSeq);
}

cudaError_t loadHtDispatchNetKernel() {
  cudaFuncAttributes attr;
  return cudaFuncGetAttributes(&attr, dispatchHtNetKernel);
}

cudaError_t launchDispatchHtNet(const DispatchNetArgs& args, int numCtas, cudaStream_t stream) {
  dispatchHtNetKernel<<<numCtas, kNetDispatchThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace nccl_moe
