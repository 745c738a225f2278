// Issue 10 item 6: ncclMoeCommCreate decides collectively. Every rank all-gathers the votes and
// runs decideCreate on the same votes, so these tests check that the decision depends on the
// votes only (never on the calling rank) and says which rank failed and why.
#include <string.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "config_fixture.h"
#include "create_agreement.h"
#include "error_message_match.h"
#include "nccl_moe.h"

using namespace nccl_moe;

namespace {

// The fixture's config as validateConfig resolves it on 4 ranks (defaults filled in).
ncclMoeConfig_t goodConfig() {
  ncclMoeConfig_t c = config_fixture::goodConfig();
  c.outputCapacity = 4 * 4096;
  c.timeoutMs = 30000;
  c.numBufferSlots = 2;
  return c;
}

std::vector<CreateVote> okVotes(int n, bool withConfig) {
  std::vector<CreateVote> v(n);
  const ncclMoeConfig_t c = goodConfig();
  for (CreateVote& x : v) fillVote(&x, ncclSuccess, "", withConfig ? &c : nullptr);
  return v;
}

}  // namespace

TEST(CreateAgreement, AllRanksReadySucceeds) {
  std::vector<CreateVote> v = okVotes(4, true);
  EXPECT_EQ(decideCreate(v.data(), 4, "checking the configuration"), ncclSuccess) << ncclMoeGetLastError();
  v = okVotes(4, false);
  EXPECT_EQ(decideCreate(v.data(), 4, "allocating"), ncclSuccess);
}

// Rank 1's bad hidden: every rank (same votes) fails with rank 1's code and message.
TEST(CreateAgreement, FailingRankMessageIsTheSameOnEveryRank) {
  std::vector<CreateVote> v = okVotes(3, true);
  fillVote(&v[1], ncclInvalidArgument, "config.hidden = 12 must be a positive multiple of 8, at most 65536",
           nullptr);
  std::string first;
  for (int caller = 0; caller < 3; ++caller) {
    EXPECT_EQ(decideCreate(v.data(), 3, "checking the configuration"), ncclInvalidArgument);
    const std::string msg = ncclMoeGetLastError();
    if (caller == 0) first = msg;
    EXPECT_EQ(msg, first);
  }
  EXPECT_NE(first.find("rank 1: config.hidden = 12"), std::string::npos) << first;
  EXPECT_TRUE(containsWord(first, "ncclMoeCommCreate")) << first;
}

TEST(CreateAgreement, LowestFailingRankWins) {
  std::vector<CreateVote> v = okVotes(4, false);
  fillVote(&v[3], ncclInvalidUsage, "current CUDA device 1 is not comm's device 3", nullptr);
  fillVote(&v[2], ncclUnhandledCudaError, "cudaMalloc failed: out of memory", nullptr);
  EXPECT_EQ(decideCreate(v.data(), 4, "allocating"), ncclUnhandledCudaError);
  const std::string msg = ncclMoeGetLastError();
  EXPECT_NE(msg.find("rank 2: cudaMalloc failed"), std::string::npos) << msg;
  EXPECT_NE(msg.find("allocating"), std::string::npos) << msg;
}

TEST(CreateAgreement, ConfigMismatchNamesRankFieldAndValues) {
  std::vector<CreateVote> v = okVotes(4, true);
  ncclMoeConfig_t other = goodConfig();
  other.numSms = 20;
  fillVote(&v[2], ncclSuccess, "", &other);
  EXPECT_EQ(decideCreate(v.data(), 4, "checking the configuration"), ncclInvalidArgument);
  const std::string msg = ncclMoeGetLastError();
  EXPECT_NE(msg.find("rank 2 passed config.numSms = 20 but rank 0 passed 24"), std::string::npos) << msg;
}

// A peer's message is bytes from another process: a missing terminator must not overrun.
TEST(CreateAgreement, UnterminatedPeerMessageBounded) {
  std::vector<CreateVote> v = okVotes(2, false);
  v[1].code = ncclInvalidArgument;
  memset(v[1].message, 'A', sizeof(v[1].message));
  EXPECT_EQ(decideCreate(v.data(), 2, "allocating"), ncclInvalidArgument);
  const std::string msg = ncclMoeGetLastError();
  EXPECT_LT(msg.size(), 1024u);
  EXPECT_NE(msg.find(std::string(kVoteMessageBytes - 1, 'A')), std::string::npos);
}

// A long local message is cut to fit the vote, terminated.
TEST(CreateAgreement, LongLocalMessageTruncated) {
  CreateVote v;
  const std::string longMsg(2 * kVoteMessageBytes, 'm');
  fillVote(&v, ncclInvalidArgument, longMsg.c_str(), nullptr);
  EXPECT_EQ(strlen(v.message), (size_t)kVoteMessageBytes - 1);
  EXPECT_EQ(v.hasConfig, 0);
}
