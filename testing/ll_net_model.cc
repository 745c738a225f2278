// The low-latency network model (ll_net_model.h).
#include "ll_net_model.h"

#include <stdlib.h>
#include <algorithm>

namespace moe_net {
namespace {

size_t align16(size_t n) { return (n + 15) & ~(size_t)15; }

double envNumber(const char* name) {
  const char* v = getenv(name);
  if (v == nullptr || *v == '\0') return 0;
  const double d = atof(v);
  return d > 0 ? d : 0;
}

}  // namespace

NicShape nicShapeFromEnv() {
  NicShape n;
  n.gbps = envNumber("NCCL_MOELOOP_GBPS");
  n.latencyUs = envNumber("NCCL_MOELOOP_LATENCY_US");
  return n;
}

size_t llRecordBytes(const LlNetShape& s) {
  const size_t header = align16(2 * sizeof(int) + (size_t)s.topK * 8);
  const size_t row = (size_t)s.hidden * (s.fp8 ? 1 : 2);
  return align16(header + row + (size_t)s.scaleBytes);
}

LlNetTraffic llNetTraffic(const LlNetShape& s, const std::vector<moe_ref::Routing>& rt, int me) {
  const int R = s.nRanks, G = s.gpusPerNode, L = s.numExperts / R;
  const double record = (double)llRecordBytes(s), partial = 2.0 * s.hidden;
  const double countsRow = (double)align16(sizeof(int) * (size_t)(L + 1));
  auto remote = [&](int a, int b) { return a / G != b / G; };
  LlNetTraffic t;
  for (int r = 0; r < R; r++) {
    if (!remote(r, me)) continue;
    t.dispatchOut += countsRow;  // me -> r
    t.dispatchIn += countsRow;   // r -> me
  }
  std::vector<char> ranks(R);
  for (int src = 0; src < R; src++) {
    const moe_ref::Routing& ro = rt[src];
    for (int tok = 0; tok < ro.numTokens; tok++) {
      std::fill(ranks.begin(), ranks.end(), 0);
      for (int k = 0; k < ro.topK; k++) {
        const int64_t e = ro.topkIdx[(size_t)tok * ro.topK + k];
        if (e >= 0 && e < s.numExperts) ranks[e / L] = 1;
      }
      for (int d = 0; d < R; d++) {
        if (!ranks[d] || !remote(src, d)) continue;
        if (src == me) {  // my token to remote rank d: a record out, its partial back in
          t.dispatchOut += record;
          t.combineIn += partial;
        }
        if (d == me) {  // a remote source's token to me: a record in, my partial back out
          t.dispatchIn += record;
          t.combineOut += partial;
        }
      }
    }
  }
  return t;
}

double llNetModelUs(const NicShape& nic, double outBytes, double inBytes) {
  const double bytes = std::max(outBytes, inBytes);
  return nic.latencyUs + (nic.gbps > 0 ? bytes / (nic.gbps * 1e3) : 0.0);
}

}  // namespace moe_net
