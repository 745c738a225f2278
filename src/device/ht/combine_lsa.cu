// High-throughput intranode combine over LSA: the source rank pulls.
//
// One launch of numSms persistent CTAs:
//  1. ready: CTA 0 writes the window offset of this rank's expert outputs (a.inOff) into every
//     peer's kSigCombineSource word, then release-signals kSigCombineReady (the outputs, written
//     by earlier work on the stream, may be read); every CTA waits for all peers and reads each
//     peer's rows at the offset that peer published, so ranks may pick their regions freely.
//     After a dispatch that delivered nothing (the routing's dispatchEmpty flag) no row is read
//     and every token comes out as zeros.
//  2. reduce: warps take this rank's tokens round-robin; for token t a warp reads t's expert
//     output row from every rank that received t (peer window, 16-byte loads, rank order),
//     scales it by w(t, r) when weighted, accumulates in FP32 registers and writes the BF16 sum
//     to out[t] in local memory. A fixed order per token makes the result bitwise deterministic.
//     The pull is bound by load latency, not by NVLink: a warp waits one remote round trip per
//     block of loads, so the bytes each block has in flight set the speed. With two ranks (EP2)
//     the kernel is built for tokens on at most two ranks: 8 vectors per lane from each rank
//     (8 KiB per warp) per round trip, and the next token's routing loads overlap the first
//     round trip (a separate instantiation: sharing registers with the general path spills).
//     With more ranks a block is kRanksInFlight ranks x kCombineUnroll vectors.
//     The variant with top-k values (kTopkValues, ncclMoeCombineWithWeights only) then sums the
//     [K] FP32 values of t's rows in the same rank order (lane k, column k) into outTopkWeights.
//  3. done: each CTA release-adds kSigCombineDone at every peer; the last CTA waits for all
//     peers, so no rank reuses its expert-output rows while another still reads them.
// The row of token t on rank r is routing.sendOffset[r] + routing.sendPos[t][r] (from dispatch).
#include "device/kernel_args.h"
#include "device/common/peer_sync.cuh"
#include "device/common/vec_io.cuh"
#include "device/ht/combine_sync.cuh"

namespace nccl_moe {

constexpr int kCombineThreads = 512;
constexpr int kCombineUnroll = 4;   // 16-byte vectors (8 BF16) per lane per rank in flight
constexpr int kRanksInFlight = 4;   // ranks whose rows are loaded before any is summed
constexpr int kPairUnroll = 8;      // the same for a token on at most two ranks (both in flight)

// Where token t's rows are: srcMask (bit r: rank r holds one), and for lane r its row on rank r
// (sendOffset[r] + sendPos[t][r]) and weight w(t, r). One warp; t is warp-uniform. After a
// dispatch that delivered nothing (empty) no rank holds a row.
struct TokenRows {
  unsigned srcMask;
  int rowIndex;
  float weight;
};

__device__ __forceinline__ TokenRows locateToken(const CombineArgs& a, const int* sendOffset, int t, bool empty,
                                                 int lane) {
  const int R = a.w.peers.nRanks;
  const int pos = lane < R && !empty ? a.routing.sendPos[(size_t)t * R + lane] : -1;
  TokenRows tr;
  tr.weight = combineWeightWarp(a, t, lane);
  tr.srcMask = __ballot_sync(0xffffffffu, pos >= 0);
  tr.rowIndex = pos >= 0 ? sendOffset[lane] + pos : 0;
  return tr;
}

// Reduces token t. srcMask: ranks holding a row of t; rowIndex/weight (lane r): t's row on rank
// r and its weight w(t, r); rows[r]: rank r's expert outputs [rows][H] (its window, LSA). Loads of up to kRanksInFlight ranks are issued before any is summed
// (latency of remote loads is what bounds the pull), then summed in rank order.
__device__ __forceinline__ void reduceToken(const CombineArgs& a, const char* const* rows, int t,
                                            unsigned srcMask, int rowIndex, float weight, int lane) {
  const int rowVecs = a.hidden / 8;
  const size_t rowBytes = (size_t)a.hidden * 2;
  uint4* dst = (uint4*)(a.out + (size_t)t * a.hidden);
  for (int base = 0; base < rowVecs; base += 32 * kCombineUnroll) {
    float acc[kCombineUnroll][8];
#pragma unroll
    for (int u = 0; u < kCombineUnroll; ++u)
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[u][i] = 0.0f;
    for (unsigned m = srcMask; m != 0;) {  // m is warp-uniform
      uint4 v[kRanksInFlight][kCombineUnroll];
      float scale[kRanksInFlight];
      int count = 0;
#pragma unroll
      for (int q = 0; q < kRanksInFlight; ++q) {
        if (m == 0) break;
        const int r = __ffs(m) - 1;
        m &= m - 1;
        const int row = __shfl_sync(0xffffffffu, rowIndex, r);
        scale[q] = __shfl_sync(0xffffffffu, weight, r);
        const uint4* src = (const uint4*)(rows[r] + (size_t)row * rowBytes);
#pragma unroll
        for (int u = 0; u < kCombineUnroll; ++u) {
          const int idx = base + u * 32 + lane;
          v[q][u] = idx < rowVecs ? loadPeer(src + idx) : make_uint4(0, 0, 0, 0);
        }
        count = q + 1;
      }
#pragma unroll
      for (int q = 0; q < kRanksInFlight; ++q)
        if (q < count)
#pragma unroll
          for (int u = 0; u < kCombineUnroll; ++u) accumulateBf16x8(acc[u], v[q][u], scale[q]);
    }
#pragma unroll
    for (int u = 0; u < kCombineUnroll; ++u) {
      const int idx = base + u * 32 + lane;
      if (idx < rowVecs) dst[idx] = packBf16x8(acc[u]);
    }
  }
}

// Reduces token t held by at most two ranks (tr.srcMask has 0, 1 or 2 bits): both ranks' vectors
// of a block are loaded before either is summed, the sum is the same rank-ordered sequence of
// operations as reduceToken's (bitwise equal; no rank: zeros). prefetch() runs once, after the
// first block's loads are issued, so that its own loads (the next token's routing) wait alongside
// them.
template <typename Prefetch>
__device__ __forceinline__ void reduceTokenPair(const CombineArgs& a, const char* const* rows, int t,
                                                const TokenRows& tr, int lane, Prefetch&& prefetch) {
  const int rowVecs = a.hidden / 8;
  const size_t rowBytes = (size_t)a.hidden * 2;
  const bool any = tr.srcMask != 0;
  const int r0 = any ? __ffs(tr.srcMask) - 1 : 0;
  const unsigned rest = tr.srcMask & (tr.srcMask - 1);
  const int r1 = rest != 0 ? __ffs(rest) - 1 : r0;  // r1 == r0: one rank
  const int row0 = __shfl_sync(0xffffffffu, tr.rowIndex, r0), row1 = __shfl_sync(0xffffffffu, tr.rowIndex, r1);
  const float scale0 = __shfl_sync(0xffffffffu, tr.weight, r0), scale1 = __shfl_sync(0xffffffffu, tr.weight, r1);
  const uint4* src0 = (const uint4*)(rows[r0] + (size_t)row0 * rowBytes);
  const uint4* src1 = (const uint4*)(rows[r1] + (size_t)row1 * rowBytes);
  uint4* dst = (uint4*)(a.out + (size_t)t * a.hidden);
  for (int base = 0; base < rowVecs; base += 32 * kPairUnroll) {
    uint4 v0[kPairUnroll], v1[kPairUnroll];
#pragma unroll
    for (int u = 0; u < kPairUnroll; ++u) {
      const int idx = base + u * 32 + lane;
      v0[u] = any && idx < rowVecs ? loadPeer(src0 + idx) : make_uint4(0, 0, 0, 0);
    }
    if (r1 != r0) {
#pragma unroll
      for (int u = 0; u < kPairUnroll; ++u) {
        const int idx = base + u * 32 + lane;
        v1[u] = idx < rowVecs ? loadPeer(src1 + idx) : make_uint4(0, 0, 0, 0);
      }
    }
    if (base == 0) prefetch();
#pragma unroll
    for (int u = 0; u < kPairUnroll; ++u) {
      float acc[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
      if (any) accumulateBf16x8(acc, v0[u], scale0);
      if (r1 != r0) accumulateBf16x8(acc, v1[u], scale1);
      const int idx = base + u * 32 + lane;
      if (idx < rowVecs) dst[idx] = packBf16x8(acc);
    }
  }
}

// kPairs: every token is on at most two ranks (nRanks <= 2).
template <bool kTopkValues, bool kPairs>
__global__ void __launch_bounds__(kCombineThreads, 1) combineHtIntranodeKernel(CombineArgs a) {
  const WindowView& w = a.w;
  const int R = w.peers.nRanks;
  __shared__ char* peer[kMaxHtRanks];
  __shared__ const char* rows[kMaxHtRanks];  // peer r's expert outputs, at the offset it published
  __shared__ int sendOffset[kMaxHtRanks];
  const uint64_t seq = *(volatile unsigned long long*)&w.state->combineSeq + 1;
  const bool empty = *(volatile int*)a.routing.dispatchEmpty != 0;
  if (threadIdx.x < R) {
    peer[threadIdx.x] = peerWindow(w, threadIdx.x, 0);
    sendOffset[threadIdx.x] = a.routing.sendOffset[threadIdx.x];
  }
  __syncthreads();
  const bool ready = publishSourceAndAwaitPeers(w, a.inOff, seq, peer, rows);

  if (ready) {
    const int lane = threadIdx.x % 32, warpsPerCta = blockDim.x / 32;
    const int totalWarps = gridDim.x * warpsPerCta;
    int t = blockIdx.x * warpsPerCta + threadIdx.x / 32;
    TokenRows cur{};
    if (t < a.numTokens) cur = locateToken(a, sendOffset, t, empty, lane);
    for (; t < a.numTokens; t += totalWarps) {
      const int next = t + totalWarps;  // warp-uniform
      TokenRows nextRows = cur;
      auto prefetch = [&] {
        if (next < a.numTokens) nextRows = locateToken(a, sendOffset, next, empty, lane);
      };
      if constexpr (kPairs) {
        reduceTokenPair(a, rows, t, cur, lane, prefetch);
      } else {
        reduceToken(a, rows, t, cur.srcMask, cur.rowIndex, cur.weight, lane);
        prefetch();
      }
      if constexpr (kTopkValues) {  // outTopkWeights[t][k]: rank-ordered sum of the rows' values
        const float sum = sumRankValues(a, peer, cur.srcMask, cur.rowIndex, lane);
        if (lane < a.topK) a.outTopkWeights[(size_t)t * a.topK + lane] = sum;
      }
      cur = nextRows;
    }
  }
  finishAndWaitPeers(w, kSigCombineDone, seq, &w.state->combineArrived, &w.state->combineSeq);
}

cudaError_t launchCombineHtIntranode(const CombineArgs& args, int numCtas, cudaStream_t stream) {
  const bool values = args.outTopkWeights != nullptr, pairs = args.w.peers.nRanks <= 2;
  if (values && pairs)
    combineHtIntranodeKernel<true, true><<<numCtas, kCombineThreads, 0, stream>>>(args);
  else if (values)
    combineHtIntranodeKernel<true, false><<<numCtas, kCombineThreads, 0, stream>>>(args);
  else if (pairs)
    combineHtIntranodeKernel<false, true><<<numCtas, kCombineThreads, 0, stream>>>(args);
  else
    combineHtIntranodeKernel<false, false><<<numCtas, kCombineThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

// Copies the caller's expert outputs into the window when they live elsewhere (*numRows is 0
// after a dispatch that delivered nothing).
__global__ void copyRowsKernel(uint4* dst, const uint4* src, const int* numRows, int rowVecs) {
  const size_t total = (size_t)(*numRows) * rowVecs;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x)
    dst[i] = loadStreaming(src + i);
}

cudaError_t launchCopyRows(void* dst, const void* src, const int* numRows, int rowBytes, int numCtas,
                           cudaStream_t stream) {
  copyRowsKernel<<<numCtas, 512, 0, stream>>>((uint4*)dst, (const uint4*)src, numRows, rowBytes / 16);
  return cudaGetLastError();
}

// The caller's per-row top-k values into the window (ncclMoeCombineWithWeights), 4-byte words.
__global__ void copyTopkRowsKernel(float* dst, const float* src, const int* numRows, int topK) {
  const size_t total = (size_t)(*numRows) * topK;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x)
    dst[i] = src[i];
}

cudaError_t loadCopyRowsKernels() {
  cudaFuncAttributes attr;
  cudaError_t e = cudaFuncGetAttributes(&attr, copyRowsKernel);
  return e == cudaSuccess ? cudaFuncGetAttributes(&attr, copyTopkRowsKernel) : e;
}

cudaError_t launchCopyTopkRows(float* dst, const float* src, const int* numRows, int topK, int numCtas,
                               cudaStream_t stream) {
  copyTopkRowsKernel<<<numCtas, 512, 0, stream>>>(dst, src, numRows, topK);
  return cudaGetLastError();
}

}  // namespace nccl_moe
