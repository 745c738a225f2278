// Low-latency combine over LSA, one partial sum per (token, rank) on NVLink.
//
// Send (numSms CTAs, on every rank as an expert rank): warps share out (source token, chunk)
// items over the tokens the slot's dispatch brought here (T_s of each source s, from its
// dispatch signal). For token t of source s the route entries name this rank's rows of t and
// their weights; the warp sums those rows of the expert output in k order (FP32, weighted),
// rounds the partial to BF16 and stores it into source s's combineRecv[t][me]. Each CTA then
// release-adds its share to combineSignals[me] at every rank (CTA 0: signalTotal - (numCtas - 1),
// the others 1: signalTotal per operation whatever the CTA count); nothing waits for a peer.
// Complete (as the source; only as many CTAs as its own (token, chunk) items need, at most
// maxCtas): wait until every rank's signal is exactly signalTotal * epoch (modulo 2^64; a rank
// ahead is a protocol error), then (token, chunk) items sum the token's partials in rank order
// (FP32) and write BF16.
//
// Several nodes: the kernels are templates on kNet (as in dispatch_lsa.cu): kNet = false is the
// single-node code, unchanged; kNet = true routes remote ranks out of the LSA stores, waits and
// signals, and adds the GIN phases of combine_gin.cuh: partials for remote sources are summed
// the same way into staging rows and put back in batches by the send's last CTA, and the
// completion adds a remote rank's partial from where it landed, in the same rank order.
#include <algorithm>

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

// One BF16 rounding of each accumulated value.
__device__ __forceinline__ void packChunk(const float (&acc)[kLlReduceUnroll][8], uint4 (&result)[kLlReduceUnroll]) {
#pragma unroll
  for (int u = 0; u < kLlReduceUnroll; ++u) {
    result[u].x = floatToBf16Bits(acc[u][0]) | (floatToBf16Bits(acc[u][1]) << 16);
    result[u].y = floatToBf16Bits(acc[u][2]) | (floatToBf16Bits(acc[u][3]) << 16);
    result[u].z = floatToBf16Bits(acc[u][4]) | (floatToBf16Bits(acc[u][5]) << 16);
    result[u].w = floatToBf16Bits(acc[u][6]) | (floatToBf16Bits(acc[u][7]) << 16);
  }
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

template <bool kNet>
__global__ void __launch_bounds__(kLlCombineThreads, 1) llCombineSendKernel(LlCombineArgs a) {
  const WindowView& w = a.w;
  const int R = w.peers.nRanks, me = w.peers.rank, M = a.maxTokens, K = a.topK;
  __shared__ char* peer[kMaxRanks];
  __shared__ int tokenStart[kMaxRanks + 1];  // prefix of the sources' token counts
  // Ranks that get nothing: a.failed (a rank found failed by this operation's own dispatch is
  // not in it: that operation's outputs are undefined anyway).
  if (threadIdx.x < R) peer[threadIdx.x] = peerWindow(w, threadIdx.x, a.slotOff);
  __syncthreads();
  const char* slot = peer[me];
  if (threadIdx.x == 0) {
    // The completed dispatch of this slot left (epoch << 32) | T_s in each source's signal.
    const volatile uint64_t* sig = (const volatile uint64_t*)(slot + a.slot.dispatchSignals);
    int run = 0;
    for (int s = 0; s < R; ++s) {
      tokenStart[s] = run;
      if ((!kNet || peer[s] != nullptr) && !a.failed.has(s)) run += (int)(sig[s] & 0xffffffffu);  // remote: GIN
    }
    tokenStart[R] = run;
  }
  __syncthreads();
  const LlRouteEntry* route = (const LlRouteEntry*)(slot + a.slot.route);
  const int rowVecs = a.hidden / 8, chunks = (rowVecs + kLlSumVecs - 1) / kLlSumVecs;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  // Item it = (flat token, chunk); its route entry (this lane's k) is loaded one item ahead so
  // that the entry's latency overlaps the previous item's row loads.
  const int items = tokenStart[R] * chunks, stride = gridDim.x * kLlCombineWarps;
  auto entryOf = [&](int it) {
    if (it >= items || lane >= K) return make_int2(-1, 0);
    int s, t;
    sourceTokenOf(tokenStart, it / chunks, &s, &t);
    // Written by source s during the dispatch: read past L1.
    return loadPeerInt2((const int2*)(route + ((size_t)s * M + t) * K + lane));
  };
  int it = blockIdx.x * kLlCombineWarps + warp;
  int2 entry = entryOf(it);
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
  if constexpr (kNet) {
    __shared__ int netStart[kMaxRanks + 1];  // prefix of the remote sources' records
    recordStartsGin(a, netStart);
    sendPartialsGin<kLlReduceUnroll>(a, netStart, kLlSumVecs, warp, kLlCombineWarps, lane,
                                     [&](unsigned here, int row, float weight, int base, uint4 (&out)[kLlReduceUnroll]) {
                                       const uint4* myRow = (const uint4*)(a.expertOut + (size_t)max(row, 0) * a.hidden);
                                       sumRowsChunk<false>(here, myRow, weight, base, rowVecs, lane, out);
                                     });
  }
  __syncthreads();
  if (threadIdx.x == 0) __threadfence_system();
  __syncthreads();
  for (int r = threadIdx.x; r < R; r += blockDim.x) {
    if ((kNet && peer[r] == nullptr) || a.failed.has(r)) continue;  // remote: postCombineGin
    uint64_t* sig = (uint64_t*)(peer[r] + a.slot.combineSignals) + me;
    const uint64_t share = llCombineSignalShare(blockIdx.x, gridDim.x, a.signalTotal);
    asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(sig), "l"(share) : "memory");
  }
  // The completion (later in stream order) waits for signalTotal * sends: one CTA counts the send.
  if (blockIdx.x == 0 && threadIdx.x == 0) w.state->llCombineSends[a.slotIndex] += 1;
  if constexpr (kNet) {
    if (lastCtaToArrive(&w.state->llCombineArrived[a.slotIndex])) postCombineGin(a);
  }
}

// kWide: more than 32 ranks (sumPartialsWide); otherwise one lane per rank.
template <bool kWide, bool kNet>
__global__ void __launch_bounds__(kLlCombineThreads, 1) llCombineCompleteKernel(LlCombineArgs a) {
  const WindowView& w = a.w;
  const int R = w.peers.nRanks;
  const char* slot = (const char*)ncclGetLocalPointer(w.win, a.slotOff);
  const uint64_t epoch = *(volatile unsigned long long*)&w.state->llCombineSends[a.slotIndex];
  const uint64_t* sig = (const uint64_t*)(slot + a.slot.combineSignals);
  // lost[r]: r's partials count as zero (in a.failed, or this launch timed out on it); written by
  // the one thread that handles r.
  __shared__ unsigned char lost[kMaxRanks];
  bool ok = true;
  if constexpr (kNet) ok = waitRanksGin(a, epoch, lost);
  for (int r = threadIdx.x; r < R; r += blockDim.x) {
    if (kNet && w.peers.lsaIndex(r) == kPeerRemote) continue;  // waitRanksGin
    int outcome = kWaitPeerFailed;
    if (!a.failed.has(r))
      outcome = waitSeqLl<0>(w, sig + r, (uint64_t)a.signalTotal * epoch, kWaitLlCombine, r, nullptr,
                             (uint64_t)a.signalTotal);
    lost[r] = outcome == kWaitPeerFailed;
    ok &= outcome != kWaitFatal;
  }
  if (!__syncthreads_and(ok)) return;

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, rowVecs = a.hidden / 8;
  const int chunks = (rowVecs + kLlSumVecs - 1) / kLlSumVecs;
  unsigned int gone[kWide ? kRankMaskWords : 1];  // lost[] as rank-mask words, in every warp
#pragma unroll
  for (int g = 0; g < (kWide ? kRankMaskWords : 1); ++g)
    gone[g] = __ballot_sync(0xffffffffu, 32 * g + lane < R && lost[32 * g + lane]);
  const uint32_t* tokenRanks = (const uint32_t*)(slot + a.slot.tokenRanks);  // [M][rankMaskWords(R)]
  const uint16_t* recv = (const uint16_t*)(slot + a.slot.combineRecv);  // [M][R][H]
  for (int it = blockIdx.x * kLlCombineWarps + warp; it < a.numTokens * chunks;
       it += gridDim.x * kLlCombineWarps) {
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
      const unsigned ranks = tokenRanks[t] & ~gone[0];  // written by this rank's dispatch send
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

cudaError_t launchLlCombineSend(const LlCombineArgs& args, int numCtas, cudaStream_t stream) {
  if (args.net.enabled)
    llCombineSendKernel<true><<<numCtas, kLlCombineThreads, 0, stream>>>(args);
  else
    llCombineSendKernel<false><<<numCtas, kLlCombineThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t launchLlCombineComplete(const LlCombineArgs& args, int maxCtas, cudaStream_t stream) {
  const bool wide = args.w.peers.nRanks > 32;
  // One warp per (token, chunk) item of this rank's tokens: a decode step of 1 token needs 1 CTA.
  const int items = args.numTokens * ((args.hidden / 8 + kLlSumVecs - 1) / kLlSumVecs);
  const int numCtas = std::max(1, std::min(maxCtas, (items + kLlCombineWarps - 1) / kLlCombineWarps));
  if (args.net.enabled && wide)
    llCombineCompleteKernel<true, true><<<numCtas, kLlCombineThreads, 0, stream>>>(args);
  else if (args.net.enabled)
    llCombineCompleteKernel<false, true><<<numCtas, kLlCombineThreads, 0, stream>>>(args);
  else if (wide)
    llCombineCompleteKernel<true, false><<<numCtas, kLlCombineThreads, 0, stream>>>(args);
  else
    llCombineCompleteKernel<false, false><<<numCtas, kLlCombineThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t loadLlCombineNetKernels() {
  cudaFuncAttributes attr;
  cudaError_t err = cudaFuncGetAttributes(&attr, llCombineSendKernel<true>);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, llCombineCompleteKernel<false, true>);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, llCombineCompleteKernel<true, true>);
  return err;
}

}  // namespace nccl_moe
