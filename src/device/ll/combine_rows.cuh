// The pieces of the low-latency combine that both of its forms run (combine_lsa.cu: a send
// kernel and a completion kernel; one_launch_lsa.cu: one kernel for small one-shot batches):
// the rank-ordered, k-ordered FP32 row sums, the send's (source token, chunk) items that turn
// this rank's expert rows into one BF16 partial per (token, rank), and the completion's sums
// of a token's partials. Same operations in the same order in both forms, so a partial and an
// output are the same bits whichever form each rank ran.
#pragma once
#include "device/kernel_args.h"
#include "device/common/peer_sync.cuh"
#include "device/common/vec_io.cuh"
#include "device/ll/source_tokens.cuh"

namespace nccl_moe {

constexpr int kLlCombineThreads = 512;
constexpr int kLlCombineWarps = kLlCombineThreads / 32;
constexpr int kLlReduceUnroll = 4;   // vectors per lane per row in flight
constexpr int kLlRowsInFlight = 4;   // rows of a sum loaded before any is added
constexpr int kLlSumVecs = 32 * kLlReduceUnroll;  // vectors of one (token, chunk) item

static_assert(kLlCombineThreads >= kMaxRanks, "one thread per rank fills the peer table");

// Adds vectors [base, base + kLlSumVecs) of the BF16 rows named by the lanes in `m` to `acc`, in
// increasing lane order: each lane j in m passes its row's start and weight. FP32 accumulation
// acc = acc + (w * y rounded to float). kPeerWritten: the rows were written by another GPU (read
// past L1).
template <bool kPeerWritten>
__device__ __forceinline__ void addRowsChunk(unsigned m, const uint4* myRow, float myWeight, int base,
                                             int rowVecs, int lane, float (&acc)[kLlReduceUnroll][8]) {
  while (m != 0) {
    uint4 v[kLlRowsInFlight][kLlReduceUnroll];
    float wq[kLlRowsInFlight];
    int n = 0;
#pragma unroll
    for (int q = 0; q < kLlRowsInFlight; ++q) {
      if (m == 0) break;
      const int j = __ffs(m) - 1;
      m &= m - 1;
      wq[q] = __shfl_sync(0xffffffffu, myWeight, j);
      const uint4* src = (const uint4*)__shfl_sync(0xffffffffu, (unsigned long long)myRow, j);
#pragma unroll
      for (int u = 0; u < kLlReduceUnroll; ++u) {
        const int idx = base + u * 32 + lane;
        if (idx >= rowVecs) v[q][u] = make_uint4(0, 0, 0, 0);
        else v[q][u] = kPeerWritten ? loadPeer(src + idx) : loadStreaming(src + idx);
      }
      n = q + 1;
    }
#pragma unroll
    for (int q = 0; q < kLlRowsInFlight; ++q) {
      if (q >= n) break;
#pragma unroll
      for (int u = 0; u < kLlReduceUnroll; ++u) {
        const uint32_t words[4] = {v[q][u].x, v[q][u].y, v[q][u].z, v[q][u].w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          acc[u][2 * j] = __fadd_rn(acc[u][2 * j], __fmul_rn(wq[q], bf16BitsToFloat(words[j] & 0xffffu)));
          acc[u][2 * j + 1] = __fadd_rn(acc[u][2 * j + 1], __fmul_rn(wq[q], bf16BitsToFloat(words[j] >> 16)));
        }
      }
    }
  }
}

__device__ __forceinline__ void zeroChunk(float (&acc)[kLlReduceUnroll][8]) {
#pragma unroll
  for (int u = 0; u < kLlReduceUnroll; ++u)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[u][j] = 0.0f;
}

// One BF16 rounding of each accumulated value (packBf16x8, as the HT combine).
__device__ __forceinline__ void packChunk(const float (&acc)[kLlReduceUnroll][8], uint4 (&result)[kLlReduceUnroll]) {
#pragma unroll
  for (int u = 0; u < kLlReduceUnroll; ++u) result[u] = packBf16x8(acc[u]);
}

// Sums the rows named by the lanes in `m` (addRowsChunk) from +0.0f, then rounds once to BF16;
// m == 0 gives zeros.
template <bool kPeerWritten>
__device__ void sumRowsChunk(unsigned m, const uint4* myRow, float myWeight, int base, int rowVecs,
                             int lane, uint4 (&result)[kLlReduceUnroll]) {
  float acc[kLlReduceUnroll][8];
  zeroChunk(acc);
  addRowsChunk<kPeerWritten>(m, myRow, myWeight, base, rowVecs, lane, acc);
  packChunk(acc, result);
}

// The completion's sum of token t's partials over more than 32 ranks: the same sum as
// sumRowsChunk with one lane per rank, taken 32 ranks at a time (lane j of step g names rank
// 32g + j), so the ranks are still added in increasing order. mask: t's rank mask;
// rowOf(r): rank r's partial of t (for ranks in the mask); ranks in `skip` are left out.
template <class RowOf>
__device__ void sumPartialsWide(const uint32_t* mask, const unsigned int* skip, RowOf rowOf, int R, int base,
                                int rowVecs, int lane, uint4 (&result)[kLlReduceUnroll]) {
  float acc[kLlReduceUnroll][8];
  zeroChunk(acc);
  for (int g = 0; g < rankMaskWords(R); ++g) {
    const uint4* myRow = rowOf(min(32 * g + lane, R - 1));
    addRowsChunk<true>(mask[g] & ~skip[g], myRow, 1.0f, base, rowVecs, lane, acc);
  }
  packChunk(acc, result);
}

}  // namespace nccl_moe
#include "device/ll/combine_gin.cuh"  // uses the row sums above
namespace nccl_moe {

// The send's items, by CTA `cta` of `numCtas`: for (flat source token, chunk) item `it` of the
// tokens the slot's dispatch brought here (tokenStart: [R + 1] prefix of the sources' T_s), the
// route entries name this rank's rows of the token and their weights; the warp sums those rows
// of the expert output in k order (FP32, weighted), rounds to BF16 and stores the partial into
// its source's combineRecv[t][me] (peer: the slot of every rank, slot = peer[me]; LSA ranks
// only, kNet: remote sources are skipped here, sendPartialsGin sums theirs).
// guessSt, guessEntry: the warp's first item's (source, token) as the caller guessed it before
// tokenStart was known, and this lane's route entry of it, loaded then ((-1, 0) past K); used when
// tokenStart confirms the guess, else the entry is loaded here. guessSt.x < 0: no guess.
__device__ __forceinline__ void combineSendItemsLl(const LlCombineArgs& a, char* const* peer, const char* slot,
                                                   const int* tokenStart, int cta, int numCtas,
                                                   int2 guessSt = make_int2(-1, -1),
                                                   int2 guessEntry = make_int2(-1, 0)) {
  const int R = a.w.peers.nRanks, me = a.w.peers.rank, M = a.maxTokens, K = a.topK;
  const LlRouteEntry* route = (const LlRouteEntry*)(slot + a.slot.route);
  const int rowVecs = a.hidden / 8, chunks = (rowVecs + kLlSumVecs - 1) / kLlSumVecs;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  // Item it = (flat token, chunk); its route entry (this lane's k) is loaded one item ahead so
  // that the entry's latency overlaps the previous item's row loads.
  const int items = tokenStart[R] * chunks, stride = numCtas * kLlCombineWarps;
  auto entryOf = [&](int it) {
    if (it >= items) return make_int2(-1, 0);
    int s, t;
    sourceTokenOf(tokenStart, it / chunks, &s, &t);
    return loadRouteEntryLl(route, s, t, M, K, lane);
  };
  int it = cta * kLlCombineWarps + warp;
  bool guessed = false;  // the same in every lane of the warp
  if (guessSt.x >= 0 && it < items) {
    int s, t;
    sourceTokenOf(tokenStart, it / chunks, &s, &t);
    guessed = s == guessSt.x && t == guessSt.y;
  }
  int2 entry = guessed ? guessEntry : entryOf(it);
  for (; it < items; it += stride) {
    const int2 next = entryOf(it + stride);
    int s, t;
    sourceTokenOf(tokenStart, it / chunks, &s, &t);
    const int base = (it % chunks) * kLlSumVecs, row = entry.x;
    const float weight = __int_as_float(entry.y);
    entry = next;
    const unsigned here = __ballot_sync(0xffffffffu, row >= 0);
    if (here == 0) continue;  // token t of s has no expert on this rank
    const uint4* myRow = (const uint4*)(a.expertOut + (size_t)max(row, 0) * a.hidden);
    uint4 partial[kLlReduceUnroll];
    sumRowsChunk<false>(here, myRow, weight, base, rowVecs, lane, partial);
    uint4* dst = (uint4*)(peer[s] + a.slot.combineRecv + ((size_t)t * R + me) * a.hidden * 2);
#pragma unroll
    for (int u = 0; u < kLlReduceUnroll; ++u) {
      const int idx = base + u * 32 + lane;
      if (idx < rowVecs) storeNoAllocate(dst + idx, partial[u]);
    }
  }
}

// Completion, threads strided over the ranks r < R (with kSkipRemote the remote ones, waited for
// over GIN, are skipped): waits for r's combine signal of operation `epoch` in `sig` unless r is
// in a.failed; lost[r] = 1 when r's partials count as zero (failed, or this wait timed out on it).
// Returns false if a wait failed fatally (the caller agrees over the CTA).
template <bool kSkipRemote>
__device__ __forceinline__ bool waitCombineSignalsLl(const LlCombineArgs& a, const uint64_t* sig, uint64_t epoch,
                                                     unsigned char* lost) {
  bool ok = true;
  for (int r = threadIdx.x; r < a.w.peers.nRanks; r += blockDim.x) {
    if (kSkipRemote && a.w.peers.lsaIndex(r) == kPeerRemote) continue;  // waitRanksGin
    int outcome = kWaitPeerFailed;
    if (!a.failed.has(r))
      outcome = waitSeqLl<0>(a.w, sig + r, (uint64_t)a.signalTotal * epoch, kWaitLlCombine, r, nullptr,
                             (uint64_t)a.signalTotal);
    lost[r] = outcome == kWaitPeerFailed;
    ok &= outcome != kWaitFatal;
  }
  return ok;
}

// The rank mask of the completion's first item in CTA `cta` (one word: up to 32 ranks; 0 when the
// warp has no item). Written by this rank's dispatch, so it may be loaded before the waits: the
// load then overlaps them.
__device__ __forceinline__ unsigned combineFirstRanksLl(const LlCombineArgs& a, const char* slot, int cta) {
  const int chunks = (a.hidden / 8 + kLlSumVecs - 1) / kLlSumVecs;
  const int it = cta * kLlCombineWarps + (int)threadIdx.x / 32;
  return it < a.numTokens * chunks ? ((const uint32_t*)(slot + a.slot.tokenRanks))[it / chunks] : 0u;
}

// The completion's items, by CTA `cta` of `numCtas`, once every rank's partials of the slot's
// combine are in (lost[r]: r's partials count as zero): (token, chunk) items of this rank's own
// T tokens add the token's partials in rank order (FP32) and write BF16 to out. slot: this
// rank's slot, through the address that its own stores of partials used. kWide: more than 32
// ranks (sumPartialsWide); otherwise one lane per rank, and firstRanks is the mask of the warp's
// first item (combineFirstRanksLl).
template <bool kWide, bool kNet>
__device__ __forceinline__ void combineSumOwnLl(const LlCombineArgs& a, const char* slot, const unsigned char* lost,
                                                int cta, int numCtas, unsigned firstRanks) {
  const WindowView& w = a.w;
  const int R = w.peers.nRanks;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, rowVecs = a.hidden / 8;
  const int chunks = (rowVecs + kLlSumVecs - 1) / kLlSumVecs;
  unsigned int gone[kWide ? kRankMaskWords : 1];  // lost[] as rank-mask words, in every warp
#pragma unroll
  for (int g = 0; g < (kWide ? kRankMaskWords : 1); ++g)
    gone[g] = __ballot_sync(0xffffffffu, 32 * g + lane < R && lost[32 * g + lane]);
  const uint32_t* tokenRanks = (const uint32_t*)(slot + a.slot.tokenRanks);  // [M][rankMaskWords(R)]
  const uint16_t* recv = (const uint16_t*)(slot + a.slot.combineRecv);  // [M][R][H]
  const int first = cta * kLlCombineWarps + warp;
  for (int it = first; it < a.numTokens * chunks; it += numCtas * kLlCombineWarps) {
    const int t = it / chunks, base = (it % chunks) * kLlSumVecs;
    uint4 sum[kLlReduceUnroll];
    if (kWide) {
      const uint32_t* mask = tokenRanks + (size_t)t * rankMaskWords(R);
      sumPartialsWide(mask, gone,
                      [&](int r) {
                        if (kNet && w.peers.lsaIndex(r) == kPeerRemote && ((mask[r / 32] >> (r % 32)) & 1u))
                          return remotePartial(a, t, r);
                        return (const uint4*)(recv + ((size_t)t * R + r) * a.hidden);
                      },
                      R, base, rowVecs, lane, sum);
    } else {
      // Written by this rank's dispatch send.
      const unsigned ranks = (it == first ? firstRanks : tokenRanks[t]) & ~gone[0];
      const uint4* myRow = (const uint4*)(recv + ((size_t)t * R + min(lane, R - 1)) * a.hidden);
      if (kNet && lane < R && w.peers.lsaIndex(lane) == kPeerRemote && ((ranks >> lane) & 1u))
        myRow = remotePartial(a, t, lane);
      sumRowsChunk<true>(ranks, myRow, 1.0f, base, rowVecs, lane, sum);
    }
    uint4* dst = (uint4*)(a.out + (size_t)t * a.hidden);
#pragma unroll
    for (int u = 0; u < kLlReduceUnroll; ++u) {
      const int idx = base + u * 32 + lane;
      if (idx < rowVecs) dst[idx] = sum[u];
    }
  }
}

}  // namespace nccl_moe
