// Dynamic token claims of the high-throughput intranode dispatch (dispatch_lsa.cu): warps take
// the next few source tokens from one counter in the device state instead of a static
// round-robin, so that CTAs that get more NVLink bandwidth store more tokens and the slowest CTAs
// no longer set the end (2 x H200: with the static split 18-32 SMs were 6-15 % slower than 16;
// perf/RESULTS.md, seventh session; why some CTAs get less is not established). Host and device
// (the arithmetic is unit-tested on the CPU with std::atomic: tests/unit/token_claim_test.cc).
//
// The claim word (DeviceState::dispatchClaim) is tag << 32 | next: `tag` is the low 32 bits of
// the sequence number of the dispatch that owns the counter, `next` the first token that no warp
// of that dispatch has claimed yet. A dispatch with sequence number seq claims with
// atomicAdd(word, chunk):
//  - the old value carries tag (uint32)seq: the counter is this launch's; the claim is
//    [next, next + chunk);
//  - any other tag: the word is stale (an earlier launch's, or the zeroed word of a new
//    context). The warp installs tag << 32 | chunk with atomicCAS, which claims [0, chunk); a CAS
//    that fails because a stale add of another warp came in between retries with the value it
//    saw; one that finds the tag installed (another warp won) claims again with a plain add.
// Why every token of [0, numTokens) is stored exactly once per dispatch whose CTAs all pass the
// counts wait (a CTA whose wait times out stores nothing, and its claimed tokens stay unstored;
// the timeout is fatal for the context, and the static split lost that CTA's share the same way):
//  - within a launch the word's tag goes stale -> seq once (a CAS compares all 64 bits against a
//    value with a stale tag, so after the install no CAS succeeds and no add sees a stale tag);
//    every claim after the install is an atomicAdd on the installed counter, so the claims are
//    disjoint, consecutive ranges [0, c), [c, 2c), ... handed out without gaps; the installer's
//    range is [0, c) and the stale adds before it are overwritten (nobody took a token with
//    them: a stale result is never used as an index);
//  - warps stop only after a claim at or past numTokens (or one whose end reaches it), so every
//    index below numTokens is handed out before the last warp leaves;
//  - an add never carries into the tag: a launch finds next == 0 (the previous launch's end
//    store, below), adds at most warps * chunk to it before the install (one stale add per
//    warp: its first claim) and, after the install, next ends at most at numTokens +
//    warps * chunk (one overshooting claim per warp), far below 2^32.
// Across launches (no host reset, CUDA-graph replays): the kernel reads seq = dispatchSeq + 1
// from the state at its start, and the last CTA publishes dispatchSeq = seq at its end, whether
// its waits succeeded or not (finishAndWaitPeers), and then leaves the word as seq << 32 | 0.
// So at the start of dispatch seq the word either is tagged with seq - 1 (stale) or has
// next == 0 (zeroed at creation or by NCCL_MOE_SEQ_START; a fresh counter either way): both
// give [0, chunk) to the first claim. Every launch reaches that end: after a timeout or a
// protocol error (sticky, fatal) its waits give up, at once in every later launch (fatalRaised),
// and it still publishes seq, so launches enqueued or replayed after the failure keep taking new
// sequence numbers (their outputs are undefined and the host refuses new calls: the context must
// be destroyed; the claims stay consistent all the same). Only a kernel fault or a hang stops a
// launch short, and then no later kernel runs on the device context. Replays read dispatchSeq
// from device memory, so each replay is a new sequence number like an eager call.
// The contract relied on: dispatch kernels of one context do not overlap (stream order, as
// dispatchSeq and dispatchArrived already require); claims use device-scope atomics on memory
// only this context's dispatch kernels touch.
#pragma once
#include <stdint.h>
#include "device/kernel_args.h"

namespace nccl_moe {

constexpr int kDispatchClaimTokens = 2;  // tokens per claim when every warp gets several claims

__host__ __device__ inline uint64_t claimWord(uint32_t tag, uint32_t next) { return (uint64_t)tag << 32 | next; }
__host__ __device__ inline uint32_t claimTag(uint64_t word) { return (uint32_t)(word >> 32); }
__host__ __device__ inline uint32_t claimNext(uint64_t word) { return (uint32_t)word; }

// Tokens per claim: kDispatchClaimTokens once there are at least 4 claims of that size per warp,
// else 1 (small batches: a token per warp and claim, as the static split gave).
__host__ __device__ inline int claimChunk(int numTokens, int totalWarps) {
  return (long long)numTokens >= 4LL * kDispatchClaimTokens * totalWarps ? kDispatchClaimTokens : 1;
}

// First token of the claim whose atomicAdd(word, chunk) returned `old`, for a dispatch whose tag
// is `tag`. cas(expected, desired) is an atomicCAS on the word (returns the value it found);
// add() an atomicAdd(word, chunk) (returns the old value). Both are called only when `old` is
// stale, at most once per warp and launch in practice (the warp's first claim).
template <class Cas, class Add>
__host__ __device__ inline uint32_t resolveClaim(uint64_t old, uint32_t tag, uint32_t chunk, Cas cas, Add add) {
  if (claimTag(old) == tag) return claimNext(old);
  const uint64_t installed = claimWord(tag, chunk);
  uint64_t expected = old + chunk;  // the word as this warp's stale add left it
  for (;;) {
    const uint64_t seen = cas(expected, installed);
    if (seen == expected) return 0;  // installed: [0, chunk) is ours
    if (claimTag(seen) == tag) {     // another warp installed the counter: claim from it
      const uint64_t again = add();
      return claimNext(again);       // its tag is `tag`: the counter is never reinstalled
    }
    expected = seen;  // another warp's stale add came in between; try again from its value
  }
}

}  // namespace nccl_moe
