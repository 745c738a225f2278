// The plugin's per-peer GIN byte counters as the byte tests read them (LlNetBytes, HtNetBytes).
#pragma once
#include <vector>

#include "gpu_env.h"
#include "../../plugin/moeloop_stats.h"

namespace moe_gpu {

// Bytes this process's GIN sent to each world rank so far (every context).
inline std::vector<double> bytesSent(moeloopGetPeerStats_t peerStats) {
  std::vector<double> sent(nRanks(), 0);
  for (int r = 0; r < nRanks(); r++) {
    moeloopPeerStats_t st = {};
    if (peerStats(r, -1, &st, sizeof(st)) == sizeof(st)) sent[r] = (double)st.bytesSent;
  }
  return sent;
}

}  // namespace moe_gpu
