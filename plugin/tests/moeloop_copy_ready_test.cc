// CPU test of the copy transport's readiness (ginCopyPollReady): puts in flight to one peer serve
// their shaped latency at the same time, as moeloop_shaping.h promises ("a stream of puts
// overlaps its latencies"), not one after the other behind the in-order header cursor. Signal-only
// puts take the copy path's header-only route, so no GPU is needed. Linked into the unit-test
// binary by plugin/plugin.mk.
#include <gtest/gtest.h>

#include <string.h>
#include <unistd.h>

#include "../moeloop_gin.h"
#include "fake_gin_comm.h"
#include "../moeloop_gin_api.h"
#include "../moeloop_shaping.h"
#include "../moeloop_stats.h"

namespace {

// A rank-0 comm of 2 ranks whose connection to rank 1 (a copy peer) is one end of a socket pair.
class PluginCopyReady : public ::testing::Test {
 protected:
  void SetUp() override {
    peerEnd_ = moeloop_test::initFakeGinComm(c_, reg_, words_, sizeof(words_), /*sender=*/true);
    ASSERT_GE(peerEnd_, 0);
  }
  void TearDown() override {
    moeloop::setShapingConfig(moeloop::ShapingConfig{});
    for (moeloop::GinRequest* r : c_.pool) delete r;
    c_.pool.clear();
    c_.freeList.clear();
    c_.peers[1].sendQueue.clear();
    close(c_.peers[1].sendFd);
    c_.peers[1].sendFd = -1;
    close(peerEnd_);
    c_.magic = 0;
  }
  void* signalOnly(uint64_t sigOff) {
    moeloop::GinPut p;
    p.rank = 1;
    p.signalOp = NCCL_NET_SIGNAL_OP_INC;
    p.signalOff = sigOff;
    p.signalMhandle = &reg_;
    void* r = nullptr;
    EXPECT_EQ(moeloop::ginPutOnComm(&c_, p, &r), ncclSuccess);
    return r;
  }

  moeloop::GinCollComm c_;
  moeloop::GinRegistration reg_;
  uint64_t words_[2] = {0, 0};
  int peerEnd_ = -1;
};

TEST_F(PluginCopyReady, LatenciesOfPutsInFlightOverlap) {
  const uint64_t latencyNs = 50000000;  // 50 ms: far above any scheduling noise of the test
  moeloop::ShapingConfig cfg;
  cfg.latencyNs = latencyNs;
  moeloop::setShapingConfig(cfg);
  moeloopStats_t before{}, after{};
  moeloopGetStats(&before, sizeof(before));
  const uint64_t t0 = moeloop::nowNs();
  void* r[3] = {signalOnly(0), signalOnly(8), signalOnly(0)};
  uint64_t doneNs[3] = {0, 0, 0};
  while (!(doneNs[0] && doneNs[1] && doneNs[2])) {
    ASSERT_EQ(moeloop::ginProgressComm(&c_), ncclSuccess);
    for (int k = 0; k < 3; k++) {
      if (doneNs[k]) continue;
      int done = 0;
      ASSERT_EQ(moeloop::ginTest(&c_, r[k], &done), ncclSuccess);
      if (done) doneNs[k] = moeloop::nowNs();
    }
    ASSERT_LT(moeloop::nowNs() - t0, 20 * latencyNs) << "puts never completed";
  }
  moeloopGetStats(&after, sizeof(after));
  // Every put waited for its latency; the later ones did not wait for it again after the earlier
  // ones (before the per-stream readiness: the k-th put went at about (k + 1) latencies).
  for (int k = 0; k < 3; k++) {
    EXPECT_GE(doneNs[k] - t0, latencyNs) << "put " << k;
    EXPECT_LT(doneNs[k] - t0, latencyNs + latencyNs / 2) << "put " << k;
  }
  // Headers in put order, each flagged as moved by the copy path.
  moeloop::GinWireHeader h[3];
  ASSERT_EQ(read(peerEnd_, h, sizeof(h)), (ssize_t)sizeof(h));
  for (int k = 0; k < 3; k++) {
    EXPECT_EQ(h[k].seq, (uint64_t)k);
    EXPECT_NE(h[k].op & moeloop::kGinOpCopied, 0u);
  }
  EXPECT_EQ(h[1].sigOff, 8u);
  // Hops: nothing to copy (copy 0), the latency in each put's release.
  ASSERT_EQ(after.hopSentPuts - before.hopSentPuts, 3u);
  EXPECT_EQ(after.hopCopyNs - before.hopCopyNs, 0u);
  EXPECT_GE(after.hopReleaseNs - before.hopReleaseNs, 3 * latencyNs);
}

}  // namespace
