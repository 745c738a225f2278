// High-throughput intranode combine over LSA, pulled with Hopper bulk copies (opt-in:
// NCCL_MOE_HT_COMBINE=tma, read at ncclMoeCommCreate). Same protocol and same result as the
// pull kernel in combine_lsa.cu; only the way rows reach the SM differs.
//
// One launch of numSms persistent CTAs, each 1 producer warp + kTmaConsumerWarps consumer warps
// in kTmaGroups groups:
//  1. ready: exactly as combine_lsa.cu (CTA 0 publishes a.inOff in every peer's kSigCombineSource
//     word and release-signals kSigCombineReady; every CTA waits for all peers and reads each
//     peer's rows at the offset that peer published; after a dispatch that delivered nothing no
//     row is read and every token comes out as zeros).
//  2. reduce: the CTA owns tokens t = blockIdx.x + j * gridDim.x. Each row (2H bytes) is split
//     into nChunks chunks of at most kTmaChunkBytes (16-byte multiples). A (token, chunk) is a
//     unit; unit u belongs to consumer group u % kTmaGroups, which has its own ring of
//     kTmaGroupStages shared-memory stages. For each rank r of the unit's token in increasing
//     order, the producer warp's lane 0 fills the next stage of the group's ring with a bulk copy
//     (cp.async.bulk global -> shared, completion counted in bytes on the stage's `full`
//     mbarrier) from peer r's window. The group's warps take their stages in the same order, so
//     the groups reduce different units at once and each thread holds kTmaVecsPerThread vectors
//     of a stage (one group for all stages made every stage pay all 16 warps' barrier round trip
//     for one vector per thread: measured slower than the pull kernel). The first rank of a unit starts
//     FP32 accumulators at +0.0f, every rank adds w(t, r) * x with separate multiply and add
//     (as the pull kernel and the CPU reference do), the last one rounds to BF16 and stores the
//     chunk to out[t]. So every element sees the same operations in the same order as in the
//     pull kernel: the outputs are bitwise identical. Tokens that no rank received are written
//     as zeros by the producer warp.
//  3. done: finishAndWaitPeers, as the pull kernel. Every bulk copy has landed (its stage was
//     consumed) before the CTA signals, so no peer rewrites a row that is still being read.
// ncclMoeCombineWithWeights (per-row top-k values) stays on the pull kernel.
#include "device/kernel_args.h"
#include "device/common/peer_sync.cuh"
#include "device/common/vec_io.cuh"
#include "device/ht/combine_sync.cuh"

namespace nccl_moe {

constexpr int kTmaConsumerWarps = 16;
constexpr int kTmaConsumerThreads = 32 * kTmaConsumerWarps;
constexpr int kTmaThreads = kTmaConsumerThreads + 32;  // the producer is the last warp
constexpr int kTmaGroups = 4;                          // consumer groups, each with its own ring
constexpr int kTmaGroupWarps = kTmaConsumerWarps / kTmaGroups;
constexpr int kTmaGroupThreads = 32 * kTmaGroupWarps;
constexpr int kTmaGroupStages = kTmaStages / kTmaGroups;  // ring g: stages [g * this, (g + 1) * this)
constexpr int kTmaChunkVecs = kTmaChunkBytes / 16;     // 16-byte vectors per stage at most
constexpr int kTmaVecsPerThread = kTmaChunkVecs / kTmaGroupThreads;
constexpr int kTmaPrefetch = 4;  // tokens whose routing the producer loads ahead
static_assert(kTmaChunkVecs % kTmaGroupThreads == 0, "a stage splits evenly over a group");
static_assert(kTmaStages % kTmaGroups == 0 && kTmaConsumerWarps % kTmaGroups == 0, "even groups");

// What the producer tells the consumers about stage s (written before the stage's arrive, whose
// release orders it before the consumers' acquiring wait). token < 0: no more stages.
struct TmaStageInfo {
  int token;
  int vecOff;   // first 16-byte vector of the chunk in the row
  int vecs;     // 16-byte vectors in the chunk
  float scale;  // w(t, r)
  int first, last;  // the chunk's first / last rank: start / finish the sum
};

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

// --- producer ------------------------------------------------------------------------------
// One lane's share of token t's routing: lane r < R holds sendPos[t][r] (-1: not sent, or
// t >= numTokens, or the dispatch delivered nothing), lane k < K the k-th expert id and weight.
struct TokenRoute {
  int pos;
  int64_t expert;
  float weight;
};

__device__ __forceinline__ TokenRoute loadRoute(const CombineArgs& a, int t, int R, bool empty, int lane) {
  TokenRoute m{-1, -1, 0.0f};
  if (t >= a.numTokens) return m;
  if (lane < R && !empty) m.pos = a.routing.sendPos[(size_t)t * R + lane];
  if (lane < a.topK) {
    m.expert = a.routing.topkIdx[(size_t)t * a.topK + lane];
    if (a.topkWeights) m.weight = a.topkWeights[(size_t)t * a.topK + lane];
  }
  return m;
}

// Position in one group's ring, as the producer and that group's consumers track it: the stage
// (an index into the CTA's stages) and the parity of its use.
struct Ring {
  int first = 0;  // the group's first stage
  int stage = 0;
  uint32_t parity = 0;
  __device__ __forceinline__ explicit Ring(int group = 0)
      : first(group * kTmaGroupStages), stage(group * kTmaGroupStages) {}
  __device__ __forceinline__ void advance() {
    if (++stage == first + kTmaGroupStages) {
      stage = first;
      parity ^= 1u;
    }
  }
};

// The producer warp (all lanes; lane 0 issues): every stage of token t, unit (t, chunk) by unit,
// each unit's ranks in increasing order into the ring of its group (*unit counts units).
__device__ __forceinline__ void produceToken(const CombineArgs& a, const char* const* rows, const int* sendOffset,
                                             int t, const TokenRoute& m, int nChunks, int chunkVecs,
                                             uint4* buffers, TmaStageInfo* info, uint64_t* full,
                                             uint64_t* emptyBar, Ring* rings, int* unit, int lane) {
  const int rowVecs = a.hidden / 8;
  const unsigned srcMask = __ballot_sync(0xffffffffu, m.pos >= 0);
  if (srcMask == 0) {  // no rank received t: zeros, as the pull kernel's empty sum gives
    uint4* dst = (uint4*)(a.out + (size_t)t * a.hidden);
    for (int i = lane; i < rowVecs; i += 32) dst[i] = make_uint4(0, 0, 0, 0);
    return;
  }
  // w(t, r) for r = lane: the weights of t's experts on rank `lane`, in k order, from 0.0f.
  float weight = 1.0f;
  if (a.topkWeights) {
    const int expertsPerRank = a.numExperts / a.w.peers.nRanks;
    weight = 0.0f;
    for (int k = 0; k < a.topK; ++k) {
      const int64_t e = __shfl_sync(0xffffffffu, m.expert, k);
      const float wk = __shfl_sync(0xffffffffu, m.weight, k);
      if (e >= 0 && (int)e / expertsPerRank == lane) weight += wk;
    }
  }
  const int rowIndex = m.pos >= 0 ? sendOffset[lane] + m.pos : 0;
  const size_t rowBytes = (size_t)a.hidden * 2;
  for (int c = 0; c < nChunks; ++c) {
    const int vecOff = c * chunkVecs;
    const int vecs = min(chunkVecs, rowVecs - vecOff);
    Ring& ring = rings[(*unit)++ % kTmaGroups];
    for (unsigned rest = srcMask; rest != 0;) {  // warp-uniform
      const int r = __ffs(rest) - 1;
      const bool first = rest == srcMask;
      rest &= rest - 1;
      const int row = __shfl_sync(0xffffffffu, rowIndex, r);
      const float scale = __shfl_sync(0xffffffffu, weight, r);
      if (lane == 0) {
        const int s = ring.stage;
        mbarWait(&emptyBar[s], ring.parity ^ 1u);  // the consumers released the stage's last use
        info[s] = TmaStageInfo{t, vecOff, vecs, scale, first, rest == 0};
        const uint32_t bytes = (uint32_t)vecs * 16u;
        mbarArriveExpectTx(&full[s], bytes);
        const char* src = rows[r] + (size_t)row * rowBytes + (size_t)vecOff * 16;
        bulkCopyToShared(buffers + (size_t)s * kTmaChunkVecs, src, bytes, &full[s]);
      }
      ring.advance();
    }
  }
}

// --- consumers -----------------------------------------------------------------------------
// Thread ct of consumer group g owns vectors ct + i * kTmaGroupThreads of every stage of the
// group's ring.
__device__ __forceinline__ void consumeStages(const CombineArgs& a, const uint4* buffers, const TmaStageInfo* info,
                                              uint64_t* full, uint64_t* emptyBar, int g, int ct) {
  float acc[kTmaVecsPerThread][8];
  for (Ring ring(g);; ring.advance()) {
    const int s = ring.stage;
    mbarWait(&full[s], ring.parity);
    const TmaStageInfo in = info[s];
    if (in.token < 0) return;
    if (in.first)
#pragma unroll
      for (int i = 0; i < kTmaVecsPerThread; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;
    const uint4* buf = buffers + (size_t)s * kTmaChunkVecs;
#pragma unroll
    for (int i = 0; i < kTmaVecsPerThread; ++i) {
      const int idx = ct + i * kTmaGroupThreads;
      if (idx < in.vecs) accumulateBf16x8(acc[i], buf[idx], in.scale);
    }
    __syncwarp();
    if (ct % 32 == 0) mbarArrive(&emptyBar[s]);
    if (in.last) {
      uint4* dst = (uint4*)(a.out + (size_t)in.token * a.hidden) + in.vecOff;
#pragma unroll
      for (int i = 0; i < kTmaVecsPerThread; ++i) {
        const int idx = ct + i * kTmaGroupThreads;
        if (idx < in.vecs) dst[idx] = packBf16x8(acc[i]);
      }
    }
  }
}

__global__ void __launch_bounds__(kTmaThreads, 1) combineHtTmaKernel(CombineArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const WindowView& w = a.w;
  const int R = w.peers.nRanks;
  extern __shared__ __align__(128) uint4 buffers[];  // [kTmaStages][kTmaChunkVecs]
  __shared__ __align__(8) uint64_t full[kTmaStages], emptyBar[kTmaStages];
  __shared__ TmaStageInfo info[kTmaStages];
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
      mbarInit(&full[s], 1);                   // the producer's arrive (+ the copy's bytes)
      mbarInit(&emptyBar[s], kTmaGroupWarps);  // one arrive per warp of the stage's group
    }
    // The initialised barriers are visible to the bulk copies (async proxy) that complete on them.
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  }
  __syncthreads();
  const bool ready = publishSourceAndAwaitPeers(w, a.inOff, seq, peer, rows);

  if (ready) {
    const int rowVecs = a.hidden / 8;
    const int nChunks = (rowVecs + kTmaChunkVecs - 1) / kTmaChunkVecs;
    const int chunkVecs = (rowVecs + nChunks - 1) / nChunks;  // balanced; the last chunk is > 0
    if (threadIdx.x >= kTmaConsumerThreads) {
      const int lane = threadIdx.x % 32;
      // The peers' rows were written through the generic proxy and acquired above (ready
      // signals, then the CTA barrier); order them before this warp's bulk reads (async proxy).
      asm volatile("fence.proxy.async.global;" ::: "memory");
      Ring rings[kTmaGroups];
#pragma unroll
      for (int g = 0; g < kTmaGroups; ++g) rings[g] = Ring(g);
      int unit = 0;
      const int stride = gridDim.x;
      TokenRoute cur[kTmaPrefetch], next[kTmaPrefetch];
#pragma unroll
      for (int i = 0; i < kTmaPrefetch; ++i) cur[i] = loadRoute(a, blockIdx.x + i * stride, R, empty, lane);
      for (int t0 = blockIdx.x; t0 < a.numTokens; t0 += kTmaPrefetch * stride) {
        // The next group's routing is in flight while this group's copies are issued.
#pragma unroll
        for (int i = 0; i < kTmaPrefetch; ++i)
          next[i] = loadRoute(a, t0 + (kTmaPrefetch + i) * stride, R, empty, lane);
#pragma unroll
        for (int i = 0; i < kTmaPrefetch; ++i) {
          const int t = t0 + i * stride;
          if (t < a.numTokens)
            produceToken(a, rows, sendOffset, t, cur[i], nChunks, chunkVecs, buffers, info, full, emptyBar,
                         rings, &unit, lane);
        }
#pragma unroll
        for (int i = 0; i < kTmaPrefetch; ++i) cur[i] = next[i];
      }
      if (lane == 0) {  // end marker of every group: a stage without data
        for (int g = 0; g < kTmaGroups; ++g) {
          Ring& ring = rings[g];
          mbarWait(&emptyBar[ring.stage], ring.parity ^ 1u);
          info[ring.stage].token = -1;
          mbarArrive(&full[ring.stage]);
        }
      }
      __syncwarp();
    } else {
      consumeStages(a, buffers, info, full, emptyBar, threadIdx.x / kTmaGroupThreads,
                    threadIdx.x % kTmaGroupThreads);
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
