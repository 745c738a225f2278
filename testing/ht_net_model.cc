// The high-throughput traffic model (ht_net_model.h).
#include "ht_net_model.h"

#include <algorithm>

namespace moe_net {
namespace {

size_t align16(size_t n) { return (n + 15) & ~(size_t)15; }

}  // namespace

size_t htRecordBytes(const HtNetShape& s) {
  const size_t pos = 8, expert = align16(pos + 4 * (size_t)s.gpusPerNode);
  const size_t weight = align16(expert + 4 * (size_t)s.topK), data = align16(weight + 4 * (size_t)s.topK);
  const size_t row = (size_t)s.hidden * (s.fp8 ? 1 : 2), scales = s.fp8 ? (size_t)s.hidden / 128 * 4 : 0;
  return align16(data + row + scales);
}

size_t htCountsRowBytes(const HtNetShape& s) {
  const size_t L = s.nRanks > 0 ? (size_t)(s.numExperts / s.nRanks) : 0;
  return align16(4 * ((size_t)s.nRanks + 1 + (size_t)s.gpusPerNode * L));
}

HtNetTraffic htNetTraffic(const HtNetShape& s, const std::vector<moe_ref::Routing>& rt, int me) {
  const int R = s.nRanks, G = s.gpusPerNode, N = R / G, L = s.numExperts / R;
  const int myNode = me / G, myIndex = me % G;
  const double record = (double)htRecordBytes(s), counts = (double)htCountsRowBytes(s);
  const double partial = 2.0 * s.hidden, weights = 4.0 * G;
  // What crosses the NIC per partial: the BF16 row, and with per-row values their K FP32 sums in
  // the same 16-byte-aligned row.
  const double partialNet = s.combineValues ? (double)align16(2 * (size_t)s.hidden + 4 * (size_t)s.topK) : partial;
  const double row = (double)s.hidden * (s.fp8 ? 1 : 2) + (s.fp8 ? s.hidden / 128 * 4.0 : 0.0);
  HtNetTraffic t;
  t.dispatchOutTo.assign(R, 0.0);
  t.combineOutTo.assign(R, 0.0);
  for (int b = 0; b < N; b++)
    if (b != myNode) t.dispatchOutTo[b * G + myIndex] += counts;
  t.dispatchRdmaOut = t.dispatchRdmaIn = (double)(N - 1) * counts;
  std::vector<char> ranks(R);
  for (int src = 0; src < R; src++) {
    const moe_ref::Routing& ro = rt[src];
    const bool mine = src == me;
    const bool railPeer = src / G != myNode && src % G == myIndex;  // its records for my node land here
    if (!mine && !railPeer) continue;
    for (int tok = 0; tok < ro.numTokens; tok++) {
      std::fill(ranks.begin(), ranks.end(), 0);
      for (int k = 0; k < ro.topK; k++) {
        const int64_t e = ro.topkIdx[(size_t)tok * ro.topK + k];
        if (e >= 0 && e < s.numExperts) ranks[e / L] = 1;
      }
      // Ranks of my node other than me that own one of the token's experts.
      int others = 0;
      for (int j = myNode * G; j < (myNode + 1) * G; j++) others += j != me && ranks[j];
      const bool needsMyNode = others > 0 || ranks[me];
      if (mine) {
        for (int b = 0; b < N; b++) {
          if (b == myNode) continue;
          bool needs = false;
          for (int j = b * G; j < (b + 1) * G; j++) needs = needs || ranks[j];
          if (!needs) continue;
          t.dispatchRdmaOut += record;
          t.dispatchOutTo[b * G + myIndex] += record;
          t.combineRdmaOut += weights;  // the combine weights go out with the record's slot
          t.combineOutTo[b * G + myIndex] += weights;
          t.combineRdmaIn += partialNet;
          t.recordsOut++;
        }
      } else if (needsMyNode) {  // a rail peer's record: lands here, is forwarded, returns a partial
        t.dispatchRdmaIn += record;
        t.combineRdmaIn += weights;
        t.combineRdmaOut += partialNet;
        t.combineOutTo[src] += partialNet;
        t.recordsIn++;
      } else {
        continue;
      }
      t.dispatchNvlinkOut += others * row;
      t.combineNvlinkIn += others * partial;
    }
  }
  return t;
}

}  // namespace moe_net
