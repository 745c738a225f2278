// The kernels' layer over ncclGin (NCCL's GPU-initiated networking): a staged region put with a
// count signal, and a signal wait with the library's timeout and error record. Kernels use
// these instead of nccl_device/gin.h directly (INTERNODE.md §1).
//
// Ordering (NCCL's contract, INTERNODE.md §2): a put's signal becomes visible at the target only
// after the payload of that put and of every earlier put on the same context to the same peer.
// So a batch of puts to one peer on one context, the last carrying the signal, publishes all of
// them; never split one message over contexts. Payloads are never polled: only signals mean
// "arrived".
#pragma once
#include <stddef.h>
#include <stdint.h>
#include <nccl_device.h>
#include "device/kernel_args.h"
#include "device/common/peer_sync.cuh"

namespace nccl_moe {

// The GIN context of world rank r's signals: every put to r and r's own waits use it (signals
// belong to a context, and one context keeps the puts to r ordered). Ranks spread over the
// contexts NCCL gave.
__device__ __forceinline__ int ginContextOf(const ncclDevComm& dc, int r) {
  return r % (int)dc.ginContextCount;
}

// Puts bytes [srcOff, srcOff + bytes) of this rank's window `win` (a staged region: user data
// must be copied into the window first) to [dstOff, dstOff + bytes) of world rank `peer`'s
// window, and adds `count` to `peer`'s GIN signal `signal` once they (and the earlier puts of
// gin's context to `peer`) have landed; gin must be on ginContextOf(peer). One thread of `coop` posts the descriptor; every thread
// of coop calls it. The source may be rewritten only after gin.flush(coop), or once `peer` has
// seen the signal (the payload landed, so its source was read).
template <class Coop>
__device__ __forceinline__ void putWithSignal(const ncclGin& gin, ncclWindow_t win, int peer, size_t dstOff,
                                              size_t srcOff, size_t bytes, ncclGinSignal_t signal,
                                              uint64_t count, Coop coop) {
  gin.put(ncclTeamWorld(gin.comm), peer, win, dstOff, win, srcOff, bytes, ncclGin_SignalAdd{signal, count},
          ncclGin_None{}, coop);
}

// Waits until GIN signal `signal` of gin's context holds exactly `target` (the contract of
// waitSeqOn, peer_sync.cuh: a value past the target is a peer ahead, kDevPeerAhead; none within
// w.timeoutNs is kDevTimeout; both fatal, recorded in w.error with kWaitGinSignal and `src`, the
// rank whose puts the signal counts, so that the host reports which peer never arrived).
// perOp: signal steps per operation. Returns false on failure, at once if the context already
// failed.
__device__ __forceinline__ bool waitGinSignal(const WindowView& w, const ncclGin& gin, ncclGinSignal_t signal,
                                              uint64_t target, int src, uint64_t perOp = 1) {
  return waitSeqOn<0>(w, [&] { return gin.readSignal(signal); }, target, kWaitGinSignal, src, nullptr, perOp);
}

// The low-latency form (waitSeqLl): a timeout puts `src` into the failed-rank set; returns a
// WaitOutcome.
__device__ __forceinline__ int waitGinSignalLl(const WindowView& w, const ncclGin& gin, ncclGinSignal_t signal,
                                               uint64_t target, int src, uint64_t perOp = 1) {
  return waitSeqCore<0, true>(w, [&] { return gin.readSignal(signal); }, target, kWaitGinSignal, src, nullptr,
                              perOp);
}

}  // namespace nccl_moe
