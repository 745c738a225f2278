// Issue 10 item 8: every size that feeds the EP window arithmetic is bounded, and the window
// layout is computed with overflow-checked arithmetic, so no config yields a wrapped-around
// window or a negative row size.
#include <limits.h>
#include <gtest/gtest.h>

#include <string>

#include "config.h"
#include "error_message_match.h"
#include "config_fixture.h"
#include "nccl_moe.h"

using namespace nccl_moe;

namespace {

using config_fixture::goodConfig;
using config_fixture::kRanks;
using config_fixture::kSms;

// Expects validateConfig and ncclMoeGetWindowSize to reject `c` naming `field`.
void expectRejected(const ncclMoeConfig_t& c, int nRanks, const char* field) {
  ncclMoeConfig_t r;
  EXPECT_EQ(validateConfig(&c, nRanks, kSms, &r), ncclInvalidArgument) << field;
  EXPECT_TRUE(containsWord(ncclMoeGetLastError(), field)) << ncclMoeGetLastError();
  size_t bytes = 0;
  EXPECT_EQ(ncclMoeGetWindowSize(&c, nRanks, &bytes), ncclInvalidArgument) << field;
  EXPECT_TRUE(containsWord(ncclMoeGetLastError(), field)) << ncclMoeGetLastError();
}

}  // namespace

// The review's case: a 16 GiB (wrapped) window from outputCapacity = INT_MAX and a huge hidden.
TEST(SizeLimits, IntMaxCapacityWithHugeHiddenRejected) {
  ncclMoeConfig_t c = goodConfig();
  c.outputCapacity = INT_MAX;
  c.hidden = 2130836488;
  expectRejected(c, kRanks, "hidden");
  c.hidden = 7168;  // hidden fine: the capacity alone is rejected
  expectRejected(c, kRanks, "outputCapacity");
}

TEST(SizeLimits, HiddenAboveMaximumRejected) {
  ncclMoeConfig_t c = goodConfig();
  for (int h : {(1 << 30) + 8, kMaxHidden + 8, INT_MAX - 7}) {
    c.hidden = h;
    expectRejected(c, kRanks, "hidden");
    EXPECT_TRUE(containsNumber(ncclMoeGetLastError(), h)) << ncclMoeGetLastError();
  }
}

// At the largest accepted hidden the row sizes the calls pass to the kernels stay positive ints.
TEST(SizeLimits, RowBytesPositiveAtMaximumHidden) {
  ncclMoeConfig_t c = goodConfig(), r;
  c.hidden = kMaxHidden;
  c.maxTokensPerRank = 64;
  ASSERT_EQ(validateConfig(&c, kRanks, kSms, &r), ncclSuccess) << ncclMoeGetLastError();
  EXPECT_EQ(rowBytes(r, ncclMoeBf16), 2 * kMaxHidden);
  EXPECT_EQ(rowBytes(r, ncclMoeFp8E4m3), kMaxHidden);
  EXPECT_GT(rowBytes(r, ncclMoeBf16), 0);
}

TEST(SizeLimits, OutputCapacityAboveRanksTimesMaxTokensRejected) {
  ncclMoeConfig_t c = goodConfig(), r;
  c.outputCapacity = kRanks * c.maxTokensPerRank;  // the most a rank can receive: accepted
  EXPECT_EQ(validateConfig(&c, kRanks, kSms, &r), ncclSuccess) << ncclMoeGetLastError();
  c.outputCapacity += 1;
  expectRejected(c, kRanks, "outputCapacity");
  EXPECT_TRUE(containsNumber(ncclMoeGetLastError(), c.outputCapacity)) << ncclMoeGetLastError();
}

// Every field is within its own bound, but the low-latency window (slots x experts x rows x
// hidden) exceeds 2^64 bytes: the checked arithmetic rejects it instead of wrapping.
TEST(SizeLimits, WindowOverflowRejected) {
  ncclMoeConfig_t c = goodConfig();
  c.mode = ncclMoeLowLatency;
  c.numExperts = kMaxExperts;
  c.topK = 8;
  c.hidden = kMaxHidden;
  c.maxTokensPerRank = 1 << 30;
  c.numBufferSlots = 8;
  expectRejected(c, 1, "hidden");  // the message lists the sizes involved
  ncclMoeConfig_t r = c;  // computeWindowLayout itself, on a resolved config
  WindowLayout w;
  EXPECT_EQ(computeWindowLayout(r, 1, &w), ncclInvalidArgument);
  r.numBufferSlots = 1;  // one slot (about 2^61 bytes) still fits in size_t
  EXPECT_EQ(computeWindowLayout(r, 1, &w), ncclSuccess) << ncclMoeGetLastError();
}

// The largest high-throughput window (2^30 rows of the largest hidden, ~2^49 bytes) is
// computed exactly: every region has its full size.
TEST(SizeLimits, LargestHighThroughputWindowExact) {
  ncclMoeConfig_t c = goodConfig(), r;
  c.hidden = kMaxHidden;
  c.maxTokensPerRank = (1 << 30) / kRanks;
  ASSERT_EQ(validateConfig(&c, kRanks, kSms, &r), ncclSuccess) << ncclMoeGetLastError();
  WindowLayout w;
  ASSERT_EQ(computeWindowLayout(r, kRanks, &w), ncclSuccess);
  const size_t cap = r.outputCapacity, H = r.hidden, K = r.topK;
  EXPECT_EQ(cap, (size_t)1 << 30);
  EXPECT_GE(w.recvScales - w.recvX, cap * H * 2);
  EXPECT_GE(w.recvTopkIdx - w.recvScales, cap * (H / 128) * 4);
  EXPECT_GE(w.recvTopkWeights - w.recvTopkIdx, cap * K * 8);
  EXPECT_GE(w.combineIn - w.recvTopkWeights, cap * K * 4);
  EXPECT_GE(w.total - w.combineIn, cap * H * 2);
}
