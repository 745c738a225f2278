// Per-peer, per-context GIN counters of the moeloop plugin (read through moeloopGetPeerStats,
// moeloop_stats.h). Process-wide, lock-free.
#pragma once
#include <stdint.h>

namespace moeloop {

// A put handed to the plugin for `peer` on `context`: `bytes` of payload, `copied` when the copy
// engine moves them, `signal` when it carries one.
void peerStatsOnSend(int peer, int context, uint64_t bytes, bool copied, bool signal);
// A put from `peer` on `context` applied here (its payload in place, its signal raised).
void peerStatsOnApply(int peer, int context, uint64_t bytes, bool signal);

}  // namespace moeloop
