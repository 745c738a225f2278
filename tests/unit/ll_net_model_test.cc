// testing/ll_net_model: record size, per-NIC traffic of a hand-made routing on 2 nodes x 2 GPUs,
// and the model's arithmetic.
#include <stdlib.h>
#include <gtest/gtest.h>

#include "testing/ll_net_model.h"

namespace {

using moe_net::LlNetShape;

LlNetShape shape(bool fp8) {
  LlNetShape s;
  s.nRanks = 4;
  s.gpusPerNode = 2;  // ranks 0, 1 on node 0; 2, 3 on node 1
  s.numExperts = 8;   // 2 per rank: expert e on rank e / 2
  s.hidden = 128;
  s.topK = 2;
  s.fp8 = fp8;
  s.scaleBytes = fp8 ? 4 : 0;  // one FP32 scale per 128 channels
  return s;
}

moe_ref::Routing routing(std::vector<std::vector<int64_t>> idx) {
  moe_ref::Routing r;
  r.numTokens = (int)idx.size();
  r.topK = 2;
  for (auto& row : idx)
    for (int64_t e : row) r.topkIdx.push_back(e);
  r.topkWeights.assign(r.topkIdx.size(), 1.0f);
  return r;
}

TEST(LlNetModel, RecordBytesFollowTheHeaderFormula) {
  // header align16(8 + 2 * 8) = 32; BF16 row 256 -> 288; FP8 row 128 + 4 scales -> 164 -> 176.
  EXPECT_EQ(moe_net::llRecordBytes(shape(false)), 288u);
  EXPECT_EQ(moe_net::llRecordBytes(shape(true)), 176u);
}

TEST(LlNetModel, TrafficCountsRecordsPerRemoteRankNotPerExpert) {
  const LlNetShape s = shape(false);
  // Rank 0: token 0 -> experts 4, 5 (both on rank 2: one record), token 1 -> 6 and 1 (rank 3
  // remote, rank 0 local), token 2 -> 2, 3 (rank 1, same node: nothing on the NIC).
  // Rank 2: token 0 -> experts 0 and 7 (rank 0 remote, rank 3 local). Ranks 1, 3: nothing.
  std::vector<moe_ref::Routing> rt = {routing({{4, 5}, {6, 1}, {2, 3}}), routing({}),
                                      routing({{0, 7}}), routing({})};
  const moe_net::LlNetTraffic t = moe_net::llNetTraffic(s, rt, 0);
  const double counts = 2 * 16.0;  // one counts row (align16(4 * 3)) per remote rank (2 and 3)
  EXPECT_DOUBLE_EQ(t.dispatchOut, 2 * 288.0 + counts);  // records to ranks 2 and 3
  EXPECT_DOUBLE_EQ(t.dispatchIn, 1 * 288.0 + counts);   // rank 2's token 0
  EXPECT_DOUBLE_EQ(t.combineOut, 1 * 256.0);            // the partial of rank 2's token 0
  EXPECT_DOUBLE_EQ(t.combineIn, 2 * 256.0);             // partials of my tokens 0 and 1
  // Rank 1 (same node as 0, no tokens): only the counts rows.
  const moe_net::LlNetTraffic t1 = moe_net::llNetTraffic(s, rt, 1);
  EXPECT_DOUBLE_EQ(t1.dispatchOut, counts);
  EXPECT_DOUBLE_EQ(t1.combineOut, 0.0);
}

TEST(LlNetModel, ModelIsLatencyPlusTheBusierDirection) {
  moe_net::NicShape nic;
  EXPECT_DOUBLE_EQ(moe_net::llNetModelUs(nic, 1e6, 2e6), 0.0);  // unshaped
  nic.gbps = 50;
  nic.latencyUs = 3;
  EXPECT_DOUBLE_EQ(moe_net::llNetModelUs(nic, 1e6, 2e6), 3.0 + 2e6 / 50e3);  // 43 us
}

TEST(LlNetModel, ShapeFromThePluginsEnvironment) {
  setenv("NCCL_MOELOOP_GBPS", "50", 1);
  setenv("NCCL_MOELOOP_LATENCY_US", "3", 1);
  moe_net::NicShape nic = moe_net::nicShapeFromEnv();
  EXPECT_DOUBLE_EQ(nic.gbps, 50.0);
  EXPECT_DOUBLE_EQ(nic.latencyUs, 3.0);
  unsetenv("NCCL_MOELOOP_GBPS");
  unsetenv("NCCL_MOELOOP_LATENCY_US");
  nic = moe_net::nicShapeFromEnv();
  EXPECT_DOUBLE_EQ(nic.gbps, 0.0);
  EXPECT_DOUBLE_EQ(nic.latencyUs, 0.0);
}

}  // namespace
