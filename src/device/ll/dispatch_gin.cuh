// The GIN phases of the low-latency dispatch (several nodes; INTERNODE.md §4), used by the
// kNet instantiation of the kernels in dispatch_lsa.cu. The LSA phases there route remote peers
// out; these handle them:
//  - stageRouteGin (send, per token, one warp): for each remote destination rank d of the token,
//    reserves record i of d (per-destination atomic), remembers it in sendIndex[t][d] (the
//    combine finds d's partial of t there) and writes the record header: token t, then the K
//    route entries as d would have received them over LSA (row on d or -1, weight);
//  - the data and scales of the record are written by sendChunkLl with the same FP8 cast as the
//    NVLink stores (recordRow);
//  - postDispatchGin (send, last CTA, one thread per remote rank d, after every record and the
//    counts row are written and fenced): puts d's records in batches of kLlNetBatch, each adding
//    its record count n_b to signal (slot, me) at d, then the counts row (rows per local expert of
//    d, then n) adding 2^32 - n. All on context ginContextOf(d), so when d sees the signal at
//    exactly epoch * 2^32 every put of the operation has landed (NCCL orders a signal after the
//    payloads of all earlier puts of the context to the same peer); a smaller value is a put
//    still in flight, a larger one a source ahead (protocol error). Then flush: the staging rows
//    may be rewritten by the next send;
//  - waitSourcesGin / fanOutRecordsGin (completion): wait for every remote source's signal
//    (timed, recorded), copy its counts into recvCounts[l][s], then store each landed record into
//    every row its entries name (data, scales, srcToken) in local HBM.
#pragma once
#include "device/kernel_args.h"
#include "device/common/peer_sync.cuh"
#include "device/common/vec_io.cuh"
#include "device/ll/source_tokens.cuh"
#include "net/device/gin.cuh"
#include "net/device/rail.h"

namespace nccl_moe {

constexpr uint64_t kLlNetDone = 1ull << 32;  // signal steps per operation (see above)

__device__ __forceinline__ char* netLocal(const WindowView& w, size_t off) {
  return (char*)ncclGetLocalPointer(w.win, off);
}

// Record i of remote rank d in this rank's staging rows.
__device__ __forceinline__ char* stagedRecord(const LlDispatchArgs& a, int d, int i) {
  const size_t row = (size_t)remoteIndex(a.w.peers, d) * a.maxTokens + i;
  return netLocal(a.w, a.net.dispatchStage) + row * a.net.recordBytes;
}

// One warp, token t: lane k holds the token's destination d (-1: none), row and weight of k;
// `lead` has the first k of each destination. Sets rec[k] to the record index for the lead k of
// each remote destination, -1 elsewhere.
__device__ __forceinline__ void stageRouteGin(const LlDispatchArgs& a, int t, int d, int row, float weight,
                                              unsigned lead, int* rec, int lane) {
  const PeerMap& p = a.w.peers;
  const bool remote = d >= 0 && p.lsaIndex(d) == kPeerRemote;
  const unsigned remoteLead = __ballot_sync(0xffffffffu, remote) & lead;
  int mine = -1;
  if ((remoteLead >> lane) & 1u) {
    const int ri = remoteIndex(p, d);
    mine = atomicAdd((int*)netLocal(a.w, a.net.destCount) + ri, 1);
    ((int*)netLocal(a.w, a.net.sendIndex))[(size_t)t * (p.nRanks - p.lsaSize) + ri] = mine;
  }
  for (unsigned m = remoteLead; m != 0; m &= m - 1) {
    const int j = __ffs(m) - 1;
    const int dj = __shfl_sync(0xffffffffu, d, j), ij = __shfl_sync(0xffffffffu, mine, j);
    char* header = stagedRecord(a, dj, ij);
    if (lane == 0) *(int2*)header = make_int2(t, 0);
    if (lane < a.topK)
      ((uint2*)(header + 8))[lane] = make_uint2((uint32_t)(d == dj ? row : -1), __float_as_uint(weight));
  }
  if (lane < a.topK) rec[lane] = mine;
}

// The last CTA of the send, after the counts rows are written: see the file comment.
inline __device__ void postDispatchGin(const LlDispatchArgs& a) {
  const PeerMap& p = a.w.peers;
  const int M = a.maxTokens, L = a.numExperts / p.nRanks;
  for (int d = threadIdx.x; d < p.nRanks; d += blockDim.x) {
    if (p.lsaIndex(d) != kPeerRemote || a.failed.has(d)) continue;  // failed: no record reserved
    const int ri = remoteIndex(p, d), at = remoteIndexAt(p, d, p.rank);
    const int n = atomicExch((int*)netLocal(a.w, a.net.destCount) + ri, 0);
    ((int*)(netLocal(a.w, a.net.countsStage) + (size_t)ri * a.net.countsBytes))[L] = n;
    __threadfence_system();  // records (other CTAs fenced before arriving) and counts, then puts
    const ncclGin gin(a.net.devComm, ginContextOf(a.net.devComm, d));
    const ncclGinSignal_t sig = (ncclGinSignal_t)(a.net.dispatchSignal0 + p.rank);
    const size_t rec = (size_t)a.net.recordBytes;
    for (int b = 0; b < n; b += kLlNetBatch) {
      const int nb = min(kLlNetBatch, n - b);
      putWithSignal(gin, a.w.win, d, a.net.dispatchLand + ((size_t)at * M + b) * rec,
                    a.net.dispatchStage + ((size_t)ri * M + b) * rec, nb * rec, sig, (uint64_t)nb, ncclCoopThread());
    }
    putWithSignal(gin, a.w.win, d, a.net.countsLand + (size_t)at * a.net.countsBytes,
                  a.net.countsStage + (size_t)ri * a.net.countsBytes, (size_t)a.net.countsBytes, sig,
                  kLlNetDone - (uint64_t)n, ncclCoopThread());
    gin.flush(ncclCoopThread());
  }
}

// Completion, every CTA: each thread waits for some remote sources' signals (exactly
// epoch * kLlNetDone) and puts their record counts into netTokens[s]: 0 for LSA sources, -1 for
// failed ones (a.failed are not waited for; a timeout puts the source into the failed-rank set).
// Returns false on a fatal failure of this thread (the caller agrees over the CTA).
inline __device__ bool waitSourcesGin(const LlDispatchArgs& a, uint64_t epoch, int* netTokens) {
  const PeerMap& p = a.w.peers;
  const int L = a.numExperts / p.nRanks;
  const ncclGin gin(a.net.devComm, ginContextOf(a.net.devComm, p.rank));
  bool ok = true;
  for (int s = threadIdx.x; s < p.nRanks; s += blockDim.x) {
    netTokens[s] = 0;
    if (p.lsaIndex(s) != kPeerRemote) continue;
    int outcome = kWaitPeerFailed;
    if (!a.failed.has(s))
      outcome = waitGinSignalLl(a.w, gin, (ncclGinSignal_t)(a.net.dispatchSignal0 + s), epoch * kLlNetDone, s,
                                kLlNetDone);
    const int* counts = (const int*)(netLocal(a.w, a.net.countsLand) + (size_t)remoteIndex(p, s) * a.net.countsBytes);
    netTokens[s] = outcome == kWaitArrived ? loadPeerInt(counts + L) : -1;
    ok &= outcome != kWaitFatal;
  }
  return ok;
}

// CTA 0 of the completion, after the waits: recvCounts[l][s] of every remote source s (0 for a
// failed one: netTokens[s] < 0).
inline __device__ void copyRemoteCountsGin(const LlDispatchArgs& a, int* recvCounts, const int* netTokens) {
  const PeerMap& p = a.w.peers;
  const int R = p.nRanks, L = a.numExperts / R;
  for (int i = threadIdx.x; i < R * L; i += blockDim.x) {
    const int s = i / L, l = i % L;
    if (p.lsaIndex(s) != kPeerRemote) continue;
    const int* counts = (const int*)(netLocal(a.w, a.net.countsLand) + (size_t)remoteIndex(p, s) * a.net.countsBytes);
    recvCounts[l * R + s] = netTokens[s] < 0 ? 0 : loadPeerInt(counts + l);
  }
}

// Stores the landed records into their rows: items (record, chunk of chunkVecs vectors) over the
// remote sources' records (netStart: [R + 1] prefix of netTokens), one warp per item.
inline __device__ void fanOutRecordsGin(const LlDispatchArgs& a, char* slot, const int* netStart, int chunkVecs, int warp,
                                        int warps, int lane) {
  const PeerMap& p = a.w.peers;
  const int R = p.nRanks, M = a.maxTokens, K = a.topK;
  const size_t rowBytes = a.fp8 ? (size_t)a.hidden : (size_t)a.hidden * 2;
  const int rowVecs = (int)(rowBytes / 16), chunks = (rowVecs + chunkVecs - 1) / chunkVecs;
  const int items = netStart[R] * chunks;
  const char* land = netLocal(a.w, a.net.dispatchLand);
  for (int it = blockIdx.x * warps + warp; it < items; it += gridDim.x * warps) {
    int s, i;
    sourceTokenOf(netStart, it / chunks, &s, &i);
    const char* rec = land + ((size_t)remoteIndex(p, s) * M + i) * a.net.recordBytes;
    const int t = loadPeerInt((const int*)rec);
    const int row = lane < K ? loadPeerInt2((const int2*)(rec + 8) + lane).x : -1;
    const unsigned here = __ballot_sync(0xffffffffu, row >= 0);
    int rows[kMaxTopK];  // the record's rows on this rank, k order (whole warp)
    int n = 0;
    for (unsigned m = here; m != 0; m &= m - 1) rows[n++] = __shfl_sync(0xffffffffu, row, __ffs(m) - 1);
    const int c = it % chunks;
    const uint4* src = (const uint4*)(rec + a.net.recordData);
    for (int v = c * chunkVecs + lane; v < min((c + 1) * chunkVecs, rowVecs); v += 32) {
      const uint4 value = loadPeer(src + v);
      for (int j = 0; j < n; ++j) ((uint4*)(slot + a.slot.recvX + (size_t)rows[j] * rowBytes))[v] = value;
    }
    if (c != 0) continue;
    const int* scales = (const int*)(rec + a.net.recordScales);
    for (int w = lane; w < a.scaleBytes / 4; w += 32) {
      const int value = loadPeerInt(scales + w);
      for (int j = 0; j < n; ++j) ((int*)(slot + a.slot.recvScales + (size_t)rows[j] * a.scaleBytes))[w] = value;
    }
    if (lane < K && row >= 0) ((int*)(slot + a.slot.srcToken))[row] = t;
  }
}

}  // namespace nccl_moe
