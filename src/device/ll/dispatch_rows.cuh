// The pieces of the low-latency dispatch that both of its forms run (dispatch_lsa.cu: a send
// kernel and a completion kernel; one_launch_lsa.cu: one kernel for small one-shot batches):
// routing a token (row reservation, route entries, srcToken, the token's rank mask), loading,
// casting and storing a chunk of it, and the completion (waits, counts, fan-out to the further
// expert rows). Same operations in the same order in both forms, so the outputs are the same
// bits whichever form each rank ran (ranks may differ: the protocol does not change).
#pragma once
#include "nccl_moe.h"
#include "device/kernel_args.h"
#include "device/common/fp8_cast.cuh"
#include "device/common/peer_sync.cuh"
#include "device/common/vec_io.cuh"
#include "device/ll/source_tokens.cuh"
#include "device/ll/dispatch_gin.cuh"

namespace nccl_moe {

constexpr int kLlThreads = 512;
constexpr int kLlWarps = kLlThreads / 32;
constexpr int kLlUnroll = 8;  // vectors per lane in one chunk: 8 * 32 * 8 = 2048 channels = 16 groups
constexpr int kLlChunkVecs = 32 * kLlUnroll;
static_assert(kLlThreads >= kMaxRanks, "one thread per rank fills the peer table and signals");

// Chunks of kLlChunkVecs 16-byte vectors: of a token's BF16 input row (the send's items), and
// of one dispatched row of rowBytes bytes (the completion's fan-out items).
__host__ __device__ constexpr int llSendChunks(int hidden) { return (hidden / 8 + kLlChunkVecs - 1) / kLlChunkVecs; }
__host__ __device__ constexpr int llDispatchChunks(size_t rowBytes) {
  return (int)((rowBytes / 16 + kLlChunkVecs - 1) / kLlChunkVecs);
}

// Where a token of the running round goes: for each k, its destination rank (-1: none) and row.
struct LlTokenRoute {
  unsigned lead;  // bit k set for the first k of each destination rank
  int dest[kMaxTopK];
  int row[kMaxTopK];
  int rec[kMaxTopK];  // kNet: record index at a remote destination (lead k only), else -1
};

// This lane's top-k entry of token t (lane < K): its expert and weight (1 without weights).
__device__ __forceinline__ void loadTopkLl(const LlDispatchArgs& a, int t, int lane, int64_t* e, float* weight) {
  *e = -1;
  *weight = 1.0f;
  if (lane < a.topK) {
    *e = a.topkIdx[(size_t)t * a.topK + lane];
    if (a.topkWeights) *weight = a.topkWeights[(size_t)t * a.topK + lane];
  }
}

// Phase 1 for token t, by one warp: reserve rows, write route entries, srcToken and tokenRanks.
// posCounter: [E] rows of this rank per expert in the running send (a.posCounter, shared by
// every CTA of a send, or a CTA's own shared-memory counters when one CTA sends everything).
// This form takes the lane's top-k entry already loaded (loadTopkLl): the loads may then be
// issued long before, off the routing's path.
template <bool kNet>
__device__ void routeLoadedTokenLl(const LlDispatchArgs& a, char* const* peer, char* mySlot, int t,
                                   LlTokenRoute* r, int lane, int* posCounter, int64_t e, float weight) {
  const WindowView& w = a.w;
  const int R = w.peers.nRanks, me = w.peers.rank, K = a.topK, L = a.numExperts / R, M = a.maxTokens;
  int d = -1, row = -1;
  if (lane < K) {
    if (e < -1 || e >= a.numExperts) {
      reportError(w.localError, kDevBadExpert, t, lane, (int)e);
    } else if (e >= 0 && !a.failed.has((int)e / L)) {  // an expert of a failed rank: dropped
      const int ei = (int)e, pos = atomicAdd(&posCounter[ei], 1);
      if (pos < M) {
        d = ei / L;
        row = (ei % L) * R * M + me * M + pos;
      } else {  // only possible with an expert repeated inside a token
        reportError(w.localError, kDevRepeatedExpert, t, lane, ei);
      }
    }
  }
  // The first k of each destination rank receives the data; the completion copies it onward.
  const unsigned same = __match_any_sync(0xffffffffu, d);
  const unsigned lead = __ballot_sync(0xffffffffu, d >= 0 && lane == __ffs(same) - 1);
  // The token's rank mask: word j holds ranks 32j..32j+31 (one word up to 32 ranks).
  const int words = rankMaskWords(R);
  uint32_t* tokenRanks = (uint32_t*)(mySlot + a.slot.tokenRanks) + (size_t)t * words;
  for (int j = 0; j < words; ++j) {
    const unsigned ranks = __reduce_or_sync(0xffffffffu, d >= 0 && d / 32 == j ? 1u << (d % 32) : 0u);
    if (lane == 0) tokenRanks[j] = ranks;
  }
  if (lane == 0) r->lead = lead;
  if constexpr (kNet) stageRouteGin(a, t, d, row, weight, lead, r->rec, lane);
  if (lane < K) {
    r->dest[lane] = d;
    r->row[lane] = row;
    if (d >= 0 && (!kNet || peer[d] != nullptr)) ((int*)(peer[d] + a.slot.srcToken))[row] = t;
    // Every rank gets this token's K entries, so that no entry of an earlier use of the slot
    // survives: 8-byte stores, K consecutive per (rank, token). Remote ranks: in the record.
    const size_t entry = ((size_t)me * M + t) * K + lane;
    for (int dst = 0; dst < R; ++dst) {
      if ((kNet && peer[dst] == nullptr) || a.failed.has(dst)) continue;
      LlRouteEntry* p = (LlRouteEntry*)(peer[dst] + a.slot.route) + entry;
      *(uint2*)p = make_uint2((uint32_t)(d == dst ? row : -1), __float_as_uint(weight));
    }
  }
}

template <bool kNet>
__device__ __forceinline__ void routeTokenLl(const LlDispatchArgs& a, char* const* peer, char* mySlot, int t,
                                             LlTokenRoute* r, int lane, int* posCounter) {
  int64_t e;
  float weight;
  loadTopkLl(a, t, lane, &e, &weight);
  routeLoadedTokenLl<kNet>(a, peer, mySlot, t, r, lane, posCounter, e, weight);
}

// Phase 2, first half: chunk c (kLlChunkVecs vectors) of token t's BF16 row into v (zeros past
// the row's end). Depends on nothing of the routing, so it may be issued before it.
__device__ __forceinline__ void loadChunkLl(const LlDispatchArgs& a, int t, int c, int lane, uint4 (&v)[kLlUnroll]) {
  const int rowVecs = a.hidden / 8, base = c * kLlChunkVecs;
  const uint4* src = (const uint4*)(a.x + (size_t)t * a.hidden);
#pragma unroll
  for (int u = 0; u < kLlUnroll; ++u) {
    const int idx = base + u * 32 + lane;
    v[u] = idx < rowVecs ? __ldg(src + idx) : make_uint4(0, 0, 0, 0);
  }
}

// A chunk cast to FP8: this lane's values (q), and the scales of its groups (scale: FP32 form;
// words: UE8M0 form, lane 0's words hold every group of the chunk).
struct LlFp8Chunk {
  uint2 q[kLlUnroll];
  float scale[kLlUnroll];
  uint32_t words[kLlUnroll / 2];
};

// The FP8 cast of chunk v, by the whole warp: per group, the same amax (groupAmax: max of |x| over
// the lane's 8 values from +0, then the half-warp butterfly 8, 4, 2, 1, then the floor), scale
// (fp8Scale) and values (castToFp8) as groupAmax / fp8Scale / castToFp8 one group after another,
// so the same bits; but the kLlUnroll groups' shuffles are interleaved (one dependent chain of 4
// shuffle rounds instead of kLlUnroll chains one after another: the divisions of fp8Scale, whose
// slow path is a call, no longer sit between one group's shuffles and the next's).
__device__ __forceinline__ void castChunkLl(const LlDispatchArgs& a, const uint4 (&v)[kLlUnroll], LlFp8Chunk& f) {
  float m[kLlUnroll];
#pragma unroll
  for (int u = 0; u < kLlUnroll; ++u) {
    const uint32_t w[4] = {v[u].x, v[u].y, v[u].z, v[u].w};
    m[u] = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      m[u] = fmaxf(m[u], fabsf(bf16BitsToFloat(w[i] & 0xffffu)));
      m[u] = fmaxf(m[u], fabsf(bf16BitsToFloat(w[i] >> 16)));
    }
  }
#pragma unroll
  for (int off = 8; off > 0; off >>= 1)
#pragma unroll
    for (int u = 0; u < kLlUnroll; ++u) m[u] = fmaxf(m[u], __shfl_xor_sync(0xffffffffu, m[u], off));
  uint32_t e8[kLlUnroll];
#pragma unroll
  for (int u = 0; u < kLlUnroll; ++u) {
    const Fp8Scale sc = fp8Scale(fmaxf(m[u], kAmaxFloor), a.scaleFormat != ncclMoeScaleFp32);
    f.scale[u] = sc.scale;
    e8[u] = sc.ue8m0;
    f.q[u] = castToFp8(v[u], sc.inverse);
  }
  // UE8M0: the exponent bytes of groups 4j..4j+3 come from steps u = 2i, 2i+1, half-warps 0, 1.
#pragma unroll
  for (int i = 0; i < kLlUnroll / 2; ++i) {
    const uint32_t b0 = e8[2 * i], b2 = e8[2 * i + 1];
    const uint32_t b1 = __shfl_sync(0xffffffffu, b0, 16), b3 = __shfl_sync(0xffffffffu, b2, 16);
    f.words[i] = b0 | (b1 << 8) | (b2 << 16) | (b3 << 24);
  }
}

// Phase 2, second half (FP8): chunk c, cast (castChunkLl), stored to every destination with its
// scales (kNet: into the staged record of a remote destination).
template <bool kNet>
__device__ __forceinline__ void storeCastChunkLl(const LlDispatchArgs& a, char* const* peer, const LlTokenRoute& r,
                                                 int c, int lane, const LlFp8Chunk& f) {
  const int H = a.hidden, rowVecs = H / 8, groups = H / kFp8GroupSize, base = c * kLlChunkVecs;
  const size_t rowBytes = (size_t)H;
  for (unsigned m = r.lead; m != 0; m &= m - 1) {
    const int k = __ffs(m) - 1;
    char* slot = peer[r.dest[k]];
    const size_t row = (size_t)r.row[k];
    uint2* dst = (uint2*)(slot + a.slot.recvX + row * rowBytes);
    char* scaleRow = slot + a.slot.recvScales + row * (size_t)a.scaleBytes;
    if (kNet && r.rec[k] >= 0) {
      char* rec = stagedRecord(a, r.dest[k], r.rec[k]);
      dst = (uint2*)(rec + a.net.recordData);
      scaleRow = rec + a.net.recordScales;
    }
#pragma unroll
    for (int u = 0; u < kLlUnroll; ++u) {
      const int idx = base + u * 32 + lane;
      if (idx < rowVecs) dst[idx] = f.q[u];
    }
    if (a.scaleFormat == ncclMoeScaleUe8m0) {
      uint32_t* s = (uint32_t*)scaleRow;
#pragma unroll
      for (int i = 0; i < kLlUnroll / 2; ++i) {
        const int word = base / 64 + i;  // 64 vectors = 512 channels per word
        if (lane == 0 && word < groups / 4) s[word] = f.words[i];
      }
    } else if ((lane & 15) == 0) {
      float* s = (float*)scaleRow;
#pragma unroll
      for (int u = 0; u < kLlUnroll; ++u) {
        const int g = (base + u * 32 + lane) / 16;
        if (g < groups) s[g] = f.scale[u];
      }
    }
  }
}

// Phase 2, second half: chunk c of token t, loaded into v, stored to every destination (cast to
// FP8 with its scales when asked; kNet: into the staged record of a remote destination).
template <bool kNet>
__device__ __forceinline__ void storeChunkLl(const LlDispatchArgs& a, char* const* peer, const LlTokenRoute& r,
                                             int c, int lane, const uint4 (&v)[kLlUnroll]) {
  const int H = a.hidden, rowVecs = H / 8, base = c * kLlChunkVecs;
  const size_t rowBytes = a.fp8 ? (size_t)H : (size_t)H * 2;
  if (!a.fp8) {
    for (unsigned m = r.lead; m != 0; m &= m - 1) {
      const int k = __ffs(m) - 1;
      uint4* dst = kNet && r.rec[k] >= 0 ? (uint4*)(stagedRecord(a, r.dest[k], r.rec[k]) + a.net.recordData)
                                         : (uint4*)(peer[r.dest[k]] + a.slot.recvX + (size_t)r.row[k] * rowBytes);
#pragma unroll
      for (int u = 0; u < kLlUnroll; ++u) {
        const int idx = base + u * 32 + lane;
        if (idx < rowVecs) storeNoAllocate(dst + idx, v[u]);
      }
    }
    return;
  }
  LlFp8Chunk f;
  castChunkLl(a, v, f);
  storeCastChunkLl<kNet>(a, peer, r, c, lane, f);
}

// Phase 2: chunk c of token t, loaded once, stored to every destination.
template <bool kNet>
__device__ void sendChunkLl(const LlDispatchArgs& a, char* const* peer, const LlTokenRoute& r, int t,
                            int c, int lane) {
  uint4 v[kLlUnroll];
  loadChunkLl(a, t, c, lane, v);
  storeChunkLl<kNet>(a, peer, r, c, lane, v);
}

// Copies chunk c of a received row (rowBytes) from row `from` to every row of `rows` but the
// first; chunk 0 also copies the row's scales (scaleBytes, a multiple of 4).
inline __device__ void fanOutChunk(char* x, char* scales, size_t rowBytes, size_t scaleBytes, int from,
                                   const int* rowOfK, unsigned others, int c, int lane) {
  const int rowVecs = (int)(rowBytes / 16), base = c * kLlChunkVecs;
  const uint4* src = (const uint4*)(x + (size_t)from * rowBytes);
  uint4 v[kLlUnroll];
#pragma unroll
  for (int u = 0; u < kLlUnroll; ++u) {
    const int idx = base + u * 32 + lane;
    if (idx < rowVecs) v[u] = loadPeer(src + idx);  // written by a peer: read past L1
  }
  // Chunk 0: the row's first 64 scale words are loaded with the row (one round trip for both,
  // not one for the row and one per 32 words after its stores).
  const int words = c == 0 ? (int)(scaleBytes / 4) : 0;
  const int* s = (const int*)(scales + (size_t)from * scaleBytes);
  int s0 = 0, s1 = 0;
  if (lane < words) s0 = loadPeerInt(s + lane);
  if (lane + 32 < words) s1 = loadPeerInt(s + lane + 32);
  for (unsigned m = others; m != 0; m &= m - 1) {
    uint4* dst = (uint4*)(x + (size_t)rowOfK[__ffs(m) - 1] * rowBytes);
#pragma unroll
    for (int u = 0; u < kLlUnroll; ++u) {
      const int idx = base + u * 32 + lane;
      if (idx < rowVecs) dst[idx] = v[u];
    }
  }
  if (words == 0) return;
  for (unsigned m = others; m != 0; m &= m - 1) {
    int* d = (int*)(scales + (size_t)rowOfK[__ffs(m) - 1] * scaleBytes);
    if (lane < words) d[lane] = s0;
    if (lane + 32 < words) d[lane + 32] = s1;
  }
  for (int i = lane + 64; i < words; i += 32) {
    const int value = loadPeerInt(s + i);
    for (unsigned m = others; m != 0; m &= m - 1)
      ((int*)(scales + (size_t)rowOfK[__ffs(m) - 1] * scaleBytes))[i] = value;
  }
}

// The completion of this slot's dispatch number `epoch` (kNet = false: only epoch mod 2^32
// matters, what the signals carry), by CTA `cta` of `numCtas` (every CTA of a completion calls
// it once, with all its threads). slot: this rank's slot in the window,
// through the address the caller's own stores to it used. Every CTA waits for every source;
// CTA 0 then writes the counts; the CTAs share out the fan-out items. onWaited() runs in every
// thread right after the waits, whatever their outcome (before a failed wait ends the call).
template <bool kNet, class OnWaited>
__device__ __forceinline__ void completeDispatchLl(const LlDispatchArgs& a, char* slot, uint64_t epoch, int cta,
                                                   int numCtas, OnWaited onWaited) {
  const WindowView& w = a.w;
  const int R = w.peers.nRanks, L = a.numExperts / R, M = a.maxTokens, K = a.topK;
  const uint64_t* sig = (const uint64_t*)(slot + a.slot.dispatchSignals);
  __shared__ int tokenStart[kMaxRanks + 1];  // prefix of the sources' token counts
  __shared__ int tokens[kMaxRanks];
  __shared__ int netStart[kNet ? kMaxRanks + 1 : 1];  // prefix of the remote sources' records
  __shared__ int netTokens[kNet ? kMaxRanks : 1];
  // tokens[s] / netTokens[s] = -1: source s is failed (in a.failed, or this launch timed out on
  // it); it counts as 0 tokens. Each entry is written by the one thread that handles s.
  bool ok = true;
  if constexpr (kNet) ok = waitSourcesGin(a, epoch, netTokens);
  for (int s = threadIdx.x; s < R; s += blockDim.x) {
    if (kNet && w.peers.lsaIndex(s) == kPeerRemote) {  // waited for by waitSourcesGin
      tokens[s] = 0;
      continue;
    }
    uint64_t v = 0;
    int outcome = kWaitPeerFailed;
    if (!a.failed.has(s)) outcome = waitSeqLl<32>(w, sig + s, epoch, kWaitLlDispatch, s, &v);
    tokens[s] = outcome == kWaitArrived ? (int)(v & 0xffffffffu) : -1;
    ok &= outcome != kWaitFatal;
  }
  ok = __syncthreads_and(ok) != 0;
  onWaited();
  if (!ok) return;
  if (threadIdx.x == 0) {
    int run = 0;
    for (int s = 0; s < R; ++s) {
      tokenStart[s] = run;
      run += max(tokens[s], 0);
    }
    tokenStart[R] = run;
    if constexpr (kNet) {
      run = 0;
      for (int s = 0; s < R; ++s) {
        netStart[s] = run;
        run += max(netTokens[s], 0);
      }
      netStart[R] = run;
    }
  }
  __syncthreads();

  // Fan-out: items (source token, chunk); tokens with one row here need nothing. The warp's first
  // route entry is loaded before the counts below, so that the two loads overlap (the fan-out
  // touches no count).
  const size_t rowBytes = a.fp8 ? (size_t)a.hidden : (size_t)a.hidden * 2;
  const size_t scaleBytes = (size_t)a.scaleBytes;
  const int chunks = llDispatchChunks(rowBytes);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __shared__ int rowOfK[kLlWarps][kMaxTopK];
  const LlRouteEntry* route = (const LlRouteEntry*)(slot + a.slot.route);
  const int items = tokenStart[R] * chunks, stride = numCtas * kLlWarps;
  // This lane's route entry row of item `it` (-1 past the end), loaded one item ahead.
  auto rowOf = [&](int it) {
    if (it >= items) return -1;
    int s, t;
    sourceTokenOf(tokenStart, it / chunks, &s, &t);
    return loadRouteEntryLl(route, s, t, M, K, lane).x;
  };
  int it = cta * kLlWarps + warp;
  int row = rowOf(it);

  int* counts = (int*)(slot + a.slot.recvCounts);  // [L][R], then [L]
  auto isGone = [&](int s) { return tokens[s] < 0 || (kNet && netTokens[s] < 0); };
  if constexpr (kNet) {
    if (cta == 0) copyRemoteCountsGin(a, counts, netTokens);
    __syncthreads();
  }
  if (cta == 0) {
    // A failed source's counts read 0 here (a rank that is alive but masked may still write
    // them later: callers skip failed sources) and count nowhere.
    for (int i = threadIdx.x; i < L * R; i += blockDim.x)
      if (isGone(i % R)) counts[i] = 0;
    // The sums by the CTA's last threads: the first warps, whose fan-out items come first
    // (it = warp), go to them without the count loads' round trip in front.
    for (int l = blockDim.x - 1 - threadIdx.x; l < L; l += blockDim.x) {
      int sum = 0;
      for (int s = 0; s < R; ++s)
        if (!isGone(s)) sum += loadPeerInt(counts + l * R + s);
      counts[L * R + l] = sum;
    }
  }

  for (; it < items; it += stride) {
    const int next = rowOf(it + stride);
    if (lane < K) rowOfK[warp][lane] = row;
    const unsigned here = __ballot_sync(0xffffffffu, row >= 0);
    row = next;
    __syncwarp();
    if (__popc(here) >= 2) {
      const int from = rowOfK[warp][__ffs(here) - 1];
      fanOutChunk(slot + a.slot.recvX, slot + a.slot.recvScales, rowBytes, scaleBytes, from, rowOfK[warp],
                  here & (here - 1), it % chunks, lane);
    }
    __syncwarp();  // rowOfK[warp] is rewritten by the next item
  }
  if constexpr (kNet) fanOutRecordsGin(a, slot, netStart, kLlChunkVecs, warp, kLlWarps, lane);
}

}  // namespace nccl_moe
