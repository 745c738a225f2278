// High-throughput intranode combine over LSA, remote rows pulled with Hopper bulk copies (opt-in:
// NCCL_MOE_HT_COMBINE=tma, read at ncclMoeCommCreate). Same protocol and same result as the
// pull kernel in combine_lsa.cu; only the way rows reach the SM differs.
//
// One launch of numSms persistent CTAs, each kTmaPipes pipelines of 1 producer warp and
// kTmaPipeWarps consumer warps; pipeline p has its own ring of kTmaPipeStages shared-memory
// stages of kTmaChunkBytes (a full row up to H 7168 BF16):
//  1. ready: exactly as combine_lsa.cu (CTA 0 publishes a.inOff in every peer's kSigCombineSource
//     word and release-signals kSigCombineReady; every CTA waits for all peers and reads each
//     peer's rows at the offset that peer published; after a dispatch that delivered nothing no
//     row is read and every token comes out as zeros).
//  2. reduce: the CTA owns tokens t = blockIdx.x + j * gridDim.x, pipeline p those with
//     j % kTmaPipes == p. A row (2H bytes) is split into nChunks balanced chunks of at most
//     kTmaChunkBytes; a (token, chunk) is a unit. For each unit, in increasing rank order, the
//     producer's lane 0 bulk-copies (cp.async.bulk global -> shared, completion counted in bytes
//     on the stage's `full` mbarrier) the chunk of every OTHER rank's row into the next stage of
//     the pipeline's ring; this rank's own row is not copied: the consumers load it from local
//     memory with 16-byte loads, one unit ahead. The consumers walk the same units and ranks:
//     FP32 accumulators from +0.0f, w(t, r) * x added rank by rank with separate multiply and add
//     (as the pull kernel and the CPU reference), BF16 rounding and a store to out[t] at the end.
//     So every element sees the same operations in the same order as in the pull kernel: the
//     outputs are bitwise identical. Tokens that no rank received come out as zeros.
//     Why this shape: the measured kernels paid about 0.4 us per bulk copy per SM whatever its
//     size, so the copies are as large as a row and only remote rows take one.
//  3. done: finishAndWaitPeers, as the pull kernel. Every bulk copy has landed (its stage was
//     consumed) before the CTA signals, so no peer rewrites a row that is still being read.
// ncclMoeCombineWithWeights (per-row top-k values) stays on the pull kernel.
#include "device/kernel_args.h"
#include "device/common/peer_sync.cuh"
#include "device/common/vec_io.cuh"
#include "device/ht/combine_sync.cuh"

namespace nccl_moe {

constexpr int kTmaPipes = 2;                               // pipelines per CTA
constexpr int kTmaPipeWarps = 4;                           // consumer warps per pipeline
constexpr int kTmaPipeThreads = 32 * kTmaPipeWarps;
constexpr int kTmaConsumerThreads = kTmaPipes * kTmaPipeThreads;
constexpr int kTmaThreads = kTmaConsumerThreads + 32 * kTmaPipes;  // producers are the last warps
constexpr int kTmaPipeStages = kTmaStages / kTmaPipes;  // ring p: stages [p * this, (p + 1) * this)
constexpr int kTmaChunkVecs = kTmaChunkBytes / 16;      // 16-byte vectors per stage at most
constexpr int kTmaVecsPerThread = (kTmaChunkVecs + kTmaPipeThreads - 1) / kTmaPipeThreads;
static_assert(kTmaStages % kTmaPipes == 0 && kTmaPipeStages >= 2, "two stages per ring at least");

// --- mbarrier and bulk-copy wrappers (PTX ISA 8.0, sm_90). Shared addresses are 32-bit. ------
__device__ __forceinline__ uint32_t smemAddr(const void* p) {
  return (uint32_t)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void mbarInit(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smemAddr(bar)), "r"(count) : "memory");
}

// One arrival (release, CTA scope) that also expects `bytes` more transaction bytes.
__device__ __forceinline__ void mbarArriveExpectTx(uint64_t* bar, uint32_t bytes) {
  asm volatile("{\n\t.reg .b64 st;\n\t"
               "mbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n\t}"
               ::"r"(smemAddr(bar)), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbarArrive(uint64_t* bar) {
  asm volatile("{\n\t.reg .b64 st;\n\t"
               "mbarrier.arrive.shared::cta.b64 st, [%0];\n\t}"
               ::"r"(smemAddr(bar)) : "memory");
}

// Waits (acquire, CTA scope) until the phase of parity `parity` has completed. A barrier in its
// first phase (0) counts the phase before it, of parity 1, as completed.
__device__ __forceinline__ void mbarWait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done)
    asm volatile("{\n\t.reg .pred p;\n\t"
                 "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
                 "selp.u32 %0, 1, 0, p;\n\t}"
                 : "=r"(done) : "r"(smemAddr(bar)), "r"(parity) : "memory");
}

// Bulk copy of `bytes` (multiple of 16, > 0) from global `src` (16-byte aligned; a peer's LSA
// mapping is an ordinary global address) to shared `dst` (16-byte aligned); completes `bytes`
// transaction bytes on `bar`.
__device__ __forceinline__ void bulkCopyToShared(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               ::"r"(smemAddr(dst)), "l"(src), "r"(bytes), "r"(smemAddr(bar)) : "memory");
}

// --- routing of one token, computed by every warp that needs it --------------------------------
// Lane r < R: row index of token t on rank r (0 when r did not receive it) and w(t, r), the sum
// of the weights of t's experts on rank r in k order from 0.0f (1.0f unweighted); srcMask: the
// ranks that received t (0 for t >= numTokens or after a dispatch that delivered nothing).
struct TokenPlan {
  unsigned srcMask;
  int rowIndex;
  float weight;
};

__device__ __forceinline__ TokenPlan planToken(const CombineArgs& a, const int* sendOffset, int t, int R,
                                               bool empty, int lane) {
  int pos = -1;
  if (t < a.numTokens && lane < R && !empty) pos = a.routing.sendPos[(size_t)t * R + lane];
  TokenPlan p;
  p.srcMask = __ballot_sync(0xffffffffu, pos >= 0);
  p.rowIndex = pos >= 0 ? sendOffset[lane] + pos : 0;
  p.weight = 1.0f;
  if (a.topkWeights && p.srcMask != 0) {
    const int expertsPerRank = a.numExperts / R;
    int64_t e = -1;
    float wk = 0.0f;
    if (lane < a.topK) {
      e = a.routing.topkIdx[(size_t)t * a.topK + lane];
      wk = a.topkWeights[(size_t)t * a.topK + lane];
    }
    p.weight = 0.0f;
    for (int k = 0; k < a.topK; ++k) {
      const int64_t ek = __shfl_sync(0xffffffffu, e, k);
      const float w = __shfl_sync(0xffffffffu, wk, k);
      if (ek >= 0 && (int)ek / expertsPerRank == lane) p.weight += w;
    }
  }
  return p;
}

// Position in one pipeline's ring, as its producer and consumers track it: the stage (an index
// into the CTA's stages) and the parity of its use.
struct Ring {
  int first;
  int stage;
  uint32_t parity;
  __device__ __forceinline__ explicit Ring(int pipe)
      : first(pipe * kTmaPipeStages), stage(pipe * kTmaPipeStages), parity(0) {}
  __device__ __forceinline__ void advance() {
    if (++stage == first + kTmaPipeStages) {
      stage = first;
      parity ^= 1u;
    }
  }
};

// The chunks of a row: nChunks balanced chunks of chunkVecs vectors (the last one shorter).
struct RowChunks {
  int rowVecs, nChunks, chunkVecs;
  __device__ __forceinline__ explicit RowChunks(int hidden) {
    rowVecs = hidden / 8;
    nChunks = (rowVecs + kTmaChunkVecs - 1) / kTmaChunkVecs;
    chunkVecs = (rowVecs + nChunks - 1) / nChunks;
  }
  __device__ __forceinline__ int vecs(int c) const { return min(chunkVecs, rowVecs - c * chunkVecs); }
};

// --- producer: one warp per pipeline, lane 0 issues -----------------------------------------
__device__ void produceRemoteRows(const CombineArgs& a, const char* const* rows, const int* sendOffset, int pipe,
                                  bool empty, uint4* buffers, uint64_t* full, uint64_t* emptyBar, int lane) {
  const int R = a.w.peers.nRanks, me = a.w.peers.rank;
  const RowChunks ch(a.hidden);
  const size_t rowBytes = (size_t)a.hidden * 2;
  const int stride = kTmaPipes * gridDim.x;
  Ring ring(pipe);
  for (int t = blockIdx.x + pipe * gridDim.x; t < a.numTokens; t += stride) {
    const TokenPlan p = planToken(a, sendOffset, t, R, empty, lane);
    const unsigned remote = p.srcMask & ~(1u << me);
    for (int c = 0; c < ch.nChunks; ++c) {
      const uint32_t bytes = (uint32_t)ch.vecs(c) * 16u;
      for (unsigned rest = remote; rest != 0; rest &= rest - 1) {  // warp-uniform, rank order
        const int r = __ffs(rest) - 1;
        const int row = __shfl_sync(0xffffffffu, p.rowIndex, r);
        if (lane == 0) {
          const int s = ring.stage;
          mbarWait(&emptyBar[s], ring.parity ^ 1u);  // the consumers released the stage's last use
          mbarArriveExpectTx(&full[s], bytes);
          const char* src = rows[r] + (size_t)row * rowBytes + (size_t)c * ch.chunkVecs * 16;
          bulkCopyToShared(buffers + (size_t)s * kTmaChunkVecs, src, bytes, &full[s]);
        }
        ring.advance();
      }
    }
  }
}

// --- consumers: kTmaPipeWarps warps per pipeline ----------------------------------------------
// Thread ct of the pipeline owns vectors ct + i * kTmaPipeThreads of each chunk.
__device__ __forceinline__ void loadOwnChunk(const char* ownRows, const TokenPlan& p, int me, size_t rowBytes,
                                             int vecOff, int vecs, int ct, uint4 (&v)[kTmaVecsPerThread]) {
  const int row = __shfl_sync(0xffffffffu, p.rowIndex, me);
  const bool mine = (p.srcMask >> me) & 1u;
  const uint4* src = (const uint4*)(ownRows + (size_t)row * rowBytes) + vecOff;
#pragma unroll
  for (int i = 0; i < kTmaVecsPerThread; ++i) {
    const int idx = ct + i * kTmaPipeThreads;
    v[i] = mine && idx < vecs ? src[idx] : make_uint4(0, 0, 0, 0);
  }
}

__device__ void consumeUnits(const CombineArgs& a, const char* const* rows, const int* sendOffset, int pipe,
                             bool empty, const uint4* buffers, uint64_t* full, uint64_t* emptyBar, int ct) {
  const int R = a.w.peers.nRanks, me = a.w.peers.rank, lane = ct % 32;
  const RowChunks ch(a.hidden);
  const size_t rowBytes = (size_t)a.hidden * 2;
  const int stride = kTmaPipes * gridDim.x;
  Ring ring(pipe);
  int t = blockIdx.x + pipe * gridDim.x, c = 0;
  TokenPlan cur = planToken(a, sendOffset, t, R, empty, lane);
  uint4 own[kTmaVecsPerThread];
  if (t < a.numTokens) loadOwnChunk(rows[me], cur, me, rowBytes, 0, ch.vecs(0), ct, own);
  while (t < a.numTokens) {
    // The next unit's own-row vectors are in flight while this unit waits for remote stages.
    int tn = t, cn = c + 1;
    TokenPlan next = cur;
    if (cn == ch.nChunks) {
      tn = t + stride;
      cn = 0;
      next = planToken(a, sendOffset, tn, R, empty, lane);
    }
    uint4 ownNext[kTmaVecsPerThread];
    if (tn < a.numTokens) loadOwnChunk(rows[me], next, me, rowBytes, cn * ch.chunkVecs, ch.vecs(cn), ct, ownNext);

    const int vecOff = c * ch.chunkVecs, vecs = ch.vecs(c);
    float acc[kTmaVecsPerThread][8];
#pragma unroll
    for (int i = 0; i < kTmaVecsPerThread; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;
    for (unsigned rest = cur.srcMask; rest != 0; rest &= rest - 1) {  // warp-uniform, rank order
      const int r = __ffs(rest) - 1;
      const float scale = __shfl_sync(0xffffffffu, cur.weight, r);
      if (r == me) {
#pragma unroll
        for (int i = 0; i < kTmaVecsPerThread; ++i)
          if (ct + i * kTmaPipeThreads < vecs) accumulateBf16x8(acc[i], own[i], scale);
        continue;
      }
      const int s = ring.stage;
      mbarWait(&full[s], ring.parity);
      const uint4* buf = buffers + (size_t)s * kTmaChunkVecs;
#pragma unroll
      for (int i = 0; i < kTmaVecsPerThread; ++i) {
        const int idx = ct + i * kTmaPipeThreads;
        if (idx < vecs) accumulateBf16x8(acc[i], buf[idx], scale);
      }
      __syncwarp();
      if (lane == 0) mbarArrive(&emptyBar[s]);
      ring.advance();
    }
    uint4* dst = (uint4*)(a.out + (size_t)t * a.hidden) + vecOff;  // zeros when no rank received t
#pragma unroll
    for (int i = 0; i < kTmaVecsPerThread; ++i) {
      const int idx = ct + i * kTmaPipeThreads;
      if (idx < vecs) dst[idx] = packBf16x8(acc[i]);
    }
    t = tn;
    c = cn;
    cur = next;
#pragma unroll
    for (int i = 0; i < kTmaVecsPerThread; ++i) own[i] = ownNext[i];
  }
}

__global__ void __launch_bounds__(kTmaThreads, 1) combineHtTmaKernel(CombineArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const WindowView& w = a.w;
  const int R = w.peers.nRanks;
  extern __shared__ __align__(128) uint4 buffers[];  // [kTmaStages][kTmaChunkVecs]
  __shared__ __align__(8) uint64_t full[kTmaStages], emptyBar[kTmaStages];
  __shared__ char* peer[kMaxHtRanks];
  __shared__ const char* rows[kMaxHtRanks];  // peer r's expert outputs, at the offset it published
  __shared__ int sendOffset[kMaxHtRanks];
  const uint64_t seq = *(volatile unsigned long long*)&w.state->combineSeq + 1;
  const bool empty = *(volatile int*)a.routing.dispatchEmpty != 0;
  if (threadIdx.x < R) {
    peer[threadIdx.x] = peerWindow(w, threadIdx.x, 0);
    sendOffset[threadIdx.x] = a.routing.sendOffset[threadIdx.x];
  }
  if (threadIdx.x == 0) {
    for (int s = 0; s < kTmaStages; ++s) {
      mbarInit(&full[s], 1);                  // the producer's arrive (+ the copy's bytes)
      mbarInit(&emptyBar[s], kTmaPipeWarps);  // one arrive per consumer warp of the pipeline
    }
    // The initialised barriers are visible to the bulk copies (async proxy) that complete on them.
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  }
  __syncthreads();
  const bool ready = publishSourceAndAwaitPeers(w, a.inOff, seq, peer, rows);

  if (ready) {
    if (threadIdx.x >= kTmaConsumerThreads) {
      // The peers' rows were written through the generic proxy and acquired above (ready
      // signals, then the CTA barrier); order them before this warp's bulk reads (async proxy).
      asm volatile("fence.proxy.async.global;" ::: "memory");
      produceRemoteRows(a, rows, sendOffset, (threadIdx.x - kTmaConsumerThreads) / 32, empty, buffers, full,
                        emptyBar, threadIdx.x % 32);
    } else {
      consumeUnits(a, rows, sendOffset, threadIdx.x / kTmaPipeThreads, empty, buffers, full, emptyBar,
                   threadIdx.x % kTmaPipeThreads);
    }
  }
  finishAndWaitPeers(w, kSigCombineDone, seq, &w.state->combineArrived, &w.state->combineSeq);
#else
  __trap();  // bulk copies need sm_90; ncclMoeCommCreate refuses NCCL_MOE_HT_COMBINE=tma below it
#endif
}

cudaError_t launchCombineHtTma(const CombineArgs& args, int numCtas, cudaStream_t stream) {
  const int smem = kTmaStages * kTmaChunkBytes;
  cudaError_t err = cudaFuncSetAttribute(combineHtTmaKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  combineHtTmaKernel<<<numCtas, kTmaThreads, smem, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace nccl_moe
