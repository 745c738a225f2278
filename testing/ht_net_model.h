// The traffic of the high-throughput kernels across nodes (issue 13; INTERNODE.md §3, the
// dense-slot mirror), from the routing: what crosses each fake NIC (plugin/) and what crosses
// NVLink inside a node, per rank and operation. The GPU tests check the plugin's per-peer
// counters against the network bytes (per-node dedup; tests/gpu/ht_net_test.cc, HtNetBytes), and
// ht_perf reports the two as DeepEP does (RDMA and NVLink bandwidth). CPU only.
//
// Rank `me` (node n, local index i; its rail peer on node B is B*G + i) in one dispatch:
//   rdmaOut:   to each remote node B's rail peer: one record per own token that has an expert on a
//              rank of B (records_B; once per node however many ranks or experts there), plus ONE
//              counts row (htCountsRowBytes) whether records_B is 0 or not;
//   rdmaIn:    the same from the rail peers (local index i) of every other node, for tokens that
//              need node n;
//   nvlinkOut: one row (data + scales) per (token, other rank of node n that owns one of its
//              experts) that `me` places: its own tokens (direct, as intranode) and the tokens
//              its rail peers' records bring (forwarded).
// Completion and credit signals carry no payload bytes.
// In one combine, the mirror: rdmaOut = one BF16 partial (H * 2 bytes; with per-row values
// align16(H * 2 + K * 4)) per record received back
// to its source, plus G FP32 combine weights (one per rank of B; 1 or 0 for an unweighted combine,
// which takes the same path) per record sent to B's rail peer; rdmaIn = the same seen from the other end. nvlinkIn = one BF16
// row per (token, other rank of node n) that `me` sums for its own tokens and for the partials it
// returns. The record's size is the library's (net/ht_regions.h), computed here on its own so the
// unit test can compare the two.
#pragma once
#include <stddef.h>
#include <vector>
#include "reference.h"

namespace moe_net {

struct HtNetShape {
  int nRanks = 0, gpusPerNode = 0, numExperts = 0, hidden = 0, topK = 0;
  bool fp8 = false;            // FP8 rows carry hidden / 128 FP32 scales
  bool combineValues = false;  // ncclMoeCombineWithWeights: partials carry K FP32 sums each
};

struct HtNetTraffic {  // bytes
  double dispatchRdmaOut = 0, dispatchRdmaIn = 0, dispatchNvlinkOut = 0;
  double combineRdmaOut = 0, combineRdmaIn = 0, combineNvlinkIn = 0;
  long long recordsOut = 0, recordsIn = 0;  // dispatch records (one put carries several)
  // [nRanks]: the payload bytes `me` puts to each rank (what the plugin's per-peer bytesSent
  // counts); non-zero only for the rail peers on other nodes. Their sums are the rdmaOut totals.
  std::vector<double> dispatchOutTo, combineOutTo;
};

// Bytes of one record (net/ht_regions.h htRecordLayout) and of one counts row:
// align16(4 * (R + 1 + G * L)), L = numExperts / nRanks: int32 rows for each of the R ranks,
// int32 records, int32 per-expert counts for the G * L experts of the destination node.
size_t htRecordBytes(const HtNetShape& s);
size_t htCountsRowBytes(const HtNetShape& s);
// Rank `me`'s traffic for every rank's routing `rt` ([nRanks], topkIdx [T][K], -1 = none).
HtNetTraffic htNetTraffic(const HtNetShape& s, const std::vector<moe_ref::Routing>& rt, int me);

}  // namespace moe_net
