// What the internode high-throughput kernels share (dispatch_gin.cu, combine_gin.cu): puts and
// waits of the channels (their arithmetic: net/device/channels.h), and the end-of-operation
// barrier with the rail peers. Device code.
//
// Channels (HtNetArgs): a dense list of `total` slots is cut into chunks (ChannelChunks::chunk);
// chunk k belongs to channel k % S (S = CTAs = config.numSms, the same on every rank). A channel
// puts its chunks to one peer in increasing k on its GIN context (channelContext: channels spread
// over the contexts NCCL gave, so that a NIC, or the plugin, works on several streams at once; the
// waiter reads the signal on the same context), each put adding its slot count
// to the channel's signal at the peer, the last one also 2^32 minus the channel's total (a
// channel without chunks sends the 2^32 alone). The signal therefore reads
// (epoch - 1) * 2^32 + slots landed during operation `epoch`, and exactly epoch * 2^32 once all
// have: no reset, no count exchange before the first put.
#pragma once
#include <stdint.h>
#include "device/kernel_args.h"
#include "device/common/peer_sync.cuh"
#include "net/device/gin.cuh"
#include "net/device/channels.h"
#include "net/device/rail.h"

namespace nccl_moe {

__device__ __forceinline__ char* windowLocal(const WindowView& w, size_t off) {
  return (char*)ncclGetLocalPointer(w.win, off);
}

// The GIN context of channel c, on both ends.
__device__ __forceinline__ int channelContext(const HtNetArgs& net, int c) {
  return c % (int)net.devComm.ginContextCount;
}

// Puts `bytes` of chunk k (window offsets) to `peer` adding ch.signalAddFor(k) to `sig` there, on
// the channel's context. One thread.
__device__ __forceinline__ void putChunk(const HtNetArgs& net, ncclWindow_t win, int peer, size_t dstOff,
                                         size_t srcOff, size_t bytes, int sig, const ChannelChunks& ch, int k) {
  const ncclGin gin(net.devComm, channelContext(net, ch.c));
  putWithSignal(gin, win, peer, dstOff, srcOff, bytes, (ncclGinSignal_t)sig, ch.signalAddFor(k), ncclCoopThread());
}

// A channel that owns no chunk of its list still ends its operation at the peer: 2^32 alone.
__device__ __forceinline__ void signalEmptyChannel(const HtNetArgs& net, int peer, int sig, const ChannelChunks& ch) {
  const ncclGin gin(net.devComm, channelContext(net, ch.c));
  gin.signal(ncclTeamWorld(gin.comm), peer, ncclGin_SignalAdd{(ncclGinSignal_t)sig, kHtNetDone}, ncclCoopThread());
}

// A channel signal read for a polling thread: GIN signals are read by the NIC's (or the proxy's)
// writer too, so pollers back off between reads instead of hammering the word.
__device__ __forceinline__ uint64_t readChannelSignal(const ncclGin& gin, int sig) {
  __nanosleep(128);
  return gin.readSignal((ncclGinSignal_t)sig);
}

// One thread: waits until signal `sig` of channel c here (from rank src) counts at least `need`
// slots of operation `epoch`. Timeouts and failures as waitGinSignal (fatal, recorded); a value
// past the threshold is simply "arrived" (the exact end is checked by waitChannelDone).
__device__ __forceinline__ bool waitChannelAtLeast(const WindowView& w, const HtNetArgs& net, int sig, int c,
                                                   uint64_t epoch, uint64_t need, int src) {
  const ncclGin gin(net.devComm, channelContext(net, c));
  const uint64_t target = (epoch - 1) * kHtNetDone + need;
  return waitSeqOn<0>(w, [&] {
    const uint64_t v = readChannelSignal(gin, sig);
    return (int64_t)(v - target) > 0 ? target : v;
  }, target, kWaitGinSignal, src, nullptr, kHtNetDone);
}

// One thread: waits until signal `sig` of channel c here holds exactly epoch * 2^32 (every slot
// of the channel landed; a value past it is a peer ahead: protocol error).
__device__ __forceinline__ bool waitChannelDone(const WindowView& w, const HtNetArgs& net, int sig, int c,
                                                uint64_t epoch, int src) {
  const ncclGin gin(net.devComm, channelContext(net, c));
  return waitSeqOn<0>(w, [&] { return readChannelSignal(gin, sig); }, epoch * kHtNetDone, kWaitGinSignal, src,
                      nullptr, kHtNetDone);
}

// The end of an internode operation, in the last CTA of the kernel after the node barrier
// (finishAndWaitPeers): thread i < N (i != this node) adds 1 to signal doneSig0 + rank at the
// rail peer on node i, then waits until doneSig0 + (that rail peer) holds exactly `epoch` here.
// When it returns (CTA barrier included), every rank of every rail peer's node has finished the
// operation, so no put of the next operation can land in a region still read. Returns false if a
// wait failed.
__device__ __forceinline__ bool railBarrier(const WindowView& w, const HtNetArgs& net, int doneSig0, uint64_t epoch) {
  const PeerMap& p = w.peers;
  bool ok = true;
  for (int n = threadIdx.x; n < p.nodes(); n += blockDim.x) {
    if (n == p.node(p.rank)) continue;
    const int f = railPeer(p, n);
    const ncclGin out(net.devComm, ginContextOf(net.devComm, f));
    out.signal(ncclTeamWorld(out.comm), f, ncclGin_SignalAdd{(ncclGinSignal_t)(doneSig0 + p.rank), 1},
               ncclCoopThread());
    const ncclGin in(net.devComm, ginContextOf(net.devComm, p.rank));
    ok &= waitGinSignal(w, in, (ncclGinSignal_t)(doneSig0 + f), epoch, f);
    out.flush(ncclCoopThread());
  }
  return __syncthreads_and(ok) != 0;
}

// Thread 0 of a CTA (channel c) that posted puts: every put it posted has been read from its
// source (gin.flush on the channel's context), so the regions may be rewritten.
__device__ __forceinline__ void flushChannelPuts(const HtNetArgs& net, int c) {
  const ncclGin gin(net.devComm, channelContext(net, c));
  gin.flush(ncclCoopThread());
}

// Every CTA at the end of an internode operation: its channel's puts flushed, the node barrier
// (`kind`, finishAndWaitPeers), then in the last CTA the rail barrier (doneSig0) and only then
// seq published in *seqSlot, so the next operation of this rank starts after every rail peer's
// node has finished this one.
__device__ __forceinline__ void finishNetOperation(const WindowView& w, const HtNetArgs& net, int kind, int doneSig0,
                                                   uint64_t seq, unsigned int* arrived,
                                                   unsigned long long* seqSlot) {
  if (threadIdx.x == 0) flushChannelPuts(net, blockIdx.x);
  if (!finishAndWaitPeers<true>(w, kind, seq, arrived, seqSlot)) return;
  railBarrier(w, net, doneSig0, seq);
  if (threadIdx.x == 0) {
    *(volatile unsigned long long*)seqSlot = seq;
    __threadfence();
  }
}

}  // namespace nccl_moe
