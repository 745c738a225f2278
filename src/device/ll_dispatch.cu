// Low-latency dispatch over LSA: send kernel (no waiting on peers) and completion kernel.
//
// Send (numSms CTAs): warps take (token, k) pairs round-robin, reserve a row with an atomic on
// this rank's per-expert counter, stream the token row (16-byte vectors), cast it to FP8 when
// asked (amax and scale per 128 channels inside half-warps) and store it straight into the
// destination row x[l][me*M + pos] of the owning rank's window, with its scales, srcToken and
// srcK. The last CTA
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
constexpr int kLlUnroll = 8;  // 32-vector steps per batch: 8 * 32 * 8 = 2048 channels = 16 groups

// Sends token t's row (cast to FP8 when asked) to row `row` of rank d's slot.
__device__ void sendRowLl(const LlDispatchArgs& a, char* slot, int t, int row, int lane) {
  const int H = a.hidden, rowVecs = H / 8, groups = H / kFp8GroupSize;
  const size_t rowBytes = a.fp8 ? (size_t)H : (size_t)H * 2;
  const uint4* src = (const uint4*)(a.x + (size_t)t * H);
  for (int base = 0; base < rowVecs; base += 32 * kLlUnroll) {
    uint4 v[kLlUnroll];
#pragma unroll
    for (int u = 0; u < kLlUnroll; ++u) {
      const int idx = base + u * 32 + lane;
      v[u] = idx < rowVecs ? __ldg(src + idx) : make_uint4(0, 0, 0, 0);  // re-read per expert: L2
    }
    if (!a.fp8) {
      uint4* dst = (uint4*)(slot + a.slot.recvX + (size_t)row * rowBytes);
#pragma unroll
      for (int u = 0; u < kLlUnroll; ++u) {
        const int idx = base + u * 32 + lane;
        if (idx < rowVecs) storeNoAllocate(dst + idx, v[u]);
      }
      continue;
    }
    Fp8Scale sc[kLlUnroll];
    uint2* dst = (uint2*)(slot + a.slot.recvX + (size_t)row * rowBytes);
#pragma unroll
    for (int u = 0; u < kLlUnroll; ++u) {
      sc[u] = fp8Scale(groupAmax(v[u]), a.scaleFormat != ncclMoeScaleFp32);  // whole warp shuffles
      const int idx = base + u * 32 + lane;
      if (idx < rowVecs) dst[idx] = castToFp8(v[u], sc[u].inverse);
    }
    if (a.scaleFormat == ncclMoeScaleUe8m0) {
      // The exponent bytes of groups 4j..4j+3 come from steps u = 2i, 2i+1, half-warps 0 and 1.
      uint32_t* s = (uint32_t*)(slot + a.slot.recvScales) + (size_t)row * (groups / 4);
#pragma unroll
      for (int i = 0; i < kLlUnroll / 2; ++i) {
        const uint32_t b0 = sc[2 * i].ue8m0, b2 = sc[2 * i + 1].ue8m0;
        const uint32_t b1 = __shfl_sync(0xffffffffu, b0, 16), b3 = __shfl_sync(0xffffffffu, b2, 16);
        const int word = base / 64 + i;  // 64 vectors = 512 channels per word, base % 256 == 0
        if (lane == 0 && word < groups / 4) s[word] = b0 | (b1 << 8) | (b2 << 16) | (b3 << 24);
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

// Work items are (token, k) pairs, one per warp at a time: 8x more parallelism than one warp per
// token at decode sizes, at the price of re-reading the token row from L2 for each expert.
__global__ void __launch_bounds__(kLlThreads, 1) llDispatchSendKernel(LlDispatchArgs a) {
  const WindowView& w = a.w;
  const int R = w.nRanks, me = w.rank, L = a.numExperts / R, M = a.maxTokens, K = a.topK;
  __shared__ char* peer[kMaxRanks];
  unsigned long long* sends = &w.state->llDispatchSends[a.slotIndex];
  const uint64_t epoch = *(volatile unsigned long long*)sends + 1;
  if (threadIdx.x < R) peer[threadIdx.x] = (char*)ncclGetLsaPointer(w.win, 0, threadIdx.x) + a.slotOff;
  __syncthreads();

  const int lane = threadIdx.x % 32, warpsPerCta = blockDim.x / 32;
  const int items = a.numTokens * K;
  for (int it = blockIdx.x * warpsPerCta + threadIdx.x / 32; it < items; it += gridDim.x * warpsPerCta) {
    const int t = it / K, k = it % K;
    const int64_t e = a.topkIdx[(size_t)t * K + k];
    if (e == -1) continue;
    if (e < -1 || e >= a.numExperts) {
      if (lane == 0) reportError(w.error, kDevBadExpert, t, k, (int)e);
      continue;
    }
    const int ei = (int)e, d = ei / L, l = ei % L;
    int pos = 0;
    if (lane == 0) pos = atomicAdd(&a.posCounter[ei], 1);
    pos = __shfl_sync(0xffffffffu, pos, 0);
    if (pos >= M) {  // only possible with an expert repeated inside a token
      if (lane == 0) reportError(w.error, kDevOverflow, d, pos + 1, M);
      continue;
    }
    const int row = l * R * M + me * M + pos;
    if (lane == 0) {
      ((int*)(peer[d] + a.slot.srcToken))[row] = t;
      ((int*)(peer[d] + a.slot.srcK))[row] = k;
    }
    sendRowLl(a, peer[d], t, row, lane);
  }

  if (!lastCtaToArrive(&w.state->llDispatchArrived[a.slotIndex])) return;
  // Publish the row counts of this send: expert e's rows go to rank e / L, local expert e % L.
  for (int e = threadIdx.x; e < a.numExperts; e += blockDim.x) {
    const int rows = min(atomicExch(&a.posCounter[e], 0), M);
    uint64_t* sig = (uint64_t*)(peer[e / L] + a.slot.dispatchSignals) + (e % L) * R + me;
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
