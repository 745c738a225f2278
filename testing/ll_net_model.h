// The latency model of the low-latency kernels across nodes (issue 12 item 6): what one fake NIC
// (plugin/: one per process, shaped per direction by NCCL_MOELOOP_GBPS and per message by
// NCCL_MOELOOP_LATENCY_US) adds to a dispatch or a combine, from the routing. ll_perf prints it
// next to its measurements on several nodes, and the GPU tests check the plugin's per-peer
// counters against it (tests/gpu/ll_net_bytes_test.cc); perf/RESULTS.md compares. CPU only.
//
// Traffic of rank `me`'s NIC in one operation (INTERNODE.md §4; src/device/ll/*_gin.cuh):
//   dispatch out: one record per (own token, remote rank it goes to), plus one counts row per
//                 remote rank; in: the same from every remote source to `me`;
//   combine out:  one BF16 partial (H * 2 bytes) per record `me` received; in: one per (own
//                 token, remote rank it went to).
// A record is the route header (token, then K entries of 8 bytes, padded to 16) + the row
// (H * 2 BF16 or H FP8) + its scales, padded to 16 (the header's formula in nccl_moe.h).
// Model of the network term: the operation's puts leave back to back and its signal rides the
// last one, so one message latency plus the busier direction's bytes at the shaped rate:
//   net_us = latencyUs + max(out, in) / (gbps * 1e3)      (gbps 0: unshaped, that term is 0)
// The slowest NIC sets the operation: the maximum over ranks.
#pragma once
#include <stddef.h>
#include <vector>
#include "reference.h"

namespace moe_net {

struct NicShape {
  double gbps = 0;       // GB/s (1e9 B/s) per direction; 0 = unshaped
  double latencyUs = 0;  // per message
};
// The plugin's shaping as this process's environment sets it (0 where unset).
NicShape nicShapeFromEnv();

struct LlNetShape {
  int nRanks = 0, gpusPerNode = 0, numExperts = 0, hidden = 0, topK = 0;
  bool fp8 = false;
  int scaleBytes = 0;  // scale bytes of one FP8 row (0 for BF16)
};

struct LlNetTraffic {
  double dispatchOut = 0, dispatchIn = 0, combineOut = 0, combineIn = 0;  // bytes
};

// Bytes of one record (see above).
size_t llRecordBytes(const LlNetShape& s);
// Rank `me`'s NIC traffic for every rank's routing `rt` ([nRanks], topkIdx [T][K], -1 = none).
LlNetTraffic llNetTraffic(const LlNetShape& s, const std::vector<moe_ref::Routing>& rt, int me);
// The network term of one operation whose NIC sends `outBytes` and receives `inBytes`.
double llNetModelUs(const NicShape& nic, double outBytes, double inBytes);

}  // namespace moe_net
