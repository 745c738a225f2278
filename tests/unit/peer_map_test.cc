// The kernels' peer abstraction (PeerMap, device/kernel_args.h): world rank -> node, local index,
// LSA index or remote, for single-node contexts (every peer LSA, LSA index = world rank) and for
// the multi-node shapes of the internode path, up to 256 ranks.
#include <gtest/gtest.h>

#include "device/kernel_args.h"

using namespace nccl_moe;

namespace {

PeerMap mapOf(int rank, int nRanks, int lsaSize) {
  return PeerMap{rank, nRanks, rank / lsaSize * lsaSize, lsaSize};
}

}  // namespace

TEST(PeerMap, SingleNodeEveryPeerIsLsaAtItsWorldRank) {
  for (int n : {1, 2, 8, 32}) {
    for (int me = 0; me < n; ++me) {
      const PeerMap p = mapOf(me, n, n);
      EXPECT_EQ(p.nodes(), 1);
      for (int r = 0; r < n; ++r) {
        EXPECT_EQ(p.lsaIndex(r), r) << me << " of " << n;
        EXPECT_EQ(p.node(r), 0);
        EXPECT_EQ(p.localIndex(r), r);
      }
    }
  }
}

TEST(PeerMap, NodesAreRunsOfLsaSizeRanks) {
  const PeerMap p = mapOf(5, 8, 4);  // 2 nodes x 4, rank 5 = node 1, local 1
  EXPECT_EQ(p.nodes(), 2);
  EXPECT_EQ(p.lsaBase, 4);
  for (int r = 0; r < 4; ++r) EXPECT_EQ(p.lsaIndex(r), kPeerRemote) << r;
  for (int r = 4; r < 8; ++r) EXPECT_EQ(p.lsaIndex(r), r - 4) << r;
  EXPECT_EQ(p.node(3), 0);
  EXPECT_EQ(p.node(4), 1);
  EXPECT_EQ(p.localIndex(6), 2);
  // Ranks outside the communicator are never LSA peers.
  EXPECT_EQ(p.lsaIndex(-1), kPeerRemote);
  EXPECT_EQ(p.lsaIndex(8), kPeerRemote);
}

TEST(PeerMap, LargestShapes) {
  // 256 ranks as 256 x 1, 32 nodes x 8 and 4 nodes x 64 (NVL72 racks running 64 ranks each).
  constexpr int kRanks = 256;
  for (int g : {1, 8, 64}) {
    for (int me : {0, 7, 100, kRanks - 1}) {
      const PeerMap p = mapOf(me, kRanks, g);
      EXPECT_EQ(p.nodes(), kRanks / g);
      int lsa = 0;
      for (int r = 0; r < kRanks; ++r) {
        const int i = p.lsaIndex(r);
        if (i == kPeerRemote) {
          EXPECT_NE(p.node(r), p.node(me));
          continue;
        }
        ++lsa;
        EXPECT_EQ(p.node(r), p.node(me));
        EXPECT_EQ(i, p.localIndex(r));
      }
      EXPECT_EQ(lsa, g) << "rank " << me << ", " << g << " per node";
    }
  }
}

