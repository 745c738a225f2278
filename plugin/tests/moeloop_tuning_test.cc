// CPU tests of the plugin's A/B switches (moeloop_gin.h, GinTuning): NCCL_MOELOOP_COALESCE (signal
// updates of a progress pass summed per word, or written one by one) and NCCL_MOELOOP_OVERLAP_SCAN
// (how many copy-transport puts in flight a new put scans for overlaps). Linked into the unit-test
// binary by plugin/plugin.mk.
#include <gtest/gtest.h>

#include <string.h>
#include <unistd.h>
#include <vector>

#include "../moeloop_gin.h"
#include "fake_gin_comm.h"
#include "../moeloop_log.h"
#include "../moeloop_shaping.h"
#include "../moeloop_stats.h"

namespace {

using moeloop::GinTuning;

// Restores the environment's switches when a test ends.
struct TuningOverride {
  GinTuning t;
  explicit TuningOverride(GinTuning v) : t(v) { moeloop::setGinTuningForTesting(&t); }
  ~TuningOverride() { moeloop::setGinTuningForTesting(nullptr); }
};

TEST(PluginTuning, EnvironmentValues) {
  struct Case {
    const char *coalesce, *overlapScan;
    bool coalesceSignals;
    size_t overlapScanLimit;
  };
  const Case cases[] = {
      {nullptr, nullptr, true, 64},  // the defaults are the current behaviour
      {"", "", true, 64},
      {"0", "0", false, 0},
      {"1", "all", true, 0},
      {"0", "16", false, 16},
      {"yes", "-3", true, 64},  // malformed values keep the defaults (with a warning)
      {"2", "12x", true, 64},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(testing::Message() << "COALESCE=" << (c.coalesce ? c.coalesce : "(unset)")
                                    << " OVERLAP_SCAN=" << (c.overlapScan ? c.overlapScan : "(unset)"));
    const GinTuning t = moeloop::ginTuningFrom(c.coalesce, c.overlapScan);
    EXPECT_EQ(t.coalesceSignals, c.coalesceSignals);
    EXPECT_EQ(t.overlapScanLimit, c.overlapScanLimit);
  }
}

// A rank-0 comm of 2 ranks whose connection from rank 1 is one end of a socket pair; the test
// writes rank 1's headers into the other end and runs progress passes.
class PluginSignalPass : public ::testing::Test {
 protected:
  void SetUp() override {
    peerEnd_ = moeloop_test::initFakeGinComm(c_, reg_, words_, sizeof(words_), /*sender=*/false);
    ASSERT_GE(peerEnd_, 0);
  }
  void TearDown() override {
    close(c_.peers[1].recvFd);
    c_.peers[1].recvFd = -1;
    close(peerEnd_);
  }
  // A signal-only put of rank 1 whose (empty) payload the copy engine has "moved": timed hops.
  void sendSignal(uint64_t sigOff, uint32_t op, uint64_t value) {
    moeloop::GinWireHeader h;
    memset(&h, 0, sizeof(h));
    h.magic = moeloop::kGinWireMagic;
    h.op = op | moeloop::kGinOpCopied;
    h.seq = seq_++;
    h.sendNs = h.sentNs = moeloop::nowNs();
    h.dstRegId = moeloop::kNoRegistration;
    h.sigRegId = 0;
    h.sigRegSize = sizeof(words_);
    h.sigOff = sigOff;
    h.sigValue = value;
    ASSERT_EQ(write(peerEnd_, &h, sizeof(h)), (ssize_t)sizeof(h));
  }
  // Runs one pass over the headers written so far; returns the counters it moved.
  moeloopStats_t pass() {
    moeloopStats_t before{}, after{};
    moeloopGetStats(&before, sizeof(before));
    EXPECT_EQ(moeloop::ginProgressLocked(&c_), ncclSuccess);
    moeloopGetStats(&after, sizeof(after));
    moeloopStats_t d{};
    d.ginSignals = after.ginSignals - before.ginSignals;
    d.ginSignalWrites = after.ginSignalWrites - before.ginSignalWrites;
    d.hopRecvPuts = after.hopRecvPuts - before.hopRecvPuts;
    d.hopApplyNs = after.hopApplyNs - before.hopApplyNs;
    return d;
  }
  // Rank 1's LL pattern: three updates of word 0 (its batches and its counts row), one of word 1.
  void sendPattern() {
    sendSignal(0, moeloop::kGinOpSignalAdd, 5);
    sendSignal(0, moeloop::kGinOpSignalInc, 0);
    sendSignal(0, moeloop::kGinOpSignalAdd, 10);
    sendSignal(8, moeloop::kGinOpSignalAdd, 2);
  }

  moeloop::GinCollComm c_;
  moeloop::GinRegistration reg_;
  uint64_t words_[2] = {0, 0};
  int peerEnd_ = -1;
  uint64_t seq_ = 0;
};

TEST_F(PluginSignalPass, CoalescedUpdatesAreWrittenOncePerWordByTheEndOfThePass) {
  TuningOverride on(GinTuning{true, 64});
  sendPattern();
  moeloopStats_t d = pass();
  EXPECT_EQ(words_[0], 16u);  // 5 + 1 + 10
  EXPECT_EQ(words_[1], 2u);
  EXPECT_EQ(d.ginSignals, 4u);       // every update counts
  EXPECT_EQ(d.ginSignalWrites, 2u);  // one write per word
  EXPECT_EQ(d.hopRecvPuts, 4u);      // hops of the summed puts recorded at their write
  EXPECT_EQ(c_.pendingSig, nullptr) << "the pass returned with an update not written";
  EXPECT_EQ(c_.pendingHopPuts, 0u);
  // The next pass with nothing to read changes nothing.
  d = pass();
  EXPECT_EQ(d.ginSignalWrites, 0u);
  EXPECT_EQ(words_[0], 16u);
}

TEST_F(PluginSignalPass, UncoalescedUpdatesAreWrittenOneByOne) {
  TuningOverride off(GinTuning{false, 64});
  sendPattern();
  moeloopStats_t d = pass();
  EXPECT_EQ(words_[0], 16u);  // the same values
  EXPECT_EQ(words_[1], 2u);
  EXPECT_EQ(d.ginSignals, 4u);
  EXPECT_EQ(d.ginSignalWrites, 4u);  // one write per update, as before 4bc4d5d
  EXPECT_EQ(d.hopRecvPuts, 4u);
  EXPECT_EQ(c_.pendingSig, nullptr);
}

// Copy-transport puts in flight to one peer, for ginCopyWaitsFor: put i on stream i % 4 writes
// [i * 100, i * 100 + 100) of registration 0 of the peer.
struct InFlight {
  std::vector<moeloop::GinRequest> reqs;
  moeloop::GinPeer peer;
  char events[1];  // any non-null pointer: no CUDA here
  explicit InFlight(size_t n) : reqs(n) {
    for (size_t i = 0; i < n; i++) {
      moeloop::GinRequest& q = reqs[i];
      memset(&q, 0, sizeof(q));
      q.kind = moeloop::GinReqKind::kPut;
      q.path = moeloop::GinPath::kCopy;
      q.hdr.size = 100;
      q.hdr.dstOff = i * 100;
      q.remoteId = 0;
      q.stream = (int)(i % moeloop::kGinCopyStreams);
      q.recorded = true;
      q.event = events;
      peer.sendQueue.push_back(&q);
      peer.lastOnStream[q.stream] = &q;
    }
    peer.issuedCount = n;
  }
  // The puts a new put on stream 0 over bytes [off, off + 100) waits for (indices into reqs).
  std::vector<size_t> waitsOf(uint64_t off, size_t scanLimit) {
    moeloop::GinRequest r;
    memset(&r, 0, sizeof(r));
    r.kind = moeloop::GinReqKind::kPut;
    r.path = moeloop::GinPath::kCopy;
    r.hdr.size = 100;
    r.hdr.dstOff = off;
    r.stream = 0;
    std::vector<size_t> out;
    EXPECT_EQ(moeloop::ginCopyWaitsFor(peer, r, scanLimit, [&](const moeloop::GinRequest* q) {
      out.push_back((size_t)(q - reqs.data()));
      return ncclSuccess;
    }), ncclSuccess);
    return out;
  }
};

TEST(PluginTuning, OverlapScanLimitPicksTheWaits) {
  // Few in flight: only the overlapping put on another stream (put 6, stream 2; bytes 650..749
  // also touch put 7, stream 3).
  InFlight few(10);
  EXPECT_EQ(few.waitsOf(650, 64), (std::vector<size_t>{6, 7}));
  EXPECT_EQ(few.waitsOf(650, 0), (std::vector<size_t>{6, 7}));
  EXPECT_EQ(few.waitsOf(800, 64), (std::vector<size_t>{}));  // put 8 is on stream 0 itself
  // Many in flight: bounded (default 64) waits for the latest put of every other stream
  // (97, 98, 99 on streams 1..3), whatever overlaps; 0 scans them all, as before fedde70.
  InFlight many(100);
  EXPECT_EQ(many.waitsOf(650, 64), (std::vector<size_t>{97, 98, 99}));
  EXPECT_EQ(many.waitsOf(650, 0), (std::vector<size_t>{6, 7}));
  EXPECT_EQ(many.waitsOf(650, 100), (std::vector<size_t>{6, 7}));  // 100 in flight: not more
  EXPECT_EQ(many.waitsOf(650, 99), (std::vector<size_t>{97, 98, 99}));
}

}  // namespace
