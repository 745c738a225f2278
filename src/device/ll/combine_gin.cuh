// The GIN phases of the low-latency combine (several nodes; INTERNODE.md §4), used by the kNet
// instantiation of the kernels in combine_lsa.cu (included there after the row sums it shares:
// sumRowsChunk, so a partial is the same bits whichever way it travels).
//  - sendPartialsGin (send, every CTA, as an expert rank): for the records that each remote
//    source s landed here in the slot's dispatch (count in its counts row), sums this rank's rows
//    of the record's token in k order (FP32, the record's weights) into one BF16 partial, stored
//    at combineStage[s][i] (record order, the source's record index i);
//  - postCombineGin (send, last CTA, one thread per remote source s): puts s's partials in
//    batches of kLlNetBatch to s's combineLand[me][i], each adding its count n_b to signal
//    (slot, me) at s; the last batch adds 2^32 - n as well (n = 0: a signal-only add of 2^32).
//    One context per destination (ginContextOf(s)), so the signal at exactly epoch * 2^32 means
//    every partial of the operation has landed. Then flush (staging reusable);
//  - waitRanksGin / the completion's row locator: the source waits for every remote rank's
//    signal (timed, recorded) and finds rank r's partial of token t at combineLand[r][i] with
//    i = sendIndex[t][r], recorded by its dispatch.
#pragma once
#include "device/kernel_args.h"
#include "device/common/peer_sync.cuh"
#include "device/common/vec_io.cuh"
#include "device/ll/source_tokens.cuh"
#include "net/device/gin.cuh"
#include "net/device/rail.h"

namespace nccl_moe {

constexpr uint64_t kLlNetCombineDone = 1ull << 32;  // signal steps per operation

__device__ __forceinline__ char* netLocalC(const WindowView& w, size_t off) {
  return (char*)ncclGetLocalPointer(w.win, off);
}

// Records that remote source s landed here in the slot's dispatch (its counts row).
__device__ __forceinline__ int landedRecords(const LlCombineArgs& a, int s) {
  const PeerMap& p = a.w.peers;
  const int L = a.numExperts / p.nRanks;
  const int* counts = (const int*)(netLocalC(a.w, a.net.countsLand) + (size_t)remoteIndex(p, s) * a.net.countsBytes);
  return loadPeerInt(counts + L);
}

// Send, every CTA: netStart [R + 1] (shared) gets the prefix of the remote sources' records.
inline __device__ void recordStartsGin(const LlCombineArgs& a, int* netStart) {
  if (threadIdx.x == 0) {
    int run = 0;
    for (int s = 0; s < a.w.peers.nRanks; ++s) {
      netStart[s] = run;
      if (a.w.peers.lsaIndex(s) == kPeerRemote && !a.failed.has(s)) run += landedRecords(a, s);
    }
    netStart[a.w.peers.nRanks] = run;
  }
  __syncthreads();
}

// Send: the partials of the remote sources' records, items (record, chunk of sumVecs vectors).
// Sum(here, row, weight, base, result): sumRowsChunk<false> over the expert output.
template <int kUnroll, class Sum>
__device__ void sendPartialsGin(const LlCombineArgs& a, const int* netStart, int sumVecs, int warp, int warps,
                                int lane, Sum sum) {
  const PeerMap& p = a.w.peers;
  const int M = a.maxTokens, K = a.topK, H = a.hidden, rowVecs = H / 8;
  const int chunks = (rowVecs + sumVecs - 1) / sumVecs, items = netStart[p.nRanks] * chunks;
  const char* land = netLocalC(a.w, a.net.dispatchLand);
  char* stage = netLocalC(a.w, a.net.combineStage);
  for (int it = blockIdx.x * warps + warp; it < items; it += gridDim.x * warps) {
    int s, i;
    sourceTokenOf(netStart, it / chunks, &s, &i);
    const size_t r = (size_t)remoteIndex(p, s) * M + i;
    const int2 entry = lane < K ? loadPeerInt2((const int2*)(land + r * a.net.recordBytes + 8) + lane)
                                : make_int2(-1, 0);
    const unsigned here = __ballot_sync(0xffffffffu, entry.x >= 0);
    const int base = (it % chunks) * sumVecs;
    uint4 partial[kUnroll];
    sum(here, entry.x, __int_as_float(entry.y), base, partial);  // here == 0 gives zeros
    uint4* dst = (uint4*)(stage + r * H * 2);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int idx = base + u * 32 + lane;
      if (idx < rowVecs) dst[idx] = partial[u];
    }
  }
}

// Send, last CTA, after every CTA's partials are fenced: see the file comment.
inline __device__ void postCombineGin(const LlCombineArgs& a) {
  const PeerMap& p = a.w.peers;
  const int M = a.maxTokens;
  const size_t rowBytes = (size_t)a.hidden * 2;
  for (int s = threadIdx.x; s < p.nRanks; s += blockDim.x) {
    if (p.lsaIndex(s) != kPeerRemote || a.failed.has(s)) continue;
    const int ri = remoteIndex(p, s), at = remoteIndexAt(p, s, p.rank), n = landedRecords(a, s);
    const ncclGin gin(a.net.devComm, ginContextOf(a.net.devComm, s));
    const ncclGinSignal_t sig = (ncclGinSignal_t)(a.net.combineSignal0 + p.rank);
    for (int b = 0; b < n; b += kLlNetBatch) {
      const int nb = min(kLlNetBatch, n - b);
      const uint64_t add = (uint64_t)nb + (b + nb == n ? kLlNetCombineDone - (uint64_t)n : 0);
      putWithSignal(gin, a.w.win, s, a.net.combineLand + ((size_t)at * M + b) * rowBytes,
                    a.net.combineStage + ((size_t)ri * M + b) * rowBytes, nb * rowBytes, sig, add, ncclCoopThread());
    }
    if (n == 0) gin.signal(ncclTeamWorld(gin.comm), s, ncclGin_SignalAdd{sig, kLlNetCombineDone}, ncclCoopThread());
    gin.flush(ncclCoopThread());
  }
}

// Completion: this thread's waits for the remote ranks' signals (exactly epoch * 2^32).
// Sets lost[r] for every remote rank r (shared, one thread per r as in the completion's LSA
// loop): a.failed are not waited for, a timeout puts r into the failed-rank set. False on a fatal
// failure.
inline __device__ bool waitRanksGin(const LlCombineArgs& a, uint64_t epoch, unsigned char* lost) {
  const PeerMap& p = a.w.peers;
  const ncclGin gin(a.net.devComm, ginContextOf(a.net.devComm, p.rank));
  bool ok = true;
  for (int r = threadIdx.x; r < p.nRanks; r += blockDim.x) {
    if (p.lsaIndex(r) != kPeerRemote) continue;
    int outcome = kWaitPeerFailed;
    if (!a.failed.has(r))
      outcome = waitGinSignalLl(a.w, gin, (ncclGinSignal_t)(a.net.combineSignal0 + r), epoch * kLlNetCombineDone, r,
                                kLlNetCombineDone);
    lost[r] = outcome == kWaitPeerFailed;
    ok &= outcome != kWaitFatal;
  }
  return ok;
}

// Completion: where remote rank r's partial of token t landed. Contract: t went to r.
__device__ __forceinline__ const uint4* remotePartial(const LlCombineArgs& a, int t, int r) {
  const PeerMap& p = a.w.peers;
  const int remote = p.nRanks - p.lsaSize, ri = remoteIndex(p, r);
  const int i = ((const int*)netLocalC(a.w, a.net.sendIndex))[(size_t)t * remote + ri];
  return (const uint4*)(netLocalC(a.w, a.net.combineLand) + ((size_t)ri * a.maxTokens + i) * a.hidden * 2);
}

}  // namespace nccl_moe
