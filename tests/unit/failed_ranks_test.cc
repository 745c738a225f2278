// The low-latency failed-rank set on the host (src/failed_ranks.cc, comm.cc): what
// ncclMoeMarkRankFailed accepts, what ncclMoeGetFailedRanks and each kernel's snapshot contain
// (marked ranks and ranks a kernel found failed), and how a kernel's finding is reported.
// FakeContext: rank 0 of 4, no CUDA behind it; the GPU side is tests/gpu/ll_failed_rank_test.cc.
#include <vector>
#include <gtest/gtest.h>

#include "error_message_match.h"
#include "fake_context.h"
#include "nccl_moe.h"

namespace {

std::vector<int> getSet(ncclMoeComm* c) {
  std::vector<int> failed(c->nRanks, -1);
  EXPECT_EQ(ncclMoeGetFailedRanks(c, failed.data(), c->nRanks), ncclSuccess) << ncclMoeGetLastError();
  return failed;
}

TEST(FailedRanks, EmptyAtFirstThenMarkedRanks) {
  FakeContext f(ncclMoeLowLatency);
  EXPECT_EQ(getSet(f.c), std::vector<int>({0, 0, 0, 0}));
  EXPECT_EQ(ncclMoeMarkRankFailed(f.c, 2), ncclSuccess) << ncclMoeGetLastError();
  EXPECT_EQ(ncclMoeMarkRankFailed(f.c, 2), ncclSuccess) << "marking twice is harmless";
  EXPECT_EQ(getSet(f.c), std::vector<int>({0, 0, 1, 0}));
  EXPECT_TRUE(nccl_moe::failedRanks(f.c).has(2));
  EXPECT_FALSE(nccl_moe::failedRanks(f.c).has(3));
}

TEST(FailedRanks, RanksFoundByKernelsJoinTheSetAndTheSnapshot) {
  FakeContext f(ncclMoeLowLatency);
  f.c->nRanks = 40;  // two mask words
  ASSERT_EQ(ncclMoeMarkRankFailed(f.c, 1), ncclSuccess) << ncclMoeGetLastError();
  f.failedWords[1] = 1u << (33 - 32);  // what markRankFailed writes for rank 33
  const nccl_moe::RankSet s = nccl_moe::failedRanks(f.c);
  for (int r = 0; r < 40; r++) EXPECT_EQ(s.has(r), r == 1 || r == 33) << "rank " << r;
  std::vector<int> failed(40, -1);
  ASSERT_EQ(ncclMoeGetFailedRanks(f.c, failed.data(), 40), ncclSuccess) << ncclMoeGetLastError();
  for (int r = 0; r < 40; r++) EXPECT_EQ(failed[r], r == 1 || r == 33 ? 1 : 0) << "rank " << r;
}

TEST(FailedRanks, BadArgumentsRejectedAndNothingMarked) {
  FakeContext f(ncclMoeLowLatency);
  EXPECT_FAILS(ncclMoeMarkRankFailed(f.c, -1), ncclInvalidArgument, "rank");
  EXPECT_FAILS(ncclMoeMarkRankFailed(f.c, 4), ncclInvalidArgument, "rank");
  EXPECT_FAILS(ncclMoeMarkRankFailed(f.c, 0), ncclInvalidArgument, "itself");  // the fake is rank 0
  std::vector<int> failed(5, 0);
  EXPECT_FAILS(ncclMoeGetFailedRanks(f.c, nullptr, 4), ncclInvalidArgument, "failed");
  EXPECT_FAILS(ncclMoeGetFailedRanks(f.c, failed.data(), 5), ncclInvalidArgument, "count");
  EXPECT_FAILS(ncclMoeMarkRankFailed(nullptr, 1), ncclInvalidArgument, "moeComm");
  EXPECT_FAILS(ncclMoeGetFailedRanks(nullptr, failed.data(), 4), ncclInvalidArgument, "moeComm");
  EXPECT_EQ(getSet(f.c), std::vector<int>({0, 0, 0, 0}));
}

TEST(FailedRanks, HighThroughputContextRefuses) {
  FakeContext f(ncclMoeHighThroughput);
  std::vector<int> failed(4, 0);
  EXPECT_FAILS(ncclMoeMarkRankFailed(f.c, 1), ncclInvalidUsage, "low");
  EXPECT_FAILS(ncclMoeGetFailedRanks(f.c, failed.data(), 4), ncclInvalidUsage, "high");
}

// A kernel's timeout is a local error: reported once (ncclRemoteError, naming the rank and the
// set), and the context keeps working.
TEST(FailedRanks, KernelTimeoutReportedOnceAsRemoteError) {
  FakeContext f(ncclMoeLowLatency);
  f.c->cfg.timeoutMs = 2000;
  nccl_moe::DeviceError& local = f.errors[nccl_moe::kErrorLocal];
  local.a = nccl_moe::kWaitLlDispatch;
  local.b = 3;
  local.c = 0;
  local.claimed = 1;
  local.code = nccl_moe::kDevRankFailed;
  f.failedWords[0] = 1u << 3;
  EXPECT_EQ(ncclMoeCheckErrors(f.c), ncclRemoteError);
  const std::string msg = ncclMoeGetLastError();
  EXPECT_NE(msg.find("rank 3 did not take part"), std::string::npos) << msg;
  EXPECT_NE(msg.find("failed-rank set"), std::string::npos) << msg;
  EXPECT_TRUE(containsNumber(msg, 2000)) << msg;
  EXPECT_EQ(ncclMoeCheckErrors(f.c), ncclSuccess) << "reported twice: " << ncclMoeGetLastError();
  EXPECT_EQ(getSet(f.c), std::vector<int>({0, 0, 0, 1}));
}

}  // namespace
