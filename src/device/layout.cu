// Layout kernel: routing statistics of one dispatch and each token's row among the tokens sent
// to each rank (token order is preserved per destination). One CTA, tiles of blockDim tokens.
#include "config.h"
#include "device/kernel_args.h"
#include "device/peer_sync.cuh"

namespace nccl_moe {

constexpr int kLayoutThreads = 1024;

__global__ void __launch_bounds__(kLayoutThreads, 1) layoutKernel(LayoutArgs a) {
  extern __shared__ int smem[];
  const int R = a.nRanks, E = a.numExperts, K = a.topK, expertsPerRank = E / R;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, numWarps = blockDim.x / 32;
  int* sExpert = smem;                 // [E] tokens per expert
  int* sWarpCount = sExpert + E;       // [numWarps][R] tokens of each warp going to each rank
  int* sBase = sWarpCount + numWarps * R;  // [R] tokens of earlier tiles going to each rank
  int16_t* sIds = (int16_t*)(sBase + R);   // [blockDim][K] this tile's expert ids, -1 = none
  for (int i = threadIdx.x; i < E; i += blockDim.x) sExpert[i] = 0;
  for (int i = threadIdx.x; i < R; i += blockDim.x) sBase[i] = 0;
  __syncthreads();

  const unsigned laneBelow = (1u << lane) - 1;
  for (int tile = 0; tile < a.numTokens; tile += blockDim.x) {
    // Stage the tile's ids with coalesced loads (thread i takes entry i of the [tokens][K] block):
    // one token per thread would read with a stride of K*8 bytes, which bounds the kernel on L1.
    const int entries = min((int)blockDim.x, a.numTokens - tile) * K;
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
    unsigned mask = 0;  // bit r: token t has an expert on rank r
    if (t < a.numTokens) {
      for (int k = 0; k < K; ++k) {
        const int e = sIds[threadIdx.x * K + k];
        if (e >= 0) mask |= 1u << (e / expertsPerRank);
      }
    }
    for (int r = 0; r < R; ++r) {
      const unsigned b = __ballot_sync(0xffffffffu, (mask >> r) & 1u);
      if (lane == 0) sWarpCount[warp * R + r] = __popc(b);
    }
    __syncthreads();
    // Exclusive scan over warps, per rank, continuing from the earlier tiles.
    for (int r = threadIdx.x; r < R; r += blockDim.x) {
      int run = sBase[r];
      for (int w = 0; w < numWarps; ++w) {
        const int c = sWarpCount[w * R + r];
        sWarpCount[w * R + r] = run;
        run += c;
      }
      sBase[r] = run;
    }
    __syncthreads();
    for (int r = 0; r < R; ++r) {
      const bool in = (mask >> r) & 1u;
      const unsigned b = __ballot_sync(0xffffffffu, in);
      if (t < a.numTokens) {
        const int pos = in ? sWarpCount[warp * R + r] + __popc(b & laneBelow) : -1;
        if (a.sendPos) a.sendPos[(size_t)t * R + r] = pos;
        if (a.isTokenInRank) a.isTokenInRank[(size_t)t * R + r] = in ? 1 : 0;
      }
    }
    __syncthreads();
  }
  for (int i = threadIdx.x; i < R; i += blockDim.x) a.tokensPerRank[i] = sBase[i];
  for (int i = threadIdx.x; i < E; i += blockDim.x) a.tokensPerExpert[i] = sExpert[i];
}

cudaError_t launchLayout(const LayoutArgs& a, cudaStream_t stream) {
  const int numWarps = kLayoutThreads / 32;
  const size_t smem = sizeof(int) * ((size_t)a.numExperts + (size_t)numWarps * a.nRanks + a.nRanks) +
                      sizeof(int16_t) * kLayoutThreads * a.topK;
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(layoutKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
  }
  layoutKernel<<<1, kLayoutThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace nccl_moe
