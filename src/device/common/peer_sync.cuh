// Device primitives for signalling peers over LSA (NVLink load/store) with release/acquire
// semantics at system scope, waits that give up after a timeout, and kernel error reporting.
//
// Signals are monotonic uint64 counters in the receiver's window: signals[kind][srcRank], written
// only by rank srcRank. A wait compares against a target derived from the per-context sequence
// numbers in DeviceState, so nothing is ever reset and CUDA-graph replays stay consistent. Waits
// accept only the exact target (modulo the counter's width): a peer ahead is an error, never a
// match, and the counters may wrap.
#pragma once
#include <stdint.h>
#include <nccl_device.h>
#include "device/kernel_args.h"
#include "device/common/peers.cuh"

namespace nccl_moe {

__device__ __forceinline__ uint64_t* signalPtr(const WindowView& w, int owner, int kind, int src) {
  return (uint64_t*)lsaPointer(w, owner, w.signalsOff) + kind * kMaxRanks + src;
}

// Release-store `value` into peer `peer`'s signals[kind][w.peers.rank]. Orders every store this thread
// (and, through a preceding barrier, its CTA) made before it, for observers on any GPU.
__device__ __forceinline__ void signalStore(const WindowView& w, int peer, int kind, uint64_t value) {
  uint64_t* p = signalPtr(w, peer, kind, w.peers.rank);
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(value) : "memory");
}

// Release-add `value` to peer `peer`'s signals[kind][w.peers.rank].
__device__ __forceinline__ void signalAdd(const WindowView& w, int peer, int kind, uint64_t value) {
  uint64_t* p = signalPtr(w, peer, kind, w.peers.rank);
  asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(p), "l"(value) : "memory");
}

__device__ __forceinline__ uint64_t loadAcquire(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ uint64_t globalTimerNs() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Records the first kernel error of the context (later ones are dropped).
__device__ __forceinline__ void reportError(DeviceError* e, int code, int a, int b, int c) {
  // Claim, payload, fence, then the code: the host reads code first (checkDeviceErrors), so it
  // never sees a code with the payload still unwritten.
  if (atomicCAS(&e->claimed, 0, 1) == 0) {
    e->a = a; e->b = b; e->c = c;
    __threadfence_system();
    *(volatile int*)&e->code = code;
    __threadfence_system();
  }
}

// True once a wait of this context has failed (timeout or protocol error): every later wait
// gives up at once instead of timing out again. Errors that leave the peers in step (overflow)
// and local ones (bad ids) do not count.
__device__ __forceinline__ bool fatalRaised(const DeviceError* e) {
  return *(volatile const int*)&e->fatal != 0;
}

// Records a failed wait in the sticky record and stops every later wait of the context.
__device__ __forceinline__ void raiseFatal(const WindowView& w, int code, int kind, int src, int value) {
  *(volatile int*)&w.error->fatal = 1;
  reportError(w.error, code, kind, src, value);
}

// Position of a peer's sequence value `v` relative to the expected operation number `target`:
// 0 = this operation, < 0 = an earlier one (keep waiting), > 0 = the peer ran more operations
// than this rank (a protocol error). The operation number sits in bits [kShift, 64) of v and is
// compared modulo 2^(64 - kShift), read as signed: peers differ by a few operations at most, so
// the result is exact across the wrap of the counter.
template <int kShift>
__device__ __forceinline__ int64_t seqDistance(uint64_t v, uint64_t target) {
  return (int64_t)(((v >> kShift) - target) << kShift) >> kShift;
}

// Low-latency mode's failed-rank set (DeviceState::failedRanks): whether a wait already gave up
// on rank r, and the giving up itself: r joins the set (device word and host-mapped mirror) and
// the local record says which rank and which wait (kDevRankFailed; the context stays usable).
// Waits consult the device word only once their value is late (the slow path), so that the
// set costs nothing while every peer answers.
__device__ __forceinline__ bool rankFoundFailed(const WindowView& w, int r) {
  return (*(volatile const unsigned int*)&w.state->failedRanks[r / 32] >> (r % 32)) & 1u;
}
__device__ __forceinline__ void markRankFailed(const WindowView& w, int kind, int r, int value) {
  const unsigned int bit = 1u << (r % 32);
  atomicOr(&w.state->failedRanks[r / 32], bit);
  atomicOr_system(w.failedHost + r / 32, bit);
  __threadfence_system();
  reportError(w.localError, kDevRankFailed, kind, r, value);
}

// How a wait ended.
enum WaitOutcome : int {
  kWaitArrived = 0,     // the value is exactly the target
  kWaitPeerFailed = 1,  // kSoft only: `src` timed out now or earlier (in the failed-rank set)
  kWaitFatal = 2,       // timeout (not kSoft), peer ahead, or the context already failed
};

// Waits until the operation number in the value that load() returns (an acquire read of a signal:
// an LSA word here, a GIN signal in net/) is exactly `target`; *seen receives the value read.
// A peer that is ahead is a protocol error (kDevPeerAhead, fatal: recorded on the rank
// that sees it, whose later waits give up at once, with the operations it is ahead: the excess
// divided by perOp, the signal's steps per operation, rounded up); no value ever satisfies a
// wait but the expected one. Ends with kWaitFatal on that, after timeoutNs (kDevTimeout, with
// `kind` and `src` for the message; kSoft: kWaitPeerFailed and src joins the failed-rank set), or
// at once if another wait of the context already failed.
template <int kShift, bool kSoft, class Load>
__device__ __forceinline__ int waitSeqCore(const WindowView& w, Load load, uint64_t target, int kind, int src,
                                           uint64_t* seen, uint64_t perOp) {
  uint64_t v = load();
  int64_t d = seqDistance<kShift>(v, target);
  const uint64_t start = d < 0 ? globalTimerNs() : 0;
  while (d < 0) {
    for (int i = 0; i < 64 && d < 0; ++i) {
      v = load();
      d = seqDistance<kShift>(v, target);
    }
    if (d >= 0) break;
    if (fatalRaised(w.error)) return kWaitFatal;
    if (kSoft && rankFoundFailed(w, src)) return kWaitPeerFailed;
    if (globalTimerNs() - start > (uint64_t)w.timeoutNs) {
      if (kSoft) {
        markRankFailed(w, kind, src, (int)v);
        return kWaitPeerFailed;
      }
      raiseFatal(w, kDevTimeout, kind, src, (int)v);
      return kWaitFatal;
    }
  }
  if (seen) *seen = v;
  if (d == 0) return kWaitArrived;
  const uint64_t ops = ((uint64_t)d + perOp - 1) / perOp;
  raiseFatal(w, kDevPeerAhead, kind, src, ops > INT32_MAX ? INT32_MAX : (int)ops);
  return kWaitFatal;
}

// The high-throughput form: every failure is fatal. Returns false on failure, at once if the
// context already failed.
template <int kShift, class Load>
__device__ __forceinline__ bool waitSeqOn(const WindowView& w, Load load, uint64_t target, int kind,
                                          int src, uint64_t* seen, uint64_t perOp) {
  return waitSeqCore<kShift, false>(w, load, target, kind, src, seen, perOp) == kWaitArrived;
}

// The low-latency form (failed-rank set): a timeout puts `src` into the set instead of failing the
// context; a peer ahead is still fatal.
template <int kShift>
__device__ __forceinline__ int waitSeqLl(const WindowView& w, const uint64_t* p, uint64_t target, int kind, int src,
                                         uint64_t* seen = nullptr, uint64_t perOp = 1) {
  return waitSeqCore<kShift, true>(w, [p] { return loadAcquire(p); }, target, kind, src, seen, perOp);
}

// waitSeqOn for the LSA word *p, written by a peer with release semantics.
template <int kShift>
__device__ __forceinline__ bool waitSeq(const WindowView& w, const uint64_t* p, uint64_t target,
                                        int kind, int src, uint64_t* seen = nullptr,
                                        uint64_t perOp = 1) {
  return waitSeqOn<kShift>(w, [p] { return loadAcquire(p); }, target, kind, src, seen, perOp);
}

// Waits until this rank's signals[kind][src] holds exactly `target` (see waitSeq).
__device__ __forceinline__ bool waitSignal(const WindowView& w, int kind, int src, uint64_t target,
                                           uint64_t perOp) {
  return waitSeq<0>(w, signalPtr(w, w.peers.rank, kind, src), target, kind, src, nullptr, perOp);
}

// The calling CTA's threads end their part of a launch; returns true in exactly one CTA, the last
// to arrive, once every other CTA's stores are ordered before it (system scope). `arrived` counts
// the CTAs of this launch; the last CTA resets it for the next launch.
__device__ __forceinline__ bool lastCtaToArrive(unsigned int* arrived) {
  __shared__ bool isLast;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();
    isLast = atomicAdd(arrived, 1u) == gridDim.x - 1;
    if (isLast) {
      *arrived = 0;
      __threadfence_system();
    }
  }
  __syncthreads();
  return isLast;
}

// Each thread i < lsaSize waits for signals[kind][lsaBase + i] == target (perOp: see waitSeq):
// every rank of this node (all ranks on one node); then the CTA agrees on success.
__device__ __forceinline__ bool ctaWaitAllPeers(const WindowView& w, int kind, uint64_t target,
                                                uint64_t perOp = 1) {
  bool ok = true;
  for (int i = threadIdx.x; i < w.peers.lsaSize; i += blockDim.x)
    ok &= waitSignal(w, kind, w.peers.lsaBase + i, target, perOp);
  return __syncthreads_and(ok) != 0;
}

// Every CTA calls this once at its end. Signals `kind` (+1) to every rank of this node, then the
// last CTA to arrive waits for all their CTAs (target numCtas * seq); unless kDeferPublish, it
// publishes seq as completed. Returns true in that CTA (false elsewhere) once the wait is over.
// `arrived` counts finished CTAs of this launch; `seqSlot` is the context's sequence counter.
template <bool kDeferPublish = false>
__device__ __forceinline__ bool finishAndWaitPeers(const WindowView& w, int kind, uint64_t seq,
                                                   unsigned int* arrived,
                                                   unsigned long long* seqSlot) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();
    for (int i = 0; i < w.peers.lsaSize; ++i) signalAdd(w, w.peers.lsaBase + i, kind, 1);
  }
  if (!lastCtaToArrive(arrived)) return false;
  ctaWaitAllPeers(w, kind, (uint64_t)gridDim.x * seq, gridDim.x);
  if (kDeferPublish) return true;
  if (threadIdx.x == 0) {
    *(volatile unsigned long long*)seqSlot = seq;
    __threadfence();
  }
  return true;
}

}  // namespace nccl_moe
