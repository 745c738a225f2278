// Chunk and channel arithmetic of the internode high-throughput kernels (host and device; the
// kernels' side in src/device/ht/net_channels.cuh). A dense list of `total` slots is cut into
// chunks of `chunk` slots (the dispatch's HtNetArgs::dispatchChunk, the combine's kHtNetChunk);
// chunk k belongs to channel k % S. A channel's puts to one peer add their slot counts to its
// signal there, the last one also 2^32 minus the channel's total, so the signal advances by
// exactly kHtNetDone per operation whatever the counts.
#pragma once
#include <stdint.h>
#include "device/kernel_args.h"

namespace nccl_moe {

constexpr uint64_t kHtNetDone = 1ull << 32;  // channel signal steps per operation

// The chunks of one dense list of `total` slots that channel c of S owns: k = c, c + S, ...;
// `chunk` slots each (the same on both ends of the channel).
struct ChannelChunks {
  int total, c, S;
  int chunk = kHtNetChunk;
  __host__ __device__ int chunks() const { return (total + chunk - 1) / chunk; }
  __host__ __device__ int size(int k) const { return total - k * chunk < chunk ? total - k * chunk : chunk; }
  // Slots of the channel's chunks up to and including its chunk k: all chunks before k are full
  // (only the list's last chunk may be short, and it has the highest k).
  __host__ __device__ uint64_t through(int k) const { return (uint64_t)((k - c) / S) * chunk + size(k); }
  // The channel's last chunk, or -1 when it owns none.
  __host__ __device__ int last() const { return c < chunks() ? c + (chunks() - 1 - c) / S * S : -1; }
  __host__ __device__ uint64_t channelTotal() const { return last() < 0 ? 0 : through(last()); }
  // What the put of chunk k adds to the channel's signal at the peer.
  __host__ __device__ uint64_t signalAddFor(int k) const {
    return (uint64_t)size(k) + (k == last() ? kHtNetDone - channelTotal() : 0);
  }
};

}  // namespace nccl_moe
