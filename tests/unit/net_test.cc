// The internode transport's host side (net/): node map validation and its messages, rail and
// remote-row arithmetic, the GIN signal plan and requirements, the window regions of the
// low-latency path up to 256 ranks.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "config.h"
#include "config_fixture.h"
#include "error_message_match.h"
#include "nccl_compat.h"
#include "net/device/channels.h"
#include "net/device/rail.h"
#include "net/gin_setup.h"
#include "net/node_map.h"
#include "net/regions.h"
#include "node_map_fixture.h"

using namespace nccl_moe;

namespace {

using node_map_fixture::mapOf;
using node_map_fixture::placement;

// Expects buildNodeMap to fail with ncclInvalidUsage and a message containing every word.
void expectRejected(const std::vector<RankPlacement>& p, std::vector<std::string> words) {
  NodeMap m;
  EXPECT_EQ(buildNodeMap(p.data(), (int)p.size(), &m), ncclInvalidUsage);
  const std::string msg = ncclMoeGetLastError();
  for (const std::string& w : words) EXPECT_NE(msg.find(w), std::string::npos) << "\"" << msg << "\" lacks " << w;
}

ncclMoeConfig_t llConfig() {
  ncclMoeConfig_t c = config_fixture::goodConfig();
  c.mode = ncclMoeLowLatency;
  c.numExperts = 256;
  c.maxTokensPerRank = 128;
  c.dispatchDtype = ncclMoeFp8E4m3;
  c.numBufferSlots = 2;
  return c;
}

}  // namespace

TEST(NetNodeMap, GoodShapes) {
  for (auto shape : {std::make_pair(1, 1), std::make_pair(1, 8), std::make_pair(2, 1), std::make_pair(2, 2),
                     std::make_pair(4, 1), std::make_pair(32, 8), std::make_pair(256, 1), std::make_pair(4, 64)}) {
    const NodeMap m = mapOf(shape.first, shape.second);
    EXPECT_EQ(m.nNodes, shape.first);
    EXPECT_EQ(m.gpusPerNode, shape.second);
    EXPECT_EQ(m.nRanks, shape.first * shape.second);
    EXPECT_EQ(m.remoteRanks(), m.nRanks - shape.second);
  }
}

TEST(NetNodeMap, PeerMapAgreesWithNodes) {
  const NodeMap m = mapOf(4, 2);
  for (int me = 0; me < 8; ++me) {
    const PeerMap p = m.peerMap(me);
    EXPECT_EQ(p.rank, me);
    EXPECT_EQ(p.nRanks, 8);
    EXPECT_EQ(p.lsaSize, 2);
    for (int r = 0; r < 8; ++r) {
      EXPECT_EQ(p.node(r), m.node(r));
      EXPECT_EQ(p.lsaIndex(r) != kPeerRemote, m.node(r) == m.node(me)) << me << " -> " << r;
    }
  }
}

TEST(NetNodeMap, NotNodeContiguous) {
  std::vector<RankPlacement> p = placement(2, 2);  // hosts 1 1 2 2
  p[1].hostKey = 2;                                // hosts 1 2 2 1... and rank 3 back on host 1
  p[3].hostKey = 1;
  expectRejected(p, {"not node-contiguous", "rank 3", "rank 0", "consecutive"});
}

TEST(NetNodeMap, UnequalNodes) {
  std::vector<RankPlacement> p = placement(2, 2);
  p.push_back(RankPlacement{2, 2, 3});  // host 2 gets a third rank
  expectRejected(p, {"different numbers of ranks", "2 ranks", "ranks 2..4", "3 ranks"});
  p = placement(1, 3);
  p.push_back(RankPlacement{9, 0, 1});
  expectRejected(p, {"different numbers of ranks", "ranks 3..3"});
}

TEST(NetNodeMap, NodeIsNotOneNvlinkDomain) {
  std::vector<RankPlacement> p = placement(2, 4);
  for (int r = 4; r < 8; ++r) p[r] = RankPlacement{2, r % 2, 2};  // node 1 split into 2 LSA teams
  expectRejected(p, {"rank 4", "NVLink", "2 ranks", "4 ranks", "(4..7)"});
}

TEST(NetNodeMap, RankCount) {
  std::vector<RankPlacement> p = placement(kMaxRanks + 1, 1);
  expectRejected(p, {std::to_string(kMaxRanks + 1), std::to_string(kMaxRanks)});
  NodeMap m;
  EXPECT_EQ(buildNodeMap(p.data(), 0, &m), ncclInvalidUsage);
}

TEST(NetRail, RailPeersAndRemoteRows) {
  const NodeMap m = mapOf(4, 8);  // 32 ranks
  const PeerMap p = m.peerMap(13);  // node 1, local index 5
  for (int n = 0; n < 4; ++n) EXPECT_EQ(railPeer(p, n), n * 8 + 5);
  EXPECT_EQ(railPeer(p, 1), 13);
  // Remote rows: ranks 0..7 -> 0..7, 16..31 -> 8..23 (node 1's 8..15 skipped), dense and in order.
  int expect = 0;
  for (int r = 0; r < 32; ++r) {
    if (p.lsaIndex(r) != kPeerRemote) continue;
    EXPECT_EQ(remoteIndex(p, r), expect++) << r;
  }
  EXPECT_EQ(expect, m.remoteRanks());
  const PeerMap last = mapOf(256, 1).peerMap(255);
  EXPECT_EQ(remoteIndex(last, 0), 0);
  EXPECT_EQ(remoteIndex(last, 254), 254);
  EXPECT_EQ(railPeer(last, 7), 7);
}

// The HT internode regions per remote node: what rank s puts to its rail peer f on node B lands
// in f's region myNodeIndexAt(s's map, B), which f reads as remoteNodeIndex(f's map, node(s)); both
// in 0..N-2 and, for a fixed reader, distinct over the other nodes (N = 3, 4, 5; G = 1, 2, 8).
TEST(NetRail, RemoteNodeIndicesPairUp) {
  for (int N : {2, 3, 4, 5})
    for (int G : {1, 2, 8}) {
      const NodeMap m = mapOf(N, G);
      for (int s = 0; s < N * G; ++s) {
        const PeerMap ps = m.peerMap(s);
        std::vector<int> seen(N - 1, 0);
        for (int B = 0; B < N; ++B) {
          if (B == ps.node(s)) continue;
          const int f = railPeer(ps, B), at = myNodeIndexAt(ps, B);
          ASSERT_EQ(m.node(f), B);
          ASSERT_EQ(m.localIndex(f), m.localIndex(s));
          EXPECT_EQ(at, remoteNodeIndex(m.peerMap(f), ps.node(s))) << N << " x " << G << " rank " << s << " node " << B;
          ASSERT_GE(remoteNodeIndex(ps, B), 0);
          ASSERT_LT(remoteNodeIndex(ps, B), N - 1);
          seen[remoteNodeIndex(ps, B)]++;
        }
        for (int v : seen) EXPECT_EQ(v, 1);
      }
    }
}

// The channel arithmetic of the HT internode kernels: over every chunk of every channel the
// signal advances by exactly 2^32 per operation; through(k) is the running count of the channel's
// slots; every slot belongs to one chunk of one channel.
TEST(NetChannels, EveryChannelEndsAtExactly2To32) {
  for (int chunk : {16, 64, 128})
  for (int total : {0, 1, 63, 64, 65, 128, 4095, 4096})
    for (int S : {1, 4, 12, 24, 132}) {
      long long slots = 0;
      for (int c = 0; c < S; ++c) {
        const ChannelChunks ch{total, c, S, chunk};
        uint64_t signal = 0, running = 0;
        for (int k = c; k < ch.chunks(); k += S) {
          running += (uint64_t)ch.size(k);
          EXPECT_EQ(ch.through(k), running) << total << " " << S << " " << c << " " << k;
          signal += ch.signalAddFor(k);
          slots += ch.size(k);
        }
        if (ch.last() < 0) signal += kHtNetDone;  // the empty channel's lone signal
        EXPECT_EQ(signal, kHtNetDone) << "total " << total << " S " << S << " channel " << c;
        EXPECT_EQ(ch.channelTotal(), running);
      }
      EXPECT_EQ(slots, total);
    }
}

TEST(NetGin, SignalPlanAndRequirements) {
  ncclMoeConfig_t c = llConfig(), r;
  ASSERT_EQ(validateConfig(&c, 16, config_fixture::kSms, &r), ncclSuccess) << ncclMoeGetLastError();
  const NodeMap m = mapOf(2, 8);
  GinSignalPlan plan;
  ASSERT_EQ(planGinSignals(r, m, &plan), ncclSuccess);
  EXPECT_EQ(plan.count(), 2 * 2 * 16 + 1);
  std::vector<int> seen(plan.count(), 0);
  for (int slot = 0; slot < 2; ++slot)
    for (int s = 0; s < 16; ++s) {
      seen[plan.dispatch(slot, s)]++;
      seen[plan.combine(slot, s)]++;
    }
  seen[plan.handshake()]++;
  for (int v : seen) EXPECT_EQ(v, 1);  // every id used once: no two counters share a signal
  const ncclDevCommRequirements reqs = ginRequirements(m, plan);
  EXPECT_EQ(reqs.ginSignalCount, plan.count());
  EXPECT_EQ(reqs.ginContextCount, kGinContexts);
  EXPECT_EQ(reqs.ginCounterCount, 0);
  EXPECT_EQ(reqs.lsaBarrierCount, 1);
#ifdef NCCL_DEV_COMM_REQUIREMENTS_INITIALIZER
  // 2.29+: GIN resources without a connection type are rejected by ncclDevCommCreate.
  EXPECT_EQ(reqs.ginConnectionType, NCCL_GIN_CONNECTION_FULL);
  EXPECT_FALSE(reqs.ginForceEnable);
  const ncclDevCommRequirements defaults = defaultDevCommRequirements();
  EXPECT_EQ(reqs.magic, defaults.magic);  // built on NCCL's initializer (2.29+)
  EXPECT_EQ(reqs.size, defaults.size);
#else
  EXPECT_TRUE(reqs.ginForceEnable);  // 2.28.9: the only way to ask for GIN
#endif
  // One node: no GIN signals, NCCL's default context hint (0 on 2.28.9, 4 from 2.29 on).
  const ncclDevCommRequirements one = ginRequirements(mapOf(1, 8), plan);
  EXPECT_EQ(one.ginSignalCount, 0);
  EXPECT_EQ(one.ginContextCount, defaultDevCommRequirements().ginContextCount);
  // 256 ranks x 8 slots x 2 + the handshake = 4097 signals: well inside the 16-bit ids.
  r.numBufferSlots = kMaxBufferSlots;
  ASSERT_EQ(planGinSignals(r, mapOf(32, 8), &plan), ncclSuccess);
  EXPECT_EQ(plan.count(), 4097);
  EXPECT_LT(plan.handshake(), kMaxGinSignals);
}

// High throughput: per (source, channel) records and partials, per source weights, counts and
// the two done signals, then the handshake; every id once, numSms channels; too many SMs for the
// 16-bit ids is a config error naming numSms.
TEST(NetGin, HighThroughputSignalPlan) {
  ncclMoeConfig_t c = config_fixture::goodConfig(), r;
  c.numSms = 24;
  ASSERT_EQ(validateConfig(&c, 16, config_fixture::kSms, &r), ncclSuccess) << ncclMoeGetLastError();
  ASSERT_EQ(r.mode, ncclMoeHighThroughput);
  GinSignalPlan plan;
  ASSERT_EQ(planGinSignals(r, mapOf(2, 8), &plan), ncclSuccess) << ncclMoeGetLastError();
  EXPECT_TRUE(plan.highThroughput);
  EXPECT_EQ(plan.channels, 24);
  EXPECT_EQ(plan.count(), 2 * 16 * 24 + 4 * 16 + 1);
  std::vector<int> seen(plan.count(), 0);
  for (int s = 0; s < 16; ++s) {
    for (int ch = 0; ch < 24; ++ch) {
      seen[plan.htData(s, ch)]++;
      seen[plan.htPartials(s, ch)]++;
    }
    seen[plan.htWeights(s)]++;
    seen[plan.htCounts(s)]++;
    seen[plan.htDispatchDone(s)]++;
    seen[plan.htCombineDone(s)]++;
  }
  seen[plan.handshake()]++;
  for (int v : seen) EXPECT_EQ(v, 1);
  EXPECT_EQ(ginRequirements(mapOf(2, 8), plan).ginSignalCount, plan.count());
  r.numSms = 1100;  // 2 * 32 * 1100 + 4 * 32 + 1 > 65536: not addressable
  EXPECT_EQ(planGinSignals(r, mapOf(4, 8), &plan), ncclInvalidArgument);
  EXPECT_NE(std::string(ncclMoeGetLastError()).find("config.numSms = 1100"), std::string::npos)
      << ncclMoeGetLastError();
}

TEST(NetGin, UnavailableErrorSaysWhatIsMissing) {
  EXPECT_EQ(ginUnavailableError(ncclInvalidUsage, mapOf(2, 1)), ncclInvalidUsage);
  const std::string msg = ncclMoeGetLastError();
  for (const char* w : {"GIN", "2 nodes x 1 GPUs", "NCCL_NET_PLUGIN=moeloop", "RDMA"})
    EXPECT_NE(msg.find(w), std::string::npos) << "\"" << msg << "\" lacks " << w;
}

TEST(NetRegions, RecordLayout) {
  ncclMoeConfig_t c = llConfig(), r;
  ASSERT_EQ(validateConfig(&c, 16, config_fixture::kSms, &r), ncclSuccess);
  LlRecordLayout rec = llRecordLayout(r);  // FP8, FP32 scales, K = 8
  EXPECT_EQ(rec.header, 80u);              // 8 + 8 * 8 rounded to 16
  EXPECT_EQ(rec.data, rec.header);
  EXPECT_EQ(rec.scales, rec.data + 7168);
  EXPECT_EQ(rec.bytes, rec.scales + 56 * 4);
  EXPECT_EQ(rec.bytes % 16, 0u);
  c.topK = 3;
  c.dispatchDtype = ncclMoeBf16;
  ASSERT_EQ(validateConfig(&c, 16, config_fixture::kSms, &r), ncclSuccess);
  rec = llRecordLayout(r);
  EXPECT_EQ(rec.header, 32u);  // 8 + 24 rounded to 16
  EXPECT_EQ(rec.bytes, 32u + 7168 * 2);
}

TEST(NetRegions, SlotRegionsUpTo256Ranks) {
  for (auto shape : {std::make_pair(2, 1), std::make_pair(2, 8), std::make_pair(32, 8), std::make_pair(256, 1)}) {
    const int R = shape.first * shape.second;
    ncclMoeConfig_t c = llConfig(), r;
    c.numExperts = 16 * R;
    ASSERT_EQ(validateConfig(&c, R, config_fixture::kSms, &r), ncclSuccess) << ncclMoeGetLastError();
    const NodeMap m = mapOf(shape.first, shape.second);
    LlNetSlotRegions s;
    ASSERT_EQ(computeLlNetRegions(r, m, &s), ncclSuccess) << ncclMoeGetLastError();
    const size_t rows = (size_t)(R - shape.second) * r.maxTokensPerRank;
    EXPECT_EQ(s.dispatchStage, 0u);
    EXPECT_GE(s.dispatchLand - s.dispatchStage, rows * s.record.bytes);
    EXPECT_GE(s.combineStage - s.dispatchLand, rows * s.record.bytes);
    EXPECT_GE(s.combineLand - s.combineStage, rows * r.hidden * 2);
    EXPECT_GE(s.bytes - s.combineLand, rows * r.hidden * 2);
    EXPECT_EQ(s.countsStage, s.combineLand + rows * r.hidden * 2);  // partials are 256-aligned
    EXPECT_LE(s.bytes, s.destCount + sizeof(int) * (R - shape.second) + 4096);
    for (size_t off : {s.dispatchLand, s.combineStage, s.combineLand}) EXPECT_EQ(off % 256, 0u);
    EXPECT_EQ(s.bytes % 4096, 0u);
  }
  ncclMoeConfig_t c = llConfig(), r;
  ASSERT_EQ(validateConfig(&c, 8, config_fixture::kSms, &r), ncclSuccess);
  LlNetSlotRegions s;
  ASSERT_EQ(computeLlNetRegions(r, mapOf(1, 8), &s), ncclSuccess);
  EXPECT_EQ(s.bytes, 0u);  // one node: nothing crosses the network
}

TEST(NetRegions, OverflowIsAnError) {
  ncclMoeConfig_t c = llConfig();  // not validated: sizes past what validateConfig admits
  c.hidden = 1 << 30;
  c.maxTokensPerRank = 1 << 30;
  LlNetSlotRegions s;
  EXPECT_EQ(computeLlNetRegions(c, mapOf(256, 1), &s), ncclInvalidArgument);
  EXPECT_TRUE(containsWord(ncclMoeGetLastError(), "hidden")) << ncclMoeGetLastError();
}
