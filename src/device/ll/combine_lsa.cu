// Low-latency combine over LSA, one partial sum per (token, rank) on NVLink.
//
// Send (numSms CTAs, on every rank as an expert rank): warps share out (source token, chunk)
// items over the tokens the slot's dispatch brought here (T_s of each source s, from its
// dispatch signal). For token t of source s the route entries name this rank's rows of t and
// their weights; the warp sums those rows of the expert output in k order (FP32, weighted),
// rounds the partial to BF16 and stores it into source s's combineRecv[t][me]. Each CTA then
// release-adds its share to combineSignals[me] at every rank (CTA 0: signalTotal - (numCtas - 1),
// the others 1: signalTotal per operation whatever the CTA count); nothing waits for a peer.
// Complete (as the source; only as many CTAs as its own (token, chunk) items need, at most
// maxCtas): wait until every rank's signal is exactly signalTotal * epoch (modulo 2^64; a rank
// ahead is a protocol error), then (token, chunk) items sum the token's partials in rank order
// (FP32) and write BF16.
//
// Several nodes: the kernels are templates on kNet (as in dispatch_lsa.cu): kNet = false is the
// single-node code, unchanged; kNet = true routes remote ranks out of the LSA stores, waits and
// signals, and adds the GIN phases of combine_gin.cuh: partials for remote sources are summed
// the same way into staging rows and put back in batches by the send's last CTA, and the
// completion adds a remote rank's partial from where it landed, in the same rank order.
// The row sums and both halves' item loops live in combine_rows.cuh, shared with the one-launch
// form of small one-shot batches (one_launch_lsa.cu).
#include <algorithm>

#include "device/ll/combine_rows.cuh"

namespace nccl_moe {

template <bool kNet>
__global__ void __launch_bounds__(kLlCombineThreads, 1) llCombineSendKernel(LlCombineArgs a) {
  const WindowView& w = a.w;
  const int R = w.peers.nRanks, me = w.peers.rank;
  __shared__ char* peer[kMaxRanks];
  __shared__ int tokenStart[kMaxRanks + 1];  // prefix of the sources' token counts
  // Ranks that get nothing: a.failed (a rank found failed by this operation's own dispatch is
  // not in it: that operation's outputs are undefined anyway).
  if (threadIdx.x < R) peer[threadIdx.x] = peerWindow(w, threadIdx.x, a.slotOff);
  __syncthreads();
  const char* slot = peer[me];
  if (threadIdx.x == 0) {
    // The completed dispatch of this slot left (epoch << 32) | T_s in each source's signal.
    const volatile uint64_t* sig = (const volatile uint64_t*)(slot + a.slot.dispatchSignals);
    int run = 0;
    for (int s = 0; s < R; ++s) {
      tokenStart[s] = run;
      if ((!kNet || peer[s] != nullptr) && !a.failed.has(s)) run += (int)(sig[s] & 0xffffffffu);  // remote: GIN
    }
    tokenStart[R] = run;
  }
  __syncthreads();
  combineSendItemsLl(a, peer, slot, tokenStart, blockIdx.x, gridDim.x);
  if constexpr (kNet) {
    const int rowVecs = a.hidden / 8;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    __shared__ int netStart[kMaxRanks + 1];  // prefix of the remote sources' records
    recordStartsGin(a, netStart);
    sendPartialsGin<kLlReduceUnroll>(a, netStart, kLlSumVecs, warp, kLlCombineWarps, lane,
                                     [&](unsigned here, int row, float weight, int base, uint4 (&out)[kLlReduceUnroll]) {
                                       const uint4* myRow = (const uint4*)(a.expertOut + (size_t)max(row, 0) * a.hidden);
                                       sumRowsChunk<false>(here, myRow, weight, base, rowVecs, lane, out);
                                     });
  }
  __syncthreads();
  if (threadIdx.x == 0) __threadfence_system();
  __syncthreads();
  for (int r = threadIdx.x; r < R; r += blockDim.x) {
    if ((kNet && peer[r] == nullptr) || a.failed.has(r)) continue;  // remote: postCombineGin
    uint64_t* sig = (uint64_t*)(peer[r] + a.slot.combineSignals) + me;
    const uint64_t share = llCombineSignalShare(blockIdx.x, gridDim.x, a.signalTotal);
    asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(sig), "l"(share) : "memory");
  }
  // The completion (later in stream order) waits for signalTotal * sends: one CTA counts the send.
  if (blockIdx.x == 0 && threadIdx.x == 0) w.state->llCombineSends[a.slotIndex] += 1;
  if constexpr (kNet) {
    if (lastCtaToArrive(&w.state->llCombineArrived[a.slotIndex])) postCombineGin(a);
  }
}

// kWide: more than 32 ranks (sumPartialsWide); otherwise one lane per rank.
template <bool kWide, bool kNet>
__global__ void __launch_bounds__(kLlCombineThreads, 1) llCombineCompleteKernel(LlCombineArgs a) {
  const WindowView& w = a.w;
  const char* slot = (const char*)ncclGetLocalPointer(w.win, a.slotOff);
  const uint64_t epoch = *(volatile unsigned long long*)&w.state->llCombineSends[a.slotIndex];
  const uint64_t* sig = (const uint64_t*)(slot + a.slot.combineSignals);
  // lost[r]: r's partials count as zero (in a.failed, or this launch timed out on it); written by
  // the one thread that handles r.
  __shared__ unsigned char lost[kMaxRanks];
  const unsigned firstRanks = kWide ? 0u : combineFirstRanksLl(a, slot, blockIdx.x);
  bool ok = true;
  if constexpr (kNet) ok = waitRanksGin(a, epoch, lost);
  ok = waitCombineSignalsLl<kNet>(a, sig, epoch, lost) && ok;
  if (!__syncthreads_and(ok)) return;
  combineSumOwnLl<kWide, kNet>(a, slot, lost, blockIdx.x, gridDim.x, firstRanks);
}

cudaError_t launchLlCombineSend(const LlCombineArgs& args, int numCtas, cudaStream_t stream) {
  if (args.net.enabled)
    llCombineSendKernel<true><<<numCtas, kLlCombineThreads, 0, stream>>>(args);
  else
    llCombineSendKernel<false><<<numCtas, kLlCombineThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t launchLlCombineComplete(const LlCombineArgs& args, int maxCtas, cudaStream_t stream) {
  const bool wide = args.w.peers.nRanks > 32;
  // One warp per (token, chunk) item of this rank's tokens: a decode step of 1 token needs 1 CTA.
  const int items = args.numTokens * ((args.hidden / 8 + kLlSumVecs - 1) / kLlSumVecs);
  const int numCtas = std::max(1, std::min(maxCtas, (items + kLlCombineWarps - 1) / kLlCombineWarps));
  if (args.net.enabled && wide)
    llCombineCompleteKernel<true, true><<<numCtas, kLlCombineThreads, 0, stream>>>(args);
  else if (args.net.enabled)
    llCombineCompleteKernel<false, true><<<numCtas, kLlCombineThreads, 0, stream>>>(args);
  else if (wide)
    llCombineCompleteKernel<true, false><<<numCtas, kLlCombineThreads, 0, stream>>>(args);
  else
    llCombineCompleteKernel<false, false><<<numCtas, kLlCombineThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t loadLlCombineNetKernels() {
  cudaFuncAttributes attr;
  cudaError_t err = cudaFuncGetAttributes(&attr, llCombineSendKernel<true>);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, llCombineCompleteKernel<false, true>);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, llCombineCompleteKernel<true, true>);
  return err;
}

}  // namespace nccl_moe
