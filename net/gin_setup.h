// GIN resources of the internode low-latency path: which GIN signal counts what, and the
// device-communicator requirements that ask NCCL for them (host side).
//
// Signals are monotonic counters of a GIN context, added to by a put's remote action once its
// payload (and that of every earlier put of the context to the same peer) has landed. The
// low-latency path keeps one per (buffer slot, source rank) and direction, cleared once at
// creation (NCCL 2.28 reuses the words of a destroyed device communicator with their values;
// launchGinSignalReset) and never again: a dispatch's count signal from source s of slot i, a
// combine's from rank s. Ids stay below
// 65536 (GIN descriptors carry 16-bit ids; INTERNODE.md §2).
#pragma once
#include <nccl.h>
#include <nccl_device.h>
#include "nccl_moe.h"
#include "net/node_map.h"

namespace nccl_moe {

constexpr int kGinContexts = 4;      // asked for; NCCL may give fewer (2.28.9: at most 4)
constexpr int kMaxGinSignals = 65536;

struct GinSignalPlan {
  bool highThroughput = false;  // the config's mode
  int slots = 0;     // low latency: numBufferSlots
  int channels = 0;  // high throughput: numSms (CTAs of every HT kernel; chunk k -> channel k % channels)
  int nRanks = 0;    // world ranks
  // Low latency, per (buffer slot, source rank s): what s's dispatch / combine put here.
  int dispatch(int slot, int src) const { return slot * nRanks + src; }
  int combine(int slot, int src) const { return (slots + slot) * nRanks + src; }
  // High throughput, per (source s, its channel): records and partials of s's channel landed
  // here (count, then 2^32 once the channel's last one has); per source s: its combine weights
  // (2^32 once all landed), its counts row, its dispatch / combine done (one each per operation).
  int htData(int src, int ch) const { return src * channels + ch; }
  int htPartials(int src, int ch) const { return (nRanks + src) * channels + ch; }
  int htWeights(int src) const { return 2 * nRanks * channels + src; }
  int htCounts(int src) const { return 2 * nRanks * channels + nRanks + src; }
  int htDispatchDone(int src) const { return 2 * nRanks * channels + 2 * nRanks + src; }
  int htCombineDone(int src) const { return 2 * nRanks * channels + 3 * nRanks + src; }
  // Creation's handshake (launchGinHandshake): one put with this signal from every remote rank.
  int handshake() const { return highThroughput ? 2 * nRanks * channels + 4 * nRanks : 2 * slots * nRanks; }
  int count() const { return handshake() + 1; }
};

// The signal plan of a resolved config on `nodes` (either mode). Fails with ncclInvalidArgument
// naming the sizes when it would need kMaxGinSignals signals or more.
ncclResult_t planGinSignals(const ncclMoeConfig_t& resolved, const NodeMap& nodes, GinSignalPlan* plan);

// Device-communicator requirements for the internode path: NCCL's defaults
// (defaultDevCommRequirements, nccl_compat.h), the creation-time LSA barrier, kGinContexts
// contexts, the plan's signals, no counters, GIN connections between every pair of ranks
// (requestFullGin). GIN is used only when the map has several nodes;
// a single-node map asks for no GIN signals and leaves the rest at NCCL's defaults.
ncclDevCommRequirements ginRequirements(const NodeMap& nodes, const GinSignalPlan& plan);

// The error for a failed ncclDevCommCreate with GIN requirements (`res`), saying what is
// missing: a NET plugin with GIN (e.g. plugin/, NCCL_NET_PLUGIN=moeloop, on one host) or an RDMA
// NIC whose GIN NCCL supports (GDAKI or its proxy). Returns `res`.
ncclResult_t ginUnavailableError(ncclResult_t res, const NodeMap& nodes);

}  // namespace nccl_moe
