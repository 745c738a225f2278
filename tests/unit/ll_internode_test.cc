// CPU tests of the multi-node low-latency creation: the node decision of the first creation vote
// (create_agreement.h decideNodes: one node, several nodes in either mode, the map's own
// errors prefixed for ncclMoeCommCreate), the placement key, and the window arithmetic of the
// internode regions the kernels use (counts rows, sendIndex, destCount; remoteIndexAt).
#include <gtest/gtest.h>
#include <stdlib.h>
#include <string>
#include <vector>

#include "config.h"
#include "config_fixture.h"
#include "create_agreement.h"
#include "error_message_match.h"
#include "net/device/rail.h"
#include "net/regions.h"

using namespace nccl_moe;

namespace {

std::vector<CreateVote> votesOf(int nodes, int perNode) {
  std::vector<CreateVote> v(nodes * perNode);
  for (int r = 0; r < nodes * perNode; ++r) {
    fillVote(&v[r], ncclSuccess, "", nullptr);
    v[r].placement = RankPlacement{0x1000u + (uint64_t)(r / perNode), r % perNode, perNode};
  }
  return v;
}

ncclMoeConfig_t llConfig(int R) {
  ncclMoeConfig_t c = NCCL_MOE_CONFIG_INITIALIZER, r;
  c.mode = ncclMoeLowLatency;
  c.numExperts = 4 * R;
  c.hidden = 1024;
  c.topK = 4;
  c.maxTokensPerRank = 37;
  c.numSms = 4;
  c.dispatchDtype = ncclMoeFp8E4m3;
  EXPECT_EQ(validateConfig(&c, R, config_fixture::kSms, &r), ncclSuccess) << ncclMoeGetLastError();
  return r;
}

TEST(LlInternodeCreate, OneNodeGivesTheSingleNodeMap) {
  const std::vector<CreateVote> v = votesOf(1, 4);
  NodeMap m;
  ASSERT_EQ(decideNodes(v.data(), 4, &m), ncclSuccess);
  EXPECT_EQ(m.nNodes, 1);
  EXPECT_EQ(m.gpusPerNode, 4);
  const PeerMap p = m.peerMap(2);
  EXPECT_EQ(p.lsaBase, 0);  // as windowView gave before: every peer LSA, LSA index = rank
  EXPECT_EQ(p.lsaSize, 4);
}

TEST(LlInternodeCreate, SeveralNodes) {
  const std::vector<CreateVote> v = votesOf(2, 2);
  NodeMap m;
  ASSERT_EQ(decideNodes(v.data(), 4, &m), ncclSuccess) << ncclMoeGetLastError();
  EXPECT_EQ(m.nNodes, 2);
  EXPECT_EQ(m.gpusPerNode, 2);
  EXPECT_EQ(m.peerMap(3).lsaBase, 2);
}

TEST(LlInternodeCreate, HighThroughputAcrossNodesGetsTheMapToo) {
  const std::vector<CreateVote> v = votesOf(2, 1);
  NodeMap m;
  ASSERT_EQ(decideNodes(v.data(), 2, &m), ncclSuccess) << ncclMoeGetLastError();
  EXPECT_EQ(m.nNodes, 2);
  EXPECT_EQ(m.gpusPerNode, 1);
}

TEST(LlInternodeCreate, MapErrorsNameTheCall) {
  std::vector<CreateVote> v = votesOf(2, 2);
  std::swap(v[1].placement, v[2].placement);  // node 0, 1, 0, 1: not contiguous
  NodeMap m;
  EXPECT_EQ(decideNodes(v.data(), 4, &m), ncclInvalidUsage);
  const std::string e = ncclMoeGetLastError();
  EXPECT_EQ(e.rfind("ncclMoeCommCreate: ", 0), 0u) << e;
  EXPECT_TRUE(containsWord(e, "node-contiguous")) << e;

  v = votesOf(1, 3);
  v.push_back(v[0]);
  v[3].placement = RankPlacement{0x2000u, 0, 1};  // 3 GPUs on one node, 1 on the other
  EXPECT_EQ(decideNodes(v.data(), 4, &m), ncclInvalidUsage);
  EXPECT_TRUE(containsWord(ncclMoeGetLastError(), "same number")) << ncclMoeGetLastError();
}

TEST(LlInternodeCreate, PlacementKeyFollowsNcclHostId) {
  const char* saved = getenv("NCCL_HOSTID");
  const std::string keep = saved ? saved : "";
  setenv("NCCL_HOSTID", "node-a", 1);
  const RankPlacement a1 = localPlacement(0, 1), a2 = localPlacement(1, 2);
  setenv("NCCL_HOSTID", "node-b", 1);
  const RankPlacement b = localPlacement(0, 1);
  if (saved) setenv("NCCL_HOSTID", keep.c_str(), 1);
  else unsetenv("NCCL_HOSTID");
  EXPECT_EQ(a1.hostKey, a2.hostKey);
  EXPECT_NE(a1.hostKey, b.hostKey);
  EXPECT_EQ(a2.lsaRank, 1);
  EXPECT_EQ(a2.lsaSize, 2);
  static_assert(sizeof(CreateVote) % 8 == 0, "votes travel as 8-byte words");
}

TEST(LlInternodeRegions, CountsRowsIndexAndCounters) {
  for (int nodes : {2, 4}) {
    for (int G : {1, 2, 8}) {
      const int R = nodes * G, remote = R - G;
      const ncclMoeConfig_t c = llConfig(R);
      NodeMap m;
      m.nRanks = R;
      m.gpusPerNode = G;
      m.nNodes = nodes;
      LlNetSlotRegions s;
      ASSERT_EQ(computeLlNetRegions(c, m, &s), ncclSuccess) << ncclMoeGetLastError();
      const size_t L = c.numExperts / R, M = c.maxTokensPerRank;
      EXPECT_EQ(s.countsBytes, (sizeof(int) * (L + 1) + 15) / 16 * 16);
      // Regions in order, each large enough and 256-aligned, none overlapping.
      const std::vector<std::pair<size_t, size_t>> regions = {
          {s.dispatchStage, remote * M * s.record.bytes}, {s.dispatchLand, remote * M * s.record.bytes},
          {s.combineStage, remote * M * c.hidden * 2},    {s.combineLand, remote * M * c.hidden * 2},
          {s.countsStage, remote * s.countsBytes},         {s.countsLand, remote * s.countsBytes},
          {s.sendIndex, M * remote * sizeof(int)},         {s.destCount, remote * sizeof(int)}};
      for (size_t i = 0; i < regions.size(); ++i) {
        EXPECT_EQ(regions[i].first % 256, 0u) << i;
        const size_t end = regions[i].first + regions[i].second;
        if (i + 1 < regions.size()) EXPECT_LE(end, regions[i + 1].first) << i;
        else EXPECT_LE(end, s.bytes);
      }
      EXPECT_EQ(s.bytes % 4096, 0u);
      // The record: 8-byte token word, K 8-byte entries, then data and scales (FP8 FP32 scales).
      EXPECT_EQ(s.record.data, (size_t)(8 + 8 * c.topK + 15) / 16 * 16);
      EXPECT_EQ(s.record.scales - s.record.data, (size_t)c.hidden);
      EXPECT_EQ(s.record.bytes % 16, 0u);
    }
  }
}

TEST(LlInternodeRegions, RemoteIndexAsTheOtherRankSeesIt) {
  // 3 nodes x 2: rank 1 (node 0) is row 1 of rank 4's (node 2) remote rows; rank 4 is row 2 of rank 1's.
  const PeerMap p{1, 6, 0, 2};
  EXPECT_EQ(remoteIndexAt(p, 4, 1), 1);
  EXPECT_EQ(remoteIndex(p, 4), 2);
  EXPECT_EQ(remoteIndexAt(p, 1, 4), remoteIndex(p, 4));
  const PeerMap q{4, 6, 4, 2};
  EXPECT_EQ(remoteIndex(q, 1), remoteIndexAt(p, 4, 1));
  for (int at = 0; at < 6; ++at)
    for (int r = 0; r < 6; ++r) {
      if (r / 2 == at / 2) continue;
      const PeerMap v{at, 6, at / 2 * 2, 2};
      EXPECT_EQ(remoteIndexAt(p, at, r), remoteIndex(v, r));
      EXPECT_GE(remoteIndex(v, r), 0);
      EXPECT_LT(remoteIndex(v, r), 4);
    }
}

}  // namespace
