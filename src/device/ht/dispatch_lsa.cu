// High-throughput intranode dispatch over LSA with direct placement.
//
// One launch of numSms persistent CTAs per dispatch, in three phases:
//  1. notify: CTA 0 writes this rank's counts row (tokens to every rank, then tokens to each of
//     the destination's experts) into every peer's window and release-signals kSigDispatchCounts.
//     Every CTA waits for all rows and derives, for each destination d, the first row of this
//     rank's tokens in d's output (sum of the rows that lower ranks send to d).
//  2. data: warps claim tokens from a counter in the device state, a few at a time
//     (token_claim.h), so that CTAs with more NVLink bandwidth store more tokens; a warp loads a
//     token row once (16-byte vectors) and stores it straight into each destination's output
//     row in that rank's window, with its FP8 scales, its top-k ids rewritten to local expert
//     ids and its weights. Where a row goes depends only on the token (sendPos, sendOffset), not
//     on which warp stores it: the outputs are the same bytes whatever the claims. No staging
//     ring, no receive-side copy: the receiving rank spends no SM on the data.
//  3. done: each CTA release-adds kSigDispatchDone at every peer; the last CTA of the grid waits
//     for every peer's CTAs, so the outputs are complete when the kernel ends on the stream.
// If any destination would receive more than `capacity` rows, every rank sees it in phase 1 (all
// have the full count matrix), writes no data, records kDevOverflow, leaves counts of 0 rows and
// the routing's dispatchEmpty flag set, and still completes phase 3.
#include "device/kernel_args.h"
#include "device/common/peer_sync.cuh"
#include "device/common/vec_io.cuh"
#include "device/ht/store_row.cuh"
#include "device/ht/token_claim.h"

namespace nccl_moe {

constexpr int kDispatchThreads = 512;

// Phase 1 helper: CTA 0 publishes this rank's counts row to every peer.
__device__ void publishCounts(const DispatchArgs& a, char* const* peer, uint64_t seq) {
  const WindowView& w = a.w;
  const int R = w.peers.nRanks, localExperts = a.numExperts / R, rowLen = R + localExperts;
  for (int i = threadIdx.x; i < R * rowLen; i += blockDim.x) {
    const int d = i / rowLen, j = i % rowLen;
    const int v = j < R ? a.routing.tokensPerRank[j] : a.routing.tokensPerExpert[d * localExperts + j - R];
    int* row = (int*)(peer[d] + w.countsOff) + w.peers.rank * rowLen;
    row[j] = v;
  }
  __syncthreads();
  if (threadIdx.x == 0) __threadfence_system();
  __syncthreads();
  for (int d = threadIdx.x; d < R; d += blockDim.x) signalStore(w, d, kSigDispatchCounts, seq);
}

// atomicAdd(claim, chunk), for lane 0 of a warp only. ptxas turns an atomic on a warp-uniform
// address into a warp-aggregated one whose result it shuffles to the lanes right after it, which
// stalls the warp on the atomic's round trip where it is issued instead of where the result is
// used. The address adds %laneid words, 0 in lane 0 (the hardware's lane number; lane 0 is
// threadIdx.x % 32 == 0 in these 1-D blocks), which ptxas cannot prove uniform, so the atomic
// stays a plain one and its latency hides behind the token's stores.
__device__ __forceinline__ unsigned long long claimAdd(unsigned long long* claim, int chunk) {
  unsigned laneId;
  asm volatile("mov.u32 %0, %%laneid;" : "=r"(laneId));
  unsigned long long old;
  asm volatile("atom.global.add.u64 %0, [%1], %2;"
               : "=l"(old)
               : "l"(claim + laneId), "l"((unsigned long long)chunk)
               : "memory");
  return old;
}

// One warp: the first token of the claim whose atomicAdd returned `old` in lane 0 (resolved there,
// token_claim.h), in every lane.
__device__ __forceinline__ int warpResolveClaim(unsigned long long* claim, unsigned long long old, uint32_t tag,
                                                int chunk, int lane) {
  uint32_t first = 0;
  if (lane == 0)
    first = resolveClaim(
        old, tag, (uint32_t)chunk,
        [claim](uint64_t expected, uint64_t desired) {
          return (uint64_t)atomicCAS(claim, (unsigned long long)expected, (unsigned long long)desired);
        },
        [claim, chunk] { return (uint64_t)claimAdd(claim, chunk); });
  return (int)__shfl_sync(0xffffffffu, first, 0);
}

__global__ void __launch_bounds__(kDispatchThreads, 1) dispatchHtIntranodeKernel(DispatchArgs a) {
  const WindowView& w = a.w;
  const int R = w.peers.nRanks, me = w.peers.rank;
  const int localExperts = a.numExperts / R, rowLen = R + localExperts;
  __shared__ char* peer[kMaxHtRanks];
  __shared__ int sendOffset[kMaxHtRanks];
  __shared__ int overflow;
  const uint64_t seq = *(volatile unsigned long long*)&w.state->dispatchSeq + 1;
  // Each warp's first claim goes out now and is resolved after the counts wait, which hides its
  // latency. A dispatch that then stores nothing (overflow, failed wait) has claimed for nothing:
  // the counter is this launch's alone (token_claim.h).
  const int lane = threadIdx.x % 32;
  const int chunk = claimChunk(a.numTokens, gridDim.x * (blockDim.x / 32));
  unsigned long long* const claim = &w.state->dispatchClaim;
  unsigned long long firstClaim = 0;
  if (a.numTokens > 0 && lane == 0) firstClaim = claimAdd(claim, chunk);
  if (threadIdx.x < R) peer[threadIdx.x] = peerWindow(w, threadIdx.x, 0);
  if (threadIdx.x == 0) overflow = 0;
  __syncthreads();

  if (blockIdx.x == 0) publishCounts(a, peer, seq);
  const bool arrived = ctaWaitAllPeers(w, kSigDispatchCounts, seq);

  if (arrived) {
    const int* counts = (const int*)(peer[me] + w.countsOff);  // [R][rowLen], row s from rank s
    for (int d = threadIdx.x; d < R; d += blockDim.x) {
      int before = 0, total = 0;
      for (int s = 0; s < R; ++s) {
        const int c = loadPeerInt(counts + s * rowLen + d);
        if (s < me) before += c;
        total += c;
      }
      sendOffset[d] = before;
      if (blockIdx.x == 0) a.routing.sendOffset[d] = before;  // kept for the combine
      if (total > a.capacity) {
        atomicExch(&overflow, 1);
        if (blockIdx.x == 0) reportError(w.error, kDevOverflow, d, total, a.capacity);
      }
    }
  }
  __syncthreads();
  // CTA 0 leaves this dispatch's counts for the host and for the kernels behind it on the
  // stream: the rows received, or 0 everywhere (and dispatchEmpty) when it delivers nothing,
  // so that a combine or row copy enqueued (or replayed) behind it reads no row.
  if (blockIdx.x == 0) {
    const bool empty = !arrived || overflow;
    const int* counts = (const int*)(peer[me] + w.countsOff);
    for (int j = threadIdx.x; j < 1 + localExperts; j += blockDim.x) {
      int sum = 0;
      for (int s = 0; s < R && !empty; ++s) sum += loadPeerInt(counts + s * rowLen + (j == 0 ? me : R + j - 1));
      a.routing.recvCounts[j] = sum;
      if (a.hostCounts) a.hostCounts[1 + j] = sum;
    }
    if (threadIdx.x == 0) *a.routing.dispatchEmpty = empty ? 1 : 0;
    if (a.hostCounts) {
      __syncthreads();
      if (threadIdx.x == 0) {
        __threadfence_system();  // the counts, then the sequence number that releases them
        *(volatile int*)a.hostCounts = a.hostSeq;
      }
    }
  }

  if (arrived && !overflow && a.numTokens > 0) {
    // Tokens [first, first + chunk) are this warp's. The claim after them goes out (lane 0) as
    // the warp starts its range's last token, and is resolved once that token is stored, so the
    // atomic's round trip hides behind a row's stores. A range that reaches numTokens is the
    // last: every token below it has been handed out (claims are consecutive), so no claim
    // follows it.
    const uint32_t tag = (uint32_t)seq;
    int first = warpResolveClaim(claim, firstClaim, tag, chunk, lane);
    while (first < a.numTokens) {
      const int end = min(first + chunk, a.numTokens);
      const bool more = first + chunk < a.numTokens;
      unsigned long long nextClaim = 0;
      for (int t = first; t < end; ++t) {
        if (more && lane == 0 && t == end - 1) nextClaim = claimAdd(claim, chunk);
        const int pos = lane < R ? a.routing.sendPos[(size_t)t * R + lane] : -1;
        const unsigned destMask = __ballot_sync(0xffffffffu, pos >= 0);
        const int rowIndex = pos >= 0 ? sendOffset[lane] + pos : 0;
        storeSourceToken(a, peer, t, destMask, rowIndex, lane);
      }
      first = more ? warpResolveClaim(claim, nextClaim, tag, chunk, lane) : a.numTokens;
    }
  }
  // The last CTA leaves the claim word to the next dispatch as seq << 32 | 0: every claim whose
  // tokens this launch stored has returned before its warp arrived; the first claims of a launch
  // that stored nothing may land later, but they only add to a word whose tag the next dispatch
  // (seq + 1) already reads as stale.
  if (finishAndWaitPeers(w, kSigDispatchDone, seq, &w.state->dispatchArrived, &w.state->dispatchSeq) &&
      threadIdx.x == 0)
    *(volatile unsigned long long*)claim = claimWord((uint32_t)seq, 0);
}

cudaError_t launchDispatchHtIntranode(const DispatchArgs& args, int numCtas, cudaStream_t stream) {
  dispatchHtIntranodeKernel<<<numCtas, kDispatchThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace nccl_moe
