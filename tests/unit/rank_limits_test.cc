// Rank limits: EP communicators of up to kMaxRanks = 256 ranks in low-latency mode, high-throughput
// mode (one warp lane per peer) up to kMaxHtRanks = 32, each rejected beyond with a message that
// names the limit; the low-latency window at 256 ranks (rank masks of 8 words, per-rank rows).
#include <gtest/gtest.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "config.h"
#include "config_fixture.h"
#include "error_message_match.h"
#include "nccl_moe.h"

using namespace nccl_moe;
using config_fixture::kSms;

namespace {

// DeepSeek-V3 decode on R ranks: 288 experts rounded up to a multiple of R, H 7168, top-8,
// 128 tokens, FP8 with UE8M0 scales, two slots.
ncclMoeConfig_t llConfig(int nRanks) {
  ncclMoeConfig_t c = config_fixture::goodConfig();
  c.mode = ncclMoeLowLatency;
  c.numExperts = (288 + nRanks - 1) / nRanks * nRanks;
  c.maxTokensPerRank = 128;
  c.dispatchDtype = ncclMoeFp8E4m3;
  c.fp8Scales = ncclMoeScaleUe8m0;
  c.numBufferSlots = 2;
  return c;
}

}  // namespace

TEST(RankLimits, Constants) {
  EXPECT_EQ(kMaxRanks, 256);
  EXPECT_EQ(kMaxHtRanks, 32);
  EXPECT_EQ(kRankMaskWords, 8);
  EXPECT_EQ(rankMaskWords(1), 1);
  EXPECT_EQ(rankMaskWords(32), 1);
  EXPECT_EQ(rankMaskWords(33), 2);
  EXPECT_EQ(rankMaskWords(72), 3);
  EXPECT_EQ(rankMaskWords(kMaxRanks), kRankMaskWords);
}

TEST(RankLimits, LowLatencyUpTo256Ranks) {
  for (int n : {1, 2, 32, 33, 64, 72, 128, 256}) {
    ncclMoeConfig_t c = llConfig(n), r;
    EXPECT_EQ(validateConfig(&c, n, kSms, &r), ncclSuccess) << n << " ranks: " << ncclMoeGetLastError();
    size_t bytes = 0;
    EXPECT_EQ(ncclMoeGetWindowSize(&c, n, &bytes), ncclSuccess) << n << " ranks: " << ncclMoeGetLastError();
    EXPECT_GT(bytes, 0u);
  }
  ncclMoeConfig_t c = llConfig(kMaxRanks + 1), r;
  EXPECT_EQ(validateConfig(&c, kMaxRanks + 1, kSms, &r), ncclInvalidArgument);
  const std::string msg = ncclMoeGetLastError();
  EXPECT_TRUE(containsNumber(msg, kMaxRanks + 1)) << msg;
  EXPECT_TRUE(containsNumber(msg, kMaxRanks)) << msg;
}

TEST(RankLimits, HighThroughputUpTo32Ranks) {
  ncclMoeConfig_t c = config_fixture::goodConfig(), r;  // HT, 64 experts
  EXPECT_EQ(validateConfig(&c, kMaxHtRanks, kSms, &r), ncclSuccess) << ncclMoeGetLastError();
  c.numExperts = 66;
  EXPECT_EQ(validateConfig(&c, kMaxHtRanks + 1, kSms, &r), ncclInvalidArgument);
  const std::string msg = ncclMoeGetLastError();
  EXPECT_TRUE(containsWord(msg, "ncclMoeHighThroughput")) << msg;
  EXPECT_TRUE(containsNumber(msg, kMaxHtRanks)) << msg;
  EXPECT_TRUE(containsNumber(msg, kMaxHtRanks + 1)) << msg;
  EXPECT_TRUE(containsWord(msg, "ncclMoeLowLatency")) << msg;
  size_t bytes = 0;
  EXPECT_EQ(ncclMoeGetWindowSize(&c, kMaxHtRanks + 1, &bytes), ncclInvalidArgument);
}

// Every region of one LL slot at 256 ranks: aligned, disjoint, in the slot, sized for R = 256.
TEST(RankLimits, LowLatencyWindowAt256Ranks) {
  const int R = kMaxRanks;
  ncclMoeConfig_t c = llConfig(R), r;
  ASSERT_EQ(validateConfig(&c, R, kSms, &r), ncclSuccess) << ncclMoeGetLastError();
  WindowLayout w;
  ASSERT_EQ(computeWindowLayout(r, R, &w), ncclSuccess);
  const LowLatencySlotLayout& s = w.ll;
  const size_t L = r.numExperts / R, M = r.maxTokensPerRank, B = (size_t)R * M, H = r.hidden, K = r.topK;
  EXPECT_EQ(L, 2u);  // 288 -> 512 experts
  std::vector<std::pair<size_t, size_t>> regions = {
      {s.dispatchSignals, sizeof(uint64_t) * R},
      {s.combineSignals, sizeof(uint64_t) * R},
      {s.recvCounts, sizeof(int) * (L * R + L)},
      {s.route, sizeof(LlRouteEntry) * R * M * K},
      {s.tokenRanks, sizeof(uint32_t) * kRankMaskWords * M},
      {s.recvX, L * B * H},                       // FP8: one byte per element
      {s.recvScales, L * B * (H / kFp8GroupSize)},  // UE8M0: one byte per group
      {s.srcToken, sizeof(int) * L * B},
      {s.combineRecv, M * R * H * 2},
      {s.combineInput, L * B * H * 2}};
  size_t needed = 0;
  for (auto& rg : regions) {
    EXPECT_EQ(rg.first % 256, 0u) << "offset " << rg.first;
    EXPECT_LE(rg.first + rg.second, s.bytes);
    needed += rg.second;
  }
  std::sort(regions.begin(), regions.end());
  for (size_t i = 1; i < regions.size(); ++i)
    EXPECT_LE(regions[i - 1].first + regions[i - 1].second, regions[i].first) << "regions overlap at " << i;
  EXPECT_EQ(s.bytes % 4096, 0u);
  EXPECT_LE(s.bytes, needed + regions.size() * 256 + 4096);
  // The HT signals region has a column per possible rank; the slots follow the HT regions.
  EXPECT_EQ(w.counts - w.signals, sizeof(uint64_t) * kSignalKinds * kMaxRanks);
  EXPECT_EQ(w.total, w.llSlots + 2 * s.bytes);
  size_t bytes = 0;
  ASSERT_EQ(ncclMoeGetWindowSize(&c, R, &bytes), ncclSuccess);
  EXPECT_EQ(bytes, w.total);
}

// Up to 32 ranks a token's rank mask is one word, as before the limit grew.
TEST(RankLimits, OneMaskWordUpTo32Ranks) {
  for (int R : {8, 32}) {
    ncclMoeConfig_t c = llConfig(R), r;
    ASSERT_EQ(validateConfig(&c, R, kSms, &r), ncclSuccess) << ncclMoeGetLastError();
    WindowLayout w;
    ASSERT_EQ(computeWindowLayout(r, R, &w), ncclSuccess);
    EXPECT_EQ(w.ll.recvX - w.ll.tokenRanks, (sizeof(uint32_t) * r.maxTokensPerRank + 255) / 256 * 256);
  }
}
