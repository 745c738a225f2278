// Low-latency dispatch over LSA: send kernel (no waiting on peers) and completion kernel.
//
// Send (numSms CTAs): warps take tokens round-robin. For token t, lanes k < K read its expert ids
// and reserve a row per valid (t, k) with an atomic on this rank's per-expert counter; the warp
// then streams the row once from HBM (16-byte vectors), casts it to FP8 when asked (amax and
// scale per 128 channels inside half-warps) and stores it straight into every destination row
// x[l][me*M + pos] of the owning ranks' windows, with its scales, srcToken and srcK. The last CTA
// to finish publishes, for every expert e, (epoch << 32) | rows to the owner's dispatchSignals
// [l][me] with release semantics and clears the counters. Nothing here waits for a peer.
//
// Complete (1 CTA): one thread per (l, s) waits for the signal of this slot's epoch (acquire, with
// the context timeout) and writes recvCounts[l][s]; then the per-expert sums.
#include "config.h"
#include "device/fp8_cast.cuh"
#include "device/kernel_args.h"
#include "device/peer_sync.cuh"
#include "device/vec_io.cuh"

namespace nccl_moe {

constexpr int kLlThreads = 512;
constexpr int kLlUnroll = 4;  // 32-vector steps per batch: 4 * 32 * 8 = 1024 channels = 8 groups

__device__ __forceinline__ char* slotBase(const LlDispatchArgs& a, char* peerBase) {
  return peerBase + a.slotOff;
}

// Sends token t to the rows reserved by lanes in `pairs` (lane k: rank d, local expert l, pos).
__device__ void sendTokenLl(const LlDispatchArgs& a, char* const* peer, int t, unsigned pairs,
                            int dstRank, int dstRow, int lane) {
  const int H = a.hidden, rowVecs = H / 8;
  const size_t rowBytes = a.fp8 ? (size_t)H : (size_t)H * 2;
  const int groups = H / kFp8GroupSize;
  const bool ue8m0 = a.scaleFormat == ncclMoeScaleUe8m0;
  const bool pow2 = a.scaleFormat != ncclMoeScaleFp32;
  const uint4* src = (const uint4*)(a.x + (size_t)t * H);
  for (int base = 0; base < rowVecs; base += 32 * kLlUnroll) {
    uint4 v[kLlUnroll];
#pragma unroll
    for (int u = 0; u < kLlUnroll; ++u) {
      const int idx = base + u * 32 + lane;
      v[u] = idx < rowVecs ? loadStreaming(src + idx) : make_uint4(0, 0, 0, 0);
    }
    if (!a.fp8) {
      for (unsigned m = pairs; m != 0; m &= m - 1) {
        const int k = __ffs(m) - 1;
        const int d = __shfl_sync(0xffffffffu, dstRank, k), row = __shfl_sync(0xffffffffu, dstRow, k);
        uint4* dst = (uint4*)(slotBase(a, peer[d]) + a.slot.recvX + (size_t)row * rowBytes);
#pragma unroll
        for (int u = 0; u < kLlUnroll; ++u) {
          const int idx = base + u * 32 + lane;
          if (idx < rowVecs) storeNoAllocate(dst + idx, v[u]);
        }
      }
      continue;
    }
    uint2 q[kLlUnroll];
    Fp8Scale sc[kLlUnroll];
#pragma unroll
    for (int u = 0; u < kLlUnroll; ++u) {
      sc[u] = fp8Scale(groupAmax(v[u]), pow2);  // all lanes take part in the shuffles
      q[u] = castToFp8(v[u], sc[u].inverse);
    }
    // UE8M0: the four exponent bytes of groups 4j..4j+3 come from steps u = 2i, 2i+1, halves 0/1.
    uint32_t packed[kLlUnroll / 2];
#pragma unroll
    for (int i = 0; i < kLlUnroll / 2; ++i) {
      const uint32_t b0 = sc[2 * i].ue8m0, b2 = sc[2 * i + 1].ue8m0;
      const uint32_t b1 = __shfl_sync(0xffffffffu, b0, 16), b3 = __shfl_sync(0xffffffffu, b2, 16);
      packed[i] = b0 | (b1 << 8) | (b2 << 16) | (b3 << 24);
    }
    for (unsigned m = pairs; m != 0; m &= m - 1) {
      const int k = __ffs(m) - 1;
      const int d = __shfl_sync(0xffffffffu, dstRank, k), row = __shfl_sync(0xffffffffu, dstRow, k);
      char* slot = slotBase(a, peer[d]);
      uint2* dst = (uint2*)(slot + a.slot.recvX + (size_t)row * rowBytes);
#pragma unroll
      for (int u = 0; u < kLlUnroll; ++u) {
        const int idx = base + u * 32 + lane;
        if (idx < rowVecs) dst[idx] = q[u];
      }
      if (ue8m0) {
        uint32_t* s = (uint32_t*)(slot + a.slot.recvScales) + (size_t)row * (groups / 4);
        if (lane == 0) {
#pragma unroll
          for (int i = 0; i < kLlUnroll / 2; ++i) {
            const int word = base / 64 + i;  // 64 vectors = 512 channels per word
            if (word < groups / 4) s[word] = packed[i];
          }
        }
      } else if ((lane & 15) == 0) {
        float* s = (float*)(slot + a.slot.recvScales) + (size_t)row * groups;
#pragma unroll
        for (int u = 0; u < kLlUnroll; ++u) {
          const int g = (base + u * 32 + lane) / 16;
          if (g < groups) s[g] = sc[u].scale;
        }
      }
    }
  }
}

__global__ void __launch_bounds__(kLlThreads, 1) llDispatchSendKernel(LlDispatchArgs a) {
  const WindowView& w = a.w;
  const int R = w.nRanks, me = w.rank, L = a.numExperts / R, M = a.maxTokens;
  __shared__ char* peer[kMaxRanks];
  unsigned long long* sends = &w.state->llDispatchSends[a.slotIndex];
  const uint64_t epoch = *(volatile unsigned long long*)sends + 1;
  if (threadIdx.x < R) peer[threadIdx.x] = (char*)ncclGetLsaPointer(w.win, 0, threadIdx.x);
  __syncthreads();

  const int lane = threadIdx.x % 32, warpsPerCta = blockDim.x / 32;
  for (int t = blockIdx.x * warpsPerCta + threadIdx.x / 32; t < a.numTokens; t += gridDim.x * warpsPerCta) {
    int dstRank = 0, dstRow = 0;
    bool valid = false;
    if (lane < a.topK) {
      const int64_t e = a.topkIdx[(size_t)t * a.topK + lane];
      if (e >= a.numExperts || e < -1) reportError(w.error, kDevBadExpert, t, lane, (int)e);
      valid = e >= 0 && e < a.numExperts;
      if (valid) {
        const int ei = (int)e, pos = atomicAdd(&a.posCounter[ei], 1);
        const int l = ei % L;
        dstRank = ei / L;
        dstRow = l * R * M + me * M + pos;
        char* slot = slotBase(a, peer[dstRank]);
        ((int*)(slot + a.slot.srcToken))[dstRow] = t;
        ((int*)(slot + a.slot.srcK))[dstRow] = lane;
      }
    }
    const unsigned pairs = __ballot_sync(0xffffffffu, valid);
    sendTokenLl(a, peer, t, pairs, dstRank, dstRow, lane);
  }

  if (!lastCtaToArrive(&w.state->llDispatchArrived)) return;
  // Publish the row counts of this send: expert e's rows go to rank e / L, local expert e % L.
  for (int e = threadIdx.x; e < a.numExperts; e += blockDim.x) {
    const int rows = atomicExch(&a.posCounter[e], 0);
    uint64_t* sig = (uint64_t*)(slotBase(a, peer[e / L]) + a.slot.dispatchSignals) + (e % L) * R + me;
    const uint64_t value = (epoch << 32) | (uint64_t)rows;
    asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(sig), "l"(value) : "memory");
  }
  if (threadIdx.x == 0) *(volatile unsigned long long*)sends = epoch;
}

__global__ void llDispatchCompleteKernel(LlDispatchArgs a) {
  const WindowView& w = a.w;
  const int R = w.nRanks, L = a.numExperts / R;
  char* slot = (char*)ncclGetLocalPointer(w.win, a.slotOff);
  const uint64_t epoch = *(volatile unsigned long long*)&w.state->llDispatchSends[a.slotIndex];
  const uint64_t* sig = (const uint64_t*)(slot + a.slot.dispatchSignals);
  int* counts = (int*)(slot + a.slot.recvCounts);  // [L][R], then [L]
  for (int i = threadIdx.x; i < L * R; i += blockDim.x) {
    int rows = 0;
    if (waitAtLeast(w, sig + i, epoch << 32, kWaitLlDispatch, i % R)) {
      const uint64_t v = loadAcquire(sig + i);
      rows = (v >> 32) == epoch ? (int)(v & 0xffffffffu) : 0;
    }
    counts[i] = rows;
  }
  __syncthreads();
  for (int l = threadIdx.x; l < L; l += blockDim.x) {
    int sum = 0;
    for (int s = 0; s < R; ++s) sum += counts[l * R + s];
    counts[L * R + l] = sum;
  }
}

cudaError_t launchLlDispatchSend(const LlDispatchArgs& args, int numCtas, cudaStream_t stream) {
  llDispatchSendKernel<<<numCtas, kLlThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t launchLlDispatchComplete(const LlDispatchArgs& args, cudaStream_t stream) {
  llDispatchCompleteKernel<<<1, 1024, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace nccl_moe
