// NCCL_MOE_SEQ_START (src/sequence_start.h) on the host: what it refuses before touching the
// device. The preset itself is GPU-tested (tests/gpu/sequence_test.cc).
#include <stdlib.h>
#include <string>
#include <gtest/gtest.h>

#include "error_message_match.h"
#include "fake_context.h"
#include "sequence_start.h"

namespace {

struct SeqStartEnv {
  explicit SeqStartEnv(const char* v) { setenv("NCCL_MOE_SEQ_START", v, 1); }
  ~SeqStartEnv() { unsetenv("NCCL_MOE_SEQ_START"); }
};

TEST(SequenceStart, NotANumberRejectedWithTheValue) {
  FakeContext f(ncclMoeLowLatency);
  SeqStartEnv env("12x");
  EXPECT_EQ(nccl_moe::applySequenceStart(f.c), ncclInvalidArgument);
  EXPECT_NE(std::string(ncclMoeGetLastError()).find("\"12x\""), std::string::npos) << ncclMoeGetLastError();
}

TEST(SequenceStart, RefusedOnSeveralNodes) {
  FakeContext f(ncclMoeLowLatency);
  f.c->nodes.nRanks = 4;
  f.c->nodes.gpusPerNode = 2;
  f.c->nodes.nNodes = 2;
  SeqStartEnv env("4294967290");
  EXPECT_EQ(nccl_moe::applySequenceStart(f.c), ncclInvalidUsage);
  const std::string msg = ncclMoeGetLastError();
  EXPECT_TRUE(containsNumber(msg, 4294967290LL)) << msg;
  EXPECT_NE(msg.find("single-node"), std::string::npos) << msg;
}

TEST(SequenceStart, ZeroIsNothingToDo) {
  FakeContext f(ncclMoeLowLatency);
  f.c->nodes.nNodes = 2;
  SeqStartEnv env("0");
  EXPECT_EQ(nccl_moe::applySequenceStart(f.c), ncclSuccess);
}

}  // namespace
