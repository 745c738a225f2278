// The start of every HT combine kernel (pull and TMA): where this rank's expert outputs are, and
// when every peer's are readable. Device code; included by src/device/ht/combine_*.cu.
#pragma once
#include "device/kernel_args.h"
#include "device/common/peer_sync.cuh"
#include "device/common/vec_io.cuh"

namespace nccl_moe {

// Called by every thread of every CTA, after peer[r] (rank r's window, LSA; indexed by world
// rank) is filled and the CTA synchronised. CTA 0 publishes inOff (bytes from the window base to
// this rank's expert output rows) into the kSigCombineSource row of every rank of this node, then
// raises kSigCombineReady = seq (release: the offset is visible before the signal). Every CTA
// then waits for the ready signal of every rank of the node (timeouts recorded) and fills
// rows[r] = peer[r] + the offset rank r published, for those ranks r (all ranks on one node).
// Returns false when a wait failed (rows[] is then not filled). Ends with a CTA barrier.
// A peer rewrites its offset only in its next combine, after this kernel's done signals.
__device__ __forceinline__ bool publishSourceAndAwaitPeers(const WindowView& w, size_t inOff, uint64_t seq,
                                                           char* const* peer, const char** rows) {
  const int G = w.peers.lsaSize, base = w.peers.lsaBase;
  if (blockIdx.x == 0) {
    if (threadIdx.x == 0) __threadfence_system();
    __syncthreads();
    for (int i = threadIdx.x; i < G; i += blockDim.x) {
      *signalPtr(w, base + i, kSigCombineSource, w.peers.rank) = inOff;  // ordered by the release below
      signalStore(w, base + i, kSigCombineReady, seq);
    }
  }
  const bool ready = ctaWaitAllPeers(w, kSigCombineReady, seq);
  // Thread i acquired rank base + i's ready signal in the wait, so it sees the offset stored before it.
  if (ready && threadIdx.x < G) {
    const int r = base + threadIdx.x;
    rows[r] = peer[r] + loadAcquire(signalPtr(w, w.peers.rank, kSigCombineSource, r));
  }
  __syncthreads();
  return ready;
}

// w(t, r): the sum of t's topkWeights whose expert lives on rank r, in k order from 0.0f (0 when t
// has none there), or 1 for an unweighted combine (a.topkWeights NULL).
__device__ __forceinline__ float combineWeight(const CombineArgs& a, int t, int r) {
  if (!a.topkWeights) return 1.0f;
  const int expertsPerRank = a.numExperts / a.w.peers.nRanks;
  float weight = 0.0f;
  for (int k = 0; k < a.topK; ++k) {
    const int64_t e = a.routing.topkIdx[(size_t)t * a.topK + k];
    if (e >= 0 && (int)e / expertsPerRank == r) weight += a.topkWeights[(size_t)t * a.topK + k];
  }
  return weight;
}

// Warp-collective form of combineWeight (t warp-uniform, all 32 lanes): lane r gets w(t, r), the
// same additions in the same k order. Lane k < a.topK loads entry k of t's topkIdx and
// topkWeights, so the entries cost one memory round trip instead of up to 2 * topK dependent ones.
__device__ __forceinline__ float combineWeightWarp(const CombineArgs& a, int t, int lane) {
  if (!a.topkWeights) return 1.0f;
  const int expertsPerRank = a.numExperts / a.w.peers.nRanks;
  int rankOfK = -1;
  float weightOfK = 0.0f;
  if (lane < a.topK) {
    const int64_t e = a.routing.topkIdx[(size_t)t * a.topK + lane];
    weightOfK = a.topkWeights[(size_t)t * a.topK + lane];
    rankOfK = e >= 0 ? (int)e / expertsPerRank : -1;
  }
  float weight = 0.0f;
  for (int k = 0; k < a.topK; ++k) {
    const int r = __shfl_sync(0xffffffffu, rankOfK, k);
    const float wk = __shfl_sync(0xffffffffu, weightOfK, k);
    if (r == lane) weight += wk;
  }
  return weight;
}

// One warp, lane k < a.topK: the sum over the ranks r of srcMask (warp-uniform) in increasing
// order of rank r's per-row value [row][k] (its window, peer[r], at a.recvWeightsOff; row = lane
// r's rowIndex), FP32 from +0.0f. Other lanes return 0.
__device__ __forceinline__ float sumRankValues(const CombineArgs& a, char* const* peer, unsigned srcMask,
                                               int rowIndex, int lane) {
  float sum = 0.0f;
  for (unsigned m = srcMask; m != 0; m &= m - 1) {
    const int r = __ffs(m) - 1;
    const int row = __shfl_sync(0xffffffffu, rowIndex, r);
    if (lane < a.topK)
      sum = __fadd_rn(sum, __int_as_float(loadPeerInt((const int*)(peer[r] + a.recvWeightsOff) +
                                                      (size_t)row * a.topK + lane)));
  }
  return sum;
}

}  // namespace nccl_moe
