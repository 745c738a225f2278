// Low-latency combine over LSA: send kernel (expert ranks push their outputs back) and
// completion kernel (the source reduces them).
//
// Send (numSms CTAs): warps share out the rows this rank received in the slot, (l, s, i) with
// i < recvCounts[l][s] (a prefix over the blocks maps a row number to its block), read each expert-output row (16-byte loads) and store it into source s's
// combineRecv[t][k] (t = srcToken, k = srcK of the row). Each CTA then release-adds 1 to
// combineSignals[me] at every rank; nothing waits for a peer.
// Complete (numSms CTAs): wait until every rank's signal reaches numCtas * epoch, then one warp
// per token sums its K rows in k order (weighted or not) in FP32 and writes BF16.
#include "config.h"
#include "device/kernel_args.h"
#include "device/peer_sync.cuh"
#include "device/vec_io.cuh"

namespace nccl_moe {

constexpr int kLlCombineThreads = 512;
constexpr int kLlCopyUnroll = 8;     // send: 16-byte vectors per lane in flight per row
constexpr int kLlReduceUnroll = 2;   // complete: vectors per lane per (t, k) row in flight
constexpr int kLlPairsInFlight = 8;  // complete: rows of a token loaded before any is summed

__global__ void __launch_bounds__(kLlCombineThreads, 1) llCombineSendKernel(LlCombineArgs a) {
  const WindowView& w = a.w;
  const int R = w.nRanks, me = w.rank, L = a.numExperts / R, M = a.maxTokens;
  __shared__ char* peer[kMaxRanks];
  if (threadIdx.x < R) peer[threadIdx.x] = (char*)ncclGetLsaPointer(w.win, 0, threadIdx.x) + a.slotOff;
  __syncthreads();
  const char* slot = peer[me];
  const int* counts = (const int*)(slot + a.slot.recvCounts);
  const int* srcToken = (const int*)(slot + a.slot.srcToken);
  const int* srcK = (const int*)(slot + a.slot.srcK);
  const int rowVecs = a.hidden / 8;
  const size_t rowBytes = (size_t)a.hidden * 2;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warpsPerCta = blockDim.x / 32;
  // Row prefix over the (l, s) blocks, so that warps share out the rows actually received.
  extern __shared__ int blockStart[];  // [L*R + 1]
  const int numBlocks = L * R;
  if (warp == 0) {
    const int per = (numBlocks + 31) / 32, lo = min(lane * per, numBlocks), hi = min(lo + per, numBlocks);
    int sum = 0;
    for (int b = lo; b < hi; ++b) sum += loadPeerInt(counts + b);
    int inclusive = sum;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, inclusive, off);
      if (lane >= off) inclusive += v;
    }
    int run = inclusive - sum;
    for (int b = lo; b < hi; ++b) {
      blockStart[b] = run;
      run += loadPeerInt(counts + b);
    }
    if (lane == 31) blockStart[numBlocks] = inclusive;
  }
  __syncthreads();
  const int totalRows = blockStart[numBlocks];
  for (int j = blockIdx.x * warpsPerCta + warp; j < totalRows; j += gridDim.x * warpsPerCta) {
    int lo = 0, hi = numBlocks;  // the last block starting at or before j holds row j
    while (hi - lo > 1) {
      const int mid = (lo + hi) / 2;
      if (blockStart[mid] <= j) lo = mid; else hi = mid;
    }
    const int block = lo, i = j - blockStart[block], s = block % R;
    const size_t row = (size_t)block * M + i;  // == l*R*M + s*M + i
    // srcToken and srcK were written by the peers during the dispatch: read past L1.
    const int t = loadPeerInt(srcToken + row), k = loadPeerInt(srcK + row);
    const uint4* src = (const uint4*)(a.expertOut + row * a.hidden);
    uint4* dst = (uint4*)(peer[s] + a.slot.combineRecv + ((size_t)t * a.topK + k) * rowBytes);
    for (int base = 0; base < rowVecs; base += 32 * kLlCopyUnroll) {
      uint4 v[kLlCopyUnroll];
#pragma unroll
      for (int u = 0; u < kLlCopyUnroll; ++u) {
        const int idx = base + u * 32 + lane;
        if (idx < rowVecs) v[u] = loadStreaming(src + idx);
      }
#pragma unroll
      for (int u = 0; u < kLlCopyUnroll; ++u) {
        const int idx = base + u * 32 + lane;
        if (idx < rowVecs) storeNoAllocate(dst + idx, v[u]);
      }
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) __threadfence_system();
  __syncthreads();
  for (int r = threadIdx.x; r < R; r += blockDim.x) {
    uint64_t* sig = (uint64_t*)(peer[r] + a.slot.combineSignals) + me;
    asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(sig), "l"((uint64_t)1) : "memory");
  }
  if (lastCtaToArrive(&w.state->llCombineArrived[a.slotIndex]) && threadIdx.x == 0)
    w.state->llCombineSends[a.slotIndex] += 1;
}

__global__ void __launch_bounds__(kLlCombineThreads, 1) llCombineCompleteKernel(LlCombineArgs a) {
  const WindowView& w = a.w;
  const int R = w.nRanks;
  const char* slot = (const char*)ncclGetLocalPointer(w.win, a.slotOff);
  const uint64_t epoch = *(volatile unsigned long long*)&w.state->llCombineSends[a.slotIndex];
  const uint64_t* sig = (const uint64_t*)(slot + a.slot.combineSignals);
  bool ok = true;
  for (int r = threadIdx.x; r < R; r += blockDim.x)
    ok &= waitAtLeast(w, sig + r, (uint64_t)gridDim.x * epoch, kWaitLlCombine, r);
  if (!__syncthreads_and(ok)) return;

  // Work items are (token, chunk of 32 * kLlReduceUnroll vectors): several warps per token. The
  // rows of up to kLlPairsInFlight pairs are loaded before any is summed (latency bound).
  const int lane = threadIdx.x % 32, warpsPerCta = blockDim.x / 32, rowVecs = a.hidden / 8;
  const int chunkVecs = 32 * kLlReduceUnroll, chunks = (rowVecs + chunkVecs - 1) / chunkVecs;
  const uint4* recv = (const uint4*)(slot + a.slot.combineRecv);
  for (int it = blockIdx.x * warpsPerCta + threadIdx.x / 32; it < a.numTokens * chunks;
       it += gridDim.x * warpsPerCta) {
    const int t = it / chunks, base = (it % chunks) * chunkVecs;
    // Lane k < K: is (t, k) a valid pair, and its weight.
    bool valid = false;
    float weight = 1.0f;
    if (lane < a.topK) {
      const int64_t e = a.topkIdx[(size_t)t * a.topK + lane];
      valid = e >= 0 && e < a.numExperts;
      if (a.topkWeights) weight = a.topkWeights[(size_t)t * a.topK + lane];
    }
    float acc[kLlReduceUnroll][8];
#pragma unroll
    for (int u = 0; u < kLlReduceUnroll; ++u)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[u][j] = 0.0f;
    for (unsigned m = __ballot_sync(0xffffffffu, valid); m != 0;) {  // k in increasing order
      uint4 v[kLlPairsInFlight][kLlReduceUnroll];
      float wk[kLlPairsInFlight];
      int n = 0;
#pragma unroll
      for (int q = 0; q < kLlPairsInFlight; ++q) {
        if (m == 0) break;
        const int k = __ffs(m) - 1;
        m &= m - 1;
        wk[q] = __shfl_sync(0xffffffffu, weight, k);
        const uint4* src = recv + ((size_t)t * a.topK + k) * rowVecs;
#pragma unroll
        for (int u = 0; u < kLlReduceUnroll; ++u) {
          const int idx = base + u * 32 + lane;
          v[q][u] = idx < rowVecs ? loadPeer(src + idx) : make_uint4(0, 0, 0, 0);
        }
        n = q + 1;
      }
#pragma unroll
      for (int q = 0; q < kLlPairsInFlight; ++q) {
        if (q >= n) break;
#pragma unroll
        for (int u = 0; u < kLlReduceUnroll; ++u) {
          const uint32_t words[4] = {v[q][u].x, v[q][u].y, v[q][u].z, v[q][u].w};
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            acc[u][2 * j] = __fadd_rn(acc[u][2 * j], __fmul_rn(wk[q], bf16BitsToFloat(words[j] & 0xffffu)));
            acc[u][2 * j + 1] = __fadd_rn(acc[u][2 * j + 1], __fmul_rn(wk[q], bf16BitsToFloat(words[j] >> 16)));
          }
        }
      }
    }
    uint4* dst = (uint4*)(a.out + (size_t)t * a.hidden);
#pragma unroll
    for (int u = 0; u < kLlReduceUnroll; ++u) {
      const int idx = base + u * 32 + lane;
      if (idx >= rowVecs) continue;
      uint4 o;
      o.x = floatToBf16Bits(acc[u][0]) | (floatToBf16Bits(acc[u][1]) << 16);
      o.y = floatToBf16Bits(acc[u][2]) | (floatToBf16Bits(acc[u][3]) << 16);
      o.z = floatToBf16Bits(acc[u][4]) | (floatToBf16Bits(acc[u][5]) << 16);
      o.w = floatToBf16Bits(acc[u][6]) | (floatToBf16Bits(acc[u][7]) << 16);
      dst[idx] = o;
    }
  }
}

cudaError_t launchLlCombineSend(const LlCombineArgs& args, int numCtas, cudaStream_t stream) {
  const size_t smem = sizeof(int) * ((size_t)args.numExperts + 1);  // L*R + 1 block starts
  llCombineSendKernel<<<numCtas, kLlCombineThreads, smem, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t launchLlCombineComplete(const LlCombineArgs& args, int numCtas, cudaStream_t stream) {
  llCombineCompleteKernel<<<numCtas, kLlCombineThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace nccl_moe
