// Layout kernel: routing statistics of one dispatch and each token's row among the tokens sent
// to each rank (token order is preserved per destination); for the internode path also each
// token's slot among the tokens sent to each node and the inverse lists.
//
// Destinations: the R ranks, then the N nodes (node n = ranks n*G .. n*G+G-1). A token goes to a
// node when it has an expert on any rank of that node, once however many (the per-node dedup of
// the internode path); per-node counts are columns R..R+N-1 of the same ballots, scans and
// look-back as the per-rank ones, from the same single read of topkIdx.
//
// One CTA per tile of kLayoutTileTokens tokens, one token per thread. A CTA claims its tile with
// a ticket (so that every lower tile belongs to a CTA that is already running), counts its
// tokens per destination and its entries per expert, publishes the per-destination counts with a
// flag holding this launch's epoch, and looks back: one thread per (lower tile, destination)
// waits for that tile's flag and adds its count, which gives the tile's base row per
// destination. The highest tile, which has then seen every other tile publish, writes
// tokensPerRank / tokensPerNode / tokensPerExpert, re-arms the ticket and advances the epoch
// (every other CTA read it before publishing).
#include "device/kernel_args.h"
#include "device/common/peer_sync.cuh"

namespace nccl_moe {

constexpr int kLayoutWarps = kLayoutTileTokens / 32;

static size_t layoutTiles(int maxTokens) {
  return (size_t)(maxTokens + kLayoutTileTokens - 1) / kLayoutTileTokens;
}

// Per tile: a flag, R + N <= 2R destination counts, E expert counts.
size_t LayoutScratch::bytes(int maxTokens, int nRanks, int numExperts) {
  return layoutTiles(maxTokens) * (sizeof(int) * (2 * (size_t)nRanks + numExperts) + sizeof(unsigned long long));
}

LayoutScratch LayoutScratch::carve(void* mem, int maxTokens, int nRanks, int numExperts) {
  const size_t tiles = layoutTiles(maxTokens);
  LayoutScratch s;
  s.tileFlags = (unsigned long long*)mem;  // the 8-byte words first
  s.tileTokens = (int*)(s.tileFlags + tiles);
  s.tileExperts = s.tileTokens + tiles * 2 * nRanks;
  return s;
}

__device__ __forceinline__ unsigned long long loadAcquireGpu(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__global__ void __launch_bounds__(kLayoutTileTokens) layoutKernel(LayoutArgs a) {
  extern __shared__ int smem[];
  const int R = a.nRanks, E = a.numExperts, K = a.topK, expertsPerRank = E / R;
  const int G = a.ranksPerNode, N = R / G, D = R + N;  // destinations: R ranks, then N nodes
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int* sExpert = smem;                      // [E] entries per expert in this tile
  int* sWarpCount = sExpert + E;            // [kLayoutWarps][D] tokens of each warp per destination
  int* sBase = sWarpCount + kLayoutWarps * D;  // [D] tokens of the lower tiles per destination
  int* sTotal = sBase + D;                  // [D] tokens of this tile per destination
  int16_t* sIds = (int16_t*)(sTotal + D);   // [kLayoutTileTokens][K] expert ids, -1 = none
  __shared__ int sTile;
  __shared__ unsigned long long sEpoch;
  if (threadIdx.x == 0) {
    sTile = (int)atomicAdd(&a.state->layoutTicket, 1u);
    sEpoch = *(volatile unsigned long long*)&a.state->layoutEpoch + 1;
  }
  for (int i = threadIdx.x; i < E; i += blockDim.x) sExpert[i] = 0;
  for (int i = threadIdx.x; i < D; i += blockDim.x) sBase[i] = 0;
  __syncthreads();
  const int tileIdx = sTile, tile = tileIdx * kLayoutTileTokens;
  const unsigned long long epoch = sEpoch;

  // Stage the tile's ids with coalesced loads (thread i takes entry i of the [tokens][K] block).
  const int entries = max(0, min(kLayoutTileTokens, a.numTokens - tile)) * K;
  const int64_t* src = a.topkIdx + (size_t)tile * K;
  for (int i = threadIdx.x; i < entries; i += blockDim.x) {
    const int64_t e = __ldg(src + i);
    const bool ok = e >= 0 && e < E;
    if (a.topkIdxCopy) a.topkIdxCopy[(size_t)tile * K + i] = ok ? e : -1;
    if (e < -1 || e >= E) reportError(a.error, kDevBadExpert, tile + i / K, i % K, (int)e);
    if (ok) atomicAdd(&sExpert[e], 1);
    sIds[i] = ok ? (int16_t)e : (int16_t)-1;
  }
  __syncthreads();
  const int t = tile + threadIdx.x;
  unsigned long long dest = 0;  // bit d: token t goes to rank d (d < R) or to node d - R
  if (t < a.numTokens) {
    for (int k = 0; k < K; ++k) {
      const int e = sIds[threadIdx.x * K + k];
      if (e < 0) continue;
      const int r = e / expertsPerRank;
      dest |= (1ull << r) | (1ull << (R + r / G));  // R + N <= 64 (R <= kMaxHtRanks)
    }
  }
  for (int d = 0; d < D; ++d) {
    const unsigned b = __ballot_sync(0xffffffffu, (dest >> d) & 1u);
    if (lane == 0) sWarpCount[warp * D + d] = __popc(b);
  }
  __syncthreads();
  // Exclusive scan over warps per destination; publish the tile's totals and expert counts.
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    int run = 0;
    for (int w = 0; w < kLayoutWarps; ++w) {
      const int c = sWarpCount[w * D + d];
      sWarpCount[w * D + d] = run;
      run += c;
    }
    sTotal[d] = run;
    a.scratch.tileTokens[(size_t)tileIdx * D + d] = run;
  }
  for (int e = threadIdx.x; e < E; e += blockDim.x) a.scratch.tileExperts[(size_t)tileIdx * E + e] = sExpert[e];
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    asm volatile("st.release.gpu.global.u64 [%0], %1;" ::"l"(a.scratch.tileFlags + tileIdx), "l"(epoch)
                 : "memory");
  }
  // Look back: thread (j, d) adds lower tile j's count for destination d once j has published.
  for (int i = threadIdx.x; i < tileIdx * D; i += blockDim.x) {
    const int j = i / D, d = i % D;
    while ((long long)(loadAcquireGpu(a.scratch.tileFlags + j) - epoch) < 0) {  // wrap-safe
    }
    atomicAdd(&sBase[d], __ldcg(a.scratch.tileTokens + (size_t)j * D + d));
  }
  __syncthreads();
  const unsigned laneBelow = (1u << lane) - 1;
  for (int r = 0; r < R; ++r) {
    const bool in = (dest >> r) & 1u;
    const unsigned b = __ballot_sync(0xffffffffu, in);
    if (t < a.numTokens) {
      const int pos = in ? sBase[r] + sWarpCount[warp * D + r] + __popc(b & laneBelow) : -1;
      if (a.sendPos) a.sendPos[(size_t)t * R + r] = pos;
      if (a.isTokenInRank) a.isTokenInRank[(size_t)t * R + r] = in ? 1 : 0;
    }
  }
  if (a.isTokenInNode && t < a.numTokens)
    for (int n = 0; n < N; ++n) a.isTokenInNode[(size_t)t * N + n] = (dest >> (R + n)) & 1u;
  if (a.nodeSlot) {  // the same ranking for the nodes: slots of the internode path's dense lists
    for (int n = 0; n < N; ++n) {
      const bool in = (dest >> (R + n)) & 1u;
      const unsigned b = __ballot_sync(0xffffffffu, in);
      if (t < a.numTokens) {
        const int slot = in ? sBase[R + n] + sWarpCount[warp * D + R + n] + __popc(b & laneBelow) : -1;
        a.nodeSlot[(size_t)t * N + n] = slot;
        if (in) a.nodeList[(size_t)n * a.maxTokens + slot] = t;
      }
    }
  }

  if (tileIdx != (int)gridDim.x - 1) return;
  // The highest tile: every lower tile has published (the look-back waited for all of them).
  for (int r = threadIdx.x; r < R; r += blockDim.x) a.tokensPerRank[r] = sBase[r] + sTotal[r];
  if (a.tokensPerNode)
    for (int n = threadIdx.x; n < N; n += blockDim.x) a.tokensPerNode[n] = sBase[R + n] + sTotal[R + n];
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int sum = sExpert[e];
    for (int j = 0; j < tileIdx; ++j) sum += __ldcg(a.scratch.tileExperts + (size_t)j * E + e);
    a.tokensPerExpert[e] = sum;
  }
  if (threadIdx.x == 0) {
    a.state->layoutTicket = 0;
    *(volatile unsigned long long*)&a.state->layoutEpoch = epoch;
  }
}

cudaError_t loadLayoutKernel() {
  cudaFuncAttributes attr;
  return cudaFuncGetAttributes(&attr, layoutKernel);
}

cudaError_t launchLayout(const LayoutArgs& a, cudaStream_t stream) {
  const size_t D = (size_t)a.nRanks + a.nRanks / a.ranksPerNode;  // ranks, then nodes
  const size_t smem = sizeof(int) * ((size_t)a.numExperts + kLayoutWarps * D + 2 * D) +
                      sizeof(int16_t) * kLayoutTileTokens * a.topK;
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(layoutKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
  }
  const int tiles = a.numTokens > 0 ? (a.numTokens + kLayoutTileTokens - 1) / kLayoutTileTokens : 1;
  layoutKernel<<<tiles, kLayoutTileTokens, smem, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace nccl_moe
