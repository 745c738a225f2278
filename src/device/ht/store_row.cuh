// One token row stored into its output rows on several ranks of this node, as the
// high-throughput dispatch delivers it (intranode: from the source's x; internode: from a landed
// record, by the forwarding rank). Device code; included by src/device/ht/dispatch_*.cu.
#pragma once
#include "device/kernel_args.h"
#include "device/common/vec_io.cuh"

namespace nccl_moe {

constexpr int kDispatchUnroll = 8;  // 16-byte vectors in flight per lane

// One warp. Stores the token into row `rowIndex` (lane d: the row on world rank d) of every rank
// d of destMask (bit d; each an LSA peer, peer[d] its window): the row (a.rowBytes from src,
// 16-byte vectors), the FP8 scales (a.scaleCols FP32 from scalesIn; none when 0), the top-k ids
// rewritten to d's local expert ids (-1 for experts elsewhere) and, when withWeights, the weights
// (0 for experts elsewhere). Lane k < a.topK holds entry k: global expert id e (-1: none) and its
// weight. kStreaming: src is read with non-coherent streaming loads (the caller's input, written
// before the kernel); otherwise with plain loads (window memory that a peer or NIC wrote).
template <bool kStreaming>
__device__ __forceinline__ void storeRowToRanks(const DispatchArgs& a, char* const* peer, const uint4* src,
                                                const float* scalesIn, int64_t e, float weight, bool withWeights,
                                                unsigned destMask, int rowIndex, int lane) {
  const int rowVecs = a.rowBytes / 16;
  for (int base = 0; base < rowVecs; base += 32 * kDispatchUnroll) {
    uint4 v[kDispatchUnroll];
#pragma unroll
    for (int u = 0; u < kDispatchUnroll; ++u) {
      const int idx = base + u * 32 + lane;
      if (idx < rowVecs) v[u] = kStreaming ? loadStreaming(src + idx) : loadPeer(src + idx);
    }
    for (unsigned m = destMask; m != 0; m &= m - 1) {
      const int d = __ffs(m) - 1;
      const int row = __shfl_sync(0xffffffffu, rowIndex, d);
      uint4* dst = (uint4*)(peer[d] + a.recvXOff + (size_t)row * a.rowBytes);
#pragma unroll
      for (int u = 0; u < kDispatchUnroll; ++u) {
        const int idx = base + u * 32 + lane;
        if (idx < rowVecs) storeNoAllocate(dst + idx, v[u]);
      }
    }
  }
  // Scales, expert ids and weights: small rows. NVLink carries every store as its own
  // transaction, so they go as 16-byte vectors wherever the row sizes allow (the window regions
  // are 256-byte aligned): four scales, two ids or four weights per store.
  const int expertsPerRank = a.numExperts / a.w.peers.nRanks, K = a.topK;
  const bool vecScales = a.scaleCols % 4 == 0 && (uintptr_t)scalesIn % 16 == 0;
  for (unsigned m = destMask; m != 0; m &= m - 1) {
    const int d = __ffs(m) - 1;
    const int row = __shfl_sync(0xffffffffu, rowIndex, d);
    if (a.scaleCols > 0) {
      float* dst = (float*)(peer[d] + a.recvScalesOff) + (size_t)row * a.scaleCols;
      if (vecScales) {
        for (int j = lane; j < a.scaleCols / 4; j += 32) ((float4*)dst)[j] = ((const float4*)scalesIn)[j];
      } else {
        for (int j = lane; j < a.scaleCols; j += 32) dst[j] = scalesIn[j];
      }
    }
    const bool local = e >= 0 && (int)e / expertsPerRank == d;  // ids < E: 32-bit division
    const long long id = local ? e - (long long)d * expertsPerRank : -1;
    const float wt = local ? weight : 0.0f;
    const long long id1 = __shfl_down_sync(0xffffffffu, id, 1);
    const float wt1 = __shfl_down_sync(0xffffffffu, wt, 1), wt2 = __shfl_down_sync(0xffffffffu, wt, 2),
                wt3 = __shfl_down_sync(0xffffffffu, wt, 3);
    long long* ids = (long long*)(peer[d] + a.recvTopkIdxOff) + (size_t)row * K;
    if (K % 2 == 0) {
      if (lane < K && lane % 2 == 0) *(longlong2*)(ids + lane) = make_longlong2(id, id1);
    } else if (lane < K) {
      ids[lane] = id;
    }
    if (withWeights) {
      float* wts = (float*)(peer[d] + a.recvTopkWeightsOff) + (size_t)row * K;
      if (K % 4 == 0) {
        if (lane < K && lane % 4 == 0) *(float4*)(wts + lane) = make_float4(wt, wt1, wt2, wt3);
      } else if (lane < K) {
        wts[lane] = wt;
      }
    }
  }
}

// One warp: this rank's token t (a.x, a.xScales, its top-k entries and, when the dispatch has
// them, weights) into row rowIndex (lane d) of every rank d of destMask.
__device__ __forceinline__ void storeSourceToken(const DispatchArgs& a, char* const* peer, int t, unsigned destMask,
                                                 int rowIndex, int lane) {
  const int K = a.topK;
  const uint4* src = (const uint4*)((const char*)a.x + (size_t)t * a.rowBytes);
  const int64_t e = lane < K ? a.routing.topkIdx[(size_t)t * K + lane] : -1;
  const float weight = (a.topkWeights && lane < K) ? a.topkWeights[(size_t)t * K + lane] : 0.0f;
  storeRowToRanks<true>(a, peer, src, a.xScales + (size_t)t * a.scaleCols, e, weight, a.topkWeights != nullptr,
                        destMask, rowIndex, lane);
}

}  // namespace nccl_moe
