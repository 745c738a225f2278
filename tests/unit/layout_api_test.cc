// ncclMoeGetLayout / ncclMoeGetLayoutNodes / ncclMoeCommNodeCount: the checks they make before
// any CUDA call, on a FakeContext (no GPU behind it). What the layout kernel writes is checked
// against the CPU reference in tests/gpu/ht_layout_test.cc.
#include <stdint.h>
#include <gtest/gtest.h>

#include <string>

#include "error_message_match.h"
#include "fake_context.h"
#include "nccl_moe.h"

namespace {

alignas(64) char buffer[256];  // host memory: only its addresses are used (never reached CUDA)
const int64_t* idxAt(int offset) { return (const int64_t*)(buffer + offset); }
int* intsAt(int offset) { return (int*)(buffer + offset); }
uint8_t* bytesAt(int offset) { return (uint8_t*)(buffer + offset); }

// ncclMoeGetLayoutNodes on `c` with aligned buffers except where the arguments say otherwise.
ncclResult_t layoutNodes(ncclMoeComm_t c, const int64_t* idx, int numTokens, int* perRank, int* perExpert,
                         int* perNode) {
  return ncclMoeGetLayoutNodes(c, idx, numTokens, perRank, perExpert, bytesAt(128), perNode, bytesAt(192),
                               nullptr);
}

}  // namespace

TEST(LayoutApi, NodeCountIsTheContextsNodeMap) {
  FakeContext f(ncclMoeLowLatency);
  f.c->nodes = nccl_moe::NodeMap{4, 2, 2};  // 2 nodes x 2 GPUs
  int n = -1;
  ASSERT_EQ(ncclMoeCommNodeCount(f.c, &n), ncclSuccess) << ncclMoeGetLastError();
  EXPECT_EQ(n, 2);
  f.c->nodes = nccl_moe::NodeMap{4, 4, 1};
  ASSERT_EQ(ncclMoeCommNodeCount(f.c, &n), ncclSuccess) << ncclMoeGetLastError();
  EXPECT_EQ(n, 1);
  EXPECT_FAILS(ncclMoeCommNodeCount(f.c, nullptr), ncclInvalidArgument, "nNodes");
}

// Every argument error names the argument and the entry point that was called.
TEST(LayoutApi, ArgumentErrorsNameTheArgument) {
  FakeContext f(ncclMoeHighThroughput);  // R = 4, maxTokensPerRank = 128
  f.c->nodes = nccl_moe::NodeMap{4, 4, 1};
  const ncclResult_t bad = ncclInvalidArgument;
  EXPECT_FAILS(layoutNodes(f.c, idxAt(0), 129, intsAt(64), intsAt(96), intsAt(112)), bad, "numTokens");
  EXPECT_TRUE(containsNumber(ncclMoeGetLastError(), 129)) << ncclMoeGetLastError();
  EXPECT_FAILS(layoutNodes(f.c, idxAt(0), -1, intsAt(64), intsAt(96), intsAt(112)), bad, "numTokens");
  EXPECT_FAILS(layoutNodes(f.c, nullptr, 4, intsAt(64), intsAt(96), intsAt(112)), bad, "topkIdx");
  EXPECT_FAILS(layoutNodes(f.c, idxAt(0), 4, nullptr, intsAt(96), intsAt(112)), bad, "tokensPerRank");
  EXPECT_FAILS(layoutNodes(f.c, idxAt(0), 4, intsAt(64), nullptr, intsAt(112)), bad, "tokensPerExpert");
  EXPECT_TRUE(containsWord(ncclMoeGetLastError(), "ncclMoeGetLayoutNodes")) << ncclMoeGetLastError();
  // Misaligned pointers are rejected before any CUDA call (the new output included).
  EXPECT_FAILS(layoutNodes(f.c, idxAt(4), 4, intsAt(64), intsAt(96), intsAt(112)), bad, "topkIdx");
  EXPECT_FAILS(layoutNodes(f.c, idxAt(0), 4, intsAt(66), intsAt(96), intsAt(112)), bad, "tokensPerRank");
  EXPECT_FAILS(layoutNodes(f.c, idxAt(0), 4, intsAt(64), intsAt(97), intsAt(112)), bad, "tokensPerExpert");
  EXPECT_FAILS(layoutNodes(f.c, idxAt(0), 4, intsAt(64), intsAt(96), intsAt(114)), bad, "tokensPerNode");
  // ncclMoeGetLayout makes the same checks under its own name.
  EXPECT_FAILS(ncclMoeGetLayout(f.c, idxAt(0), 4, intsAt(64), nullptr, nullptr, nullptr), bad, "tokensPerExpert");
  EXPECT_TRUE(containsWord(ncclMoeGetLastError(), "ncclMoeGetLayout")) << ncclMoeGetLastError();
}

// The kernel keeps a token's ranks and nodes in one 64-bit word: at most 32 ranks.
TEST(LayoutApi, MoreThan32RanksRefused) {
  FakeContext f(ncclMoeLowLatency);
  f.c->nRanks = 64;
  f.c->nodes = nccl_moe::NodeMap{64, 8, 8};
  EXPECT_EQ(layoutNodes(f.c, idxAt(0), 4, intsAt(64), intsAt(96), intsAt(112)), ncclInvalidUsage);
  EXPECT_TRUE(containsNumber(ncclMoeGetLastError(), 64)) << ncclMoeGetLastError();
}
