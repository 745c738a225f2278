// Low-latency one-shot calls of small batches on one node, one launch each (kernel_args.h, "One-
// launch form"; the host picks it: llOneLaunchChosen). Same protocol, rows, signals and bits as
// the two-launch form (dispatch_lsa.cu, combine_lsa.cu), whose pieces it runs (dispatch_rows.cuh,
// combine_rows.cuh), so ranks may use either form in the same operation.
//
// What it removes from a two-launch 1-token operation (perf/RESULTS.md: dispatch 19.7 µs =
// send 13.6 + completion 9.0, combine 15.4 = 11.1 + 7.0, GPU time, 2 x H200):
//  - the second launch, and the second kernel's prologue (its own reads of the epoch and the
//    window, after the first kernel's end has drained every store);
//  - in the dispatch send, the grid-wide end: a system-scope fence and an atomic per CTA on the
//    last-CTA counter, the last CTA's reset fence, the global per-expert row counters (one atomic
//    per (token, k) and one exchange per expert to read and clear them), and the fence before the
//    signals: one CTA sends every token here, with its row counters in shared memory, and its
//    barrier orders its stores before each signalling thread's release (the PTX model's release
//    is cumulative over what the barrier ordered before it; NCCL's LSA barrier arrives so);
//  - the wait for the token's data before the routing: each warp loads its first chunk first.
// What stays: the stores over NVLink and their acknowledgement before the release, the peers'
// signals, the counts and the fan-out in local HBM, the combine's sums.
//
// Dispatch, grid G (the same on every launch of a context):
//  1. every CTA's thread 0 takes a ticket from the slot's counter: ticket % G is the CTA's role,
//     ticket / G the launch's number on the slot; role 0 is the launch's first CTA to run. Role 0
//     alone reads the slot's send count (this operation's epoch - 1) and stores the epoch back.
//     A grid of one CTA (G = 1, the host's size for R * maxTokens * chunks <= 32) takes no ticket.
//  2. role 0 sends all T tokens (sendAllLl) and signals every rank, then runs the completion as
//     its CTA 0 (waits for every source, writes the counts, takes the first fan-out items) and,
//     right after its waits, releases go = (launch + 1, epoch) (32 bits each). Roles 1..G-1 wait
//     for that go (a local word: they poll nothing over NVLink while role 0 sends), then run the
//     same completion as CTA `role` with its epoch (their waits find every value there, or the
//     rank role 0 put into the failed-rank set). Role 0 never waits for another CTA.
// Combine, grid G (at most the sources' largest possible send needs): every CTA reads the T_s
// of the slot's dispatch signals and computes the CTAs the send items need, n; CTAs >= n
// return. The n CTAs send their partials and add their llCombineSignalShare(cta, n) to every
// rank's signal (signalTotal in all); the last to arrive at a per-slot counter (with n = 1, the
// only one) advances the slot's combine count, waits for every rank's signalTotal * epoch and
// sums this rank's T tokens. Waits are the completions' (timeout: the late rank joins the
// failed-rank set; a failed rank is neither sent to nor waited for).
// Own slot accesses go through the LSA address of this rank (peer[me]), the one its stores used
// (ncclGetLocalPointer, which the two-launch completions use, returns the same address).
#include "device/ll/dispatch_rows.cuh"
#include "device/ll/combine_rows.cuh"

namespace nccl_moe {

namespace {

__device__ __forceinline__ unsigned long long loadAcquireGpu(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void storeReleaseGpu(unsigned long long* p, unsigned long long v) {
  asm volatile("st.release.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

}  // namespace

// The send of all T tokens by one CTA, as llDispatchSendKernel<false> with one CTA but for:
// row counters in shared memory (rows: [E], zero on entry), each warp's first chunk loaded before
// (v0: by the caller, while the CTA's role was being decided), and no grid-wide end (the barrier
// before the signals orders every store of the CTA before each signalling thread's release).
// epoch: this operation's number on the slot (a shared word, final by the first barrier here).
// Within a round of kLlWarps tokens, token j is routed by warp kLlWarps - 1 - j, with its top-k
// entry for the first round loaded by the caller (e0, w0: routing warps of round 0), while the
// chunk items, from warp 0 up, are cast to FP8 (castChunkLl: it needs no route): with a few
// tokens, the routing and the casts run on different warps, side by side. The row counts go out
// right after the last round's routing, from the CTA's last threads, before the rows' stores.
__device__ void sendAllLl(const LlDispatchArgs& a, char* const* peer, int* rows, const unsigned long long& epoch,
                          const uint4 (&v0)[kLlUnroll], int64_t e0, float w0) {
  const WindowView& w = a.w;
  const int R = w.peers.nRanks, me = w.peers.rank, L = a.numExperts / R, M = a.maxTokens, T = a.numTokens;
  __shared__ LlTokenRoute route[kLlWarps];
  char* mySlot = peer[me];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int chunks = llSendChunks(a.hidden);
  // Row counts (every expert, zeros included: nothing of an earlier use of the slot survives):
  // expert e's rows go to rank e / L, local expert e % L.
  auto storeCounts = [&] {
    for (int e = blockDim.x - 1 - threadIdx.x; e < a.numExperts; e += blockDim.x) {
      if (a.failed.has(e / L)) continue;  // nothing for a failed rank
      ((int*)(peer[e / L] + a.slot.recvCounts))[(e % L) * R + me] = min(rows[e], M);
    }
  };
  uint4 v[kLlUnroll];
#pragma unroll
  for (int u = 0; u < kLlUnroll; ++u) v[u] = v0[u];
  for (int first = 0; first < T; first += kLlWarps) {  // rounds of kLlWarps tokens
    const int n = min(kLlWarps, T - first), items = n * chunks;
    LlFp8Chunk f;
    if (warp < items) {
      if (first > 0) loadChunkLl(a, first + warp / chunks, warp % chunks, lane, v);
      if (a.fp8) castChunkLl(a, v, f);
    }
    const int j = kLlWarps - 1 - warp;  // this warp's token in the round, if j < n
    if (j < n) {
      if (first == 0) routeLoadedTokenLl<false>(a, peer, mySlot, j, &route[j], lane, rows, e0, w0);
      else routeTokenLl<false>(a, peer, mySlot, first + j, &route[j], lane, rows);
    }
    __syncthreads();
    if (first + kLlWarps >= T) storeCounts();  // rows[] is final after the last round's routing
    for (int item = warp; item < items; item += kLlWarps) {
      if (item != warp) {
        loadChunkLl(a, first + item / chunks, item % chunks, lane, v);
        if (a.fp8) castChunkLl(a, v, f);
      }
      if (a.fp8) storeCastChunkLl<false>(a, peer, route[item / chunks], item % chunks, lane, f);
      else storeChunkLl<false>(a, peer, route[item / chunks], item % chunks, lane, v);
    }
    __syncthreads();  // route[] is rewritten by the next round; the last: every store before the signals
  }
  if (T == 0) {
    storeCounts();
    __syncthreads();
  }
  // The signals that release the counts, rows and routes.
  if (threadIdx.x < R && !a.failed.has(threadIdx.x)) {
    uint64_t* sig = (uint64_t*)(peer[threadIdx.x] + a.slot.dispatchSignals) + me;
    const uint64_t value = (epoch << 32) | (uint64_t)T;
    asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(sig), "l"(value) : "memory");
  }
}

// Dispatch. With a grid of one CTA (the host sizes it: R * maxTokens * row chunks <= 32 items),
// that CTA is role 0 without a ticket: it takes none and releases no `go` (there is no other CTA
// to wait for it; the ticket counter and `go` stay as they were, so a later launch of another
// grid size on the slot still finds them consistent), and the send count is read and advanced by
// a thread whose warp has no work in the first steps (warp kLlWarps - 2; the count is first used
// by the signals, after the send's barriers).
__global__ void __launch_bounds__(kLlThreads, 1) llDispatchOneLaunchKernel(LlDispatchArgs a) {
  extern __shared__ int expertRows[];  // [E]: role 0's rows per expert in this send
  const WindowView& w = a.w;
  const int R = w.peers.nRanks, me = w.peers.rank, G = gridDim.x, s = a.slotIndex;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  DeviceState* st = w.state;
  unsigned long long* go = &st->llOneLaunchGo[s];
  const bool solo = G == 1;
  const bool countThread = solo && threadIdx.x == kLlThreads - 64;  // warp kLlWarps - 2, lane 0
  __shared__ char* peer[kMaxRanks];
  __shared__ int roleOf;
  __shared__ unsigned long long launchOf, epochOf, goEpoch;
  unsigned long long sent = 0;
  if (countThread) {
    sent = *(volatile unsigned long long*)&st->llDispatchSends[s];  // used after the barrier below
  } else if (!solo && threadIdx.x == 0) {
    // Ticket and count are independent loads: both in flight at once. Only role 0 reads or
    // writes the slot's send count in this launch (the others learn the epoch from `go`).
    const unsigned long long ticket = atomicAdd(&st->llOneLaunchTickets[s], 1ull);
    sent = *(volatile unsigned long long*)&st->llDispatchSends[s];
    roleOf = (int)(ticket % (unsigned)G);
    launchOf = ticket / (unsigned)G;
    epochOf = sent + 1;
    if (roleOf == 0) *(volatile unsigned long long*)&st->llDispatchSends[s] = sent + 1;
  }
  // While the role is decided: the first round's token data, which only role 0 will use (the
  // others fetch it for nothing: one chunk per warp), and the routing warps' top-k entries.
  const int firstItems = min(kLlWarps, a.numTokens) * llSendChunks(a.hidden);
  uint4 v0[kLlUnroll];
  if (warp < firstItems) loadChunkLl(a, warp / llSendChunks(a.hidden), warp % llSendChunks(a.hidden), lane, v0);
  int64_t e0 = -1;
  float w0 = 1.0f;
  if (kLlWarps - 1 - warp < a.numTokens) loadTopkLl(a, kLlWarps - 1 - warp, lane, &e0, &w0);
  if (threadIdx.x < R) peer[threadIdx.x] = peerWindow(w, threadIdx.x, a.slotOff);
  for (int e = threadIdx.x; e < a.numExperts; e += blockDim.x) expertRows[e] = 0;
  __syncthreads();
  if (countThread) {  // read by the signals and the completion, after the send's barriers
    epochOf = sent + 1;
    *(volatile unsigned long long*)&st->llDispatchSends[s] = sent + 1;
  }
  const int role = solo ? 0 : roleOf;
  // Role 0 releases (launch + 1) mod 2^32 in the high half of `go` and the epoch mod 2^32 in the
  // low half (all that the dispatch signals compare) once its waits are over.
  const unsigned long long goValue = solo ? 0 : ((launchOf + 1) << 32) | (epochOf & 0xffffffffull);
  if (role == 0) {
    sendAllLl(a, peer, expertRows, epochOf, v0, e0, w0);
  } else {
    if (threadIdx.x == 0) {
      unsigned long long v;
      while (((v = loadAcquireGpu(go)) >> 32) != (goValue >> 32)) __nanosleep(128);
      goEpoch = v & 0xffffffffull;
    }
    __syncthreads();
  }
  completeDispatchLl<false>(a, peer[me], role == 0 ? epochOf : goEpoch, role, G, [&] {
    if (role == 0 && !solo && threadIdx.x == 0) storeReleaseGpu(go, goValue);
  });
}

// At most 32 ranks (the host's choice): one lane per rank in the sums, as the two-launch
// completion's narrow form (the wide form ran out of the 128 registers of 512 threads here).
__global__ void __launch_bounds__(kLlCombineThreads, 1) llCombineOneLaunchKernel(LlCombineArgs a) {
  const WindowView& w = a.w;
  const int R = w.peers.nRanks, me = w.peers.rank, s = a.slotIndex;
  __shared__ char* peer[kMaxRanks];
  __shared__ int tokenStart[kMaxRanks + 1];  // prefix of the sources' token counts
  __shared__ bool finisher;
  __shared__ unsigned long long epochOf;
  // The slot's combine count + 1, read early (off the finisher's path): only the finisher uses its
  // read, and then writes the count back.
  if (threadIdx.x == 0) epochOf = *(volatile unsigned long long*)&w.state->llCombineSends[s] + 1;
  const char* mine = peerWindow(w, me, a.slotOff);
  // The warp's first item's route entry (combineSendItemsLl), loaded with the signals below for
  // the guess that every source sent as many tokens as this rank (item = (source, token, chunk)
  // in that order); used only where the T_s confirm it.
  const int chunks = (a.hidden / 8 + kLlSumVecs - 1) / kLlSumVecs;
  const int lane = threadIdx.x % 32, T = a.numTokens;
  int2 guessSt = make_int2(-1, -1), guessEntry = make_int2(-1, 0);
  if (T > 0) {
    const int f = ((int)blockIdx.x * kLlCombineWarps + (int)threadIdx.x / 32) / chunks;
    if (f / T < R) {
      guessSt = make_int2(f / T, f % T);
      guessEntry = loadRouteEntryLl((const LlRouteEntry*)(mine + a.slot.route), guessSt.x, guessSt.y, a.maxTokens,
                                    a.topK, lane);
    }
  }
  if (threadIdx.x < R) {
    const int r = threadIdx.x;
    peer[r] = peerWindow(w, r, a.slotOff);
    // The completed dispatch of this slot left (epoch << 32) | T_r in each source's signal.
    const volatile uint64_t* sig = (const volatile uint64_t*)(mine + a.slot.dispatchSignals);
    tokenStart[r + 1] = a.failed.has(r) ? 0 : (int)(sig[r] & 0xffffffffu);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    tokenStart[0] = 0;
    for (int r = 0; r < R; ++r) tokenStart[r + 1] += tokenStart[r];
  }
  __syncthreads();
  const char* slot = peer[me];
  const int ctas = llOneLaunchCtas((long long)tokenStart[R] * chunks, (int)gridDim.x);
  if ((int)blockIdx.x >= ctas) return;
  combineSendItemsLl(a, peer, slot, tokenStart, blockIdx.x, ctas, guessSt, guessEntry);
  __syncthreads();
  for (int r = threadIdx.x; r < R; r += blockDim.x) {
    if (a.failed.has(r)) continue;
    uint64_t* sig = (uint64_t*)(peer[r] + a.slot.combineSignals) + me;
    const uint64_t share = llCombineSignalShare(blockIdx.x, ctas, a.signalTotal);
    asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(sig), "l"(share) : "memory");
  }
  // The finisher: the last working CTA to get here. It alone advances the slot's combine count
  // (the two-launch send's CTA 0 does that).
  if (threadIdx.x == 0) {
    bool last = true;
    if (ctas > 1) {
      unsigned int* arrived = &w.state->llOneLaunchArrived[s];
      last = atomicAdd(arrived, 1u) == (unsigned)ctas - 1;
      if (last) *arrived = 0;
    }
    if (last) *(volatile unsigned long long*)&w.state->llCombineSends[s] = epochOf;
    finisher = last;
  }
  __syncthreads();
  if (!finisher) return;
  const uint64_t epoch = epochOf;
  const uint64_t* sig = (const uint64_t*)(slot + a.slot.combineSignals);
  // lost[r]: r's partials count as zero (in a.failed, or this launch timed out on it).
  __shared__ unsigned char lost[kMaxRanks];
  const unsigned firstRanks = combineFirstRanksLl(a, slot, 0);  // overlaps the waits
  if (!__syncthreads_and(waitCombineSignalsLl<false>(a, sig, epoch, lost))) return;
  combineSumOwnLl<false, false>(a, slot, lost, 0, 1, firstRanks);
}

cudaError_t launchLlDispatchOneLaunch(const LlDispatchArgs& args, int maxCtas, cudaStream_t stream) {
  const size_t rowBytes = args.fp8 ? (size_t)args.hidden : (size_t)args.hidden * 2;
  const long long items = (long long)args.w.peers.nRanks * args.maxTokens * llDispatchChunks(rowBytes);
  const size_t shared = (size_t)args.numExperts * sizeof(int);
  llDispatchOneLaunchKernel<<<llOneLaunchCtas(items, maxCtas), kLlThreads, shared, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t launchLlCombineOneLaunch(const LlCombineArgs& args, int maxCtas, cudaStream_t stream) {
  const int chunks = (args.hidden / 8 + kLlSumVecs - 1) / kLlSumVecs;
  const int ctas = llOneLaunchCtas((long long)args.w.peers.nRanks * args.maxTokens * chunks, maxCtas);
  llCombineOneLaunchKernel<<<ctas, kLlCombineThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t prepareLlOneLaunchKernels(int maxExperts) {
  cudaError_t err = cudaFuncSetAttribute(llDispatchOneLaunchKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         maxExperts * (int)sizeof(int));
  cudaFuncAttributes attr;
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, llCombineOneLaunchKernel);
  return err;
}

}  // namespace nccl_moe
