// Low-latency dispatch over LSA: send kernel (no waiting on peers) and completion kernel.
//
// A token crosses NVLink once per destination rank (not once per expert):
// Send (numSms CTAs of 16 warps): each CTA takes rounds of up to 16 tokens. Phase 1, one warp per
// token: every valid (t, k) reserves row pos of its expert with an atomic on this rank's
// per-expert counter; the warp writes the token's route entries (row and weight of each k, -1
// for k on other ranks) to every rank, srcToken of each row to its owner, and the mask of the
// ranks the token goes to into this rank's tokenRanks[t]. Phase 2, all warps of the CTA: (token,
// chunk of 2048 channels) items; the warp loads the chunk once, casts it to FP8 when asked (amax
// and scale per 128 channels inside half-warps) and stores it, with its scales, into the row of
// the token's first expert on every destination rank. The last CTA to finish writes the row
// counts recvCounts[l][me] at every rank, then publishes ((epoch mod 2^32) << 32) | T to each
// rank's dispatchSignals[me] with release semantics and clears the counters.
//
// Complete (numSms CTAs): every CTA waits (acquire, with the context timeout) for exactly this
// slot's epoch (modulo 2^32, so the 64-bit epoch may wrap; a source ahead is a protocol error)
// from every source; then CTA 0 sums the per-expert counts and all warps copy each received
// token from its first expert row to its other expert rows on this rank.
// Bad input of this rank (ids outside [-1, E), an expert repeated within a token) goes to the
// local error record: the entry is dropped and the operation completes on every rank.
//
// Several nodes: the kernels are templates on kNet. kNet = false is the single-node code,
// unchanged; kNet = true routes remote ranks out of every LSA store, wait and signal above (they
// have no NVLink pointer) and adds the GIN phases of dispatch_gin.cuh: the same routing pass and
// FP8 cast write a record per (token, remote rank) into the staging rows, the last CTA puts them,
// and the completion waits for the remote sources and fans their records out. A GIN phase inside
// these kernels rather than separate kernels: the rows of remote experts are reserved by the same
// per-expert atomics and the token is read and cast once for all its destinations, and no launch
// is added to either half of the split.
// The routing, chunk stores and completion body live in dispatch_rows.cuh, shared with the
// one-launch form of small one-shot batches (one_launch_lsa.cu).
#include "device/ll/dispatch_rows.cuh"

namespace nccl_moe {

template <bool kNet>
__global__ void __launch_bounds__(kLlThreads, 1) llDispatchSendKernel(LlDispatchArgs a) {
  const WindowView& w = a.w;
  const int R = w.peers.nRanks, me = w.peers.rank, L = a.numExperts / R, M = a.maxTokens, T = a.numTokens;
  __shared__ char* peer[kMaxRanks];
  __shared__ LlTokenRoute route[kLlWarps];
  unsigned long long* sends = &w.state->llDispatchSends[a.slotIndex];
  const uint64_t epoch = *(volatile unsigned long long*)sends + 1;
  if (threadIdx.x < R) peer[threadIdx.x] = peerWindow(w, threadIdx.x, a.slotOff);
  __syncthreads();
  char* mySlot = peer[me];

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int chunks = (a.hidden / 8 + kLlChunkVecs - 1) / kLlChunkVecs;
  // Tokens per CTA and round: spread the tokens over all CTAs, at most one per warp.
  const int perRound = min(kLlWarps, (T + (int)gridDim.x - 1) / (int)gridDim.x);
  for (int first = blockIdx.x * perRound; first < T; first += gridDim.x * perRound) {
    const int n = min(perRound, T - first);
    if (warp < n) routeTokenLl<kNet>(a, peer, mySlot, first + warp, &route[warp], lane, a.posCounter);
    __syncthreads();
    for (int item = warp; item < n * chunks; item += kLlWarps)
      sendChunkLl<kNet>(a, peer, route[item / chunks], first + item / chunks, item % chunks, lane);
    __syncthreads();  // route[] is rewritten by the next round
  }

  if (!lastCtaToArrive(&w.state->llDispatchArrived[a.slotIndex])) return;
  // Row counts first (plain stores), then the signals that release them: expert e's rows go to
  // rank e / L, local expert e % L.
  for (int e = threadIdx.x; e < a.numExperts; e += blockDim.x) {
    const int rows = min(atomicExch(&a.posCounter[e], 0), M);
    if (a.failed.has(e / L)) continue;  // nothing for a failed rank
    if (kNet && peer[e / L] == nullptr)  // the counts row of that remote rank, put with its records
      ((int*)(netLocal(w, a.net.countsStage) + (size_t)remoteIndex(w.peers, e / L) * a.net.countsBytes))[e % L] = rows;
    else
      ((int*)(peer[e / L] + a.slot.recvCounts))[(e % L) * R + me] = rows;
  }
  __syncthreads();
  if (threadIdx.x == 0) __threadfence_system();
  __syncthreads();
  if constexpr (kNet) postDispatchGin(a);
  if (threadIdx.x < R && (!kNet || peer[threadIdx.x] != nullptr) && !a.failed.has(threadIdx.x)) {
    uint64_t* sig = (uint64_t*)(peer[threadIdx.x] + a.slot.dispatchSignals) + me;
    const uint64_t value = (epoch << 32) | (uint64_t)T;
    asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(sig), "l"(value) : "memory");
  }
  if (threadIdx.x == 0) *(volatile unsigned long long*)sends = epoch;
}

template <bool kNet>
__global__ void __launch_bounds__(kLlThreads, 1) llDispatchCompleteKernel(LlDispatchArgs a) {
  char* slot = (char*)ncclGetLocalPointer(a.w.win, a.slotOff);
  const uint64_t epoch = *(volatile unsigned long long*)&a.w.state->llDispatchSends[a.slotIndex];
  completeDispatchLl<kNet>(a, slot, epoch, blockIdx.x, gridDim.x, [] {});
}

cudaError_t launchLlDispatchSend(const LlDispatchArgs& args, int numCtas, cudaStream_t stream) {
  if (args.net.enabled)
    llDispatchSendKernel<true><<<numCtas, kLlThreads, 0, stream>>>(args);
  else
    llDispatchSendKernel<false><<<numCtas, kLlThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t launchLlDispatchComplete(const LlDispatchArgs& args, int numCtas, cudaStream_t stream) {
  if (args.net.enabled)
    llDispatchCompleteKernel<true><<<numCtas, kLlThreads, 0, stream>>>(args);
  else
    llDispatchCompleteKernel<false><<<numCtas, kLlThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t loadLlDispatchNetKernels() {
  cudaFuncAttributes attr;
  cudaError_t err = cudaFuncGetAttributes(&attr, llDispatchSendKernel<true>);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, llDispatchCompleteKernel<true>);
  return err;
}

}  // namespace nccl_moe
