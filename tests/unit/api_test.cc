// The public API's argument checks, which need no GPU: every call given a NULL context or
// output pointer returns ncclInvalidArgument and names the argument in ncclMoeGetLastError().
// No call here may touch CUDA or NCCL before rejecting its NULL argument.
#include <ctype.h>
#include <string.h>
#include <gtest/gtest.h>

#include <string>
#include <thread>

#include "nccl_moe.h"
#include "config.h"
#include "error_message_match.h"

namespace {

// A NULL or bad argument: ncclInvalidArgument, and the message names it.
#define EXPECT_REJECTS(call, name) EXPECT_FAILS(call, ncclInvalidArgument, name)

ncclMoeConfig_t goodConfig() {
  ncclMoeConfig_t c = NCCL_MOE_CONFIG_INITIALIZER;
  c.numExperts = 8;
  c.hidden = 1024;
  c.topK = 2;
  c.maxTokensPerRank = 128;
  c.numSms = 4;
  return c;
}

// A non-NULL communicator that must never be dereferenced: the NULL-argument checks come first.
ncclComm_t fakeComm() {
  alignas(64) static char storage[1 << 16] = {};
  return reinterpret_cast<ncclComm_t>(storage);
}

}  // namespace

TEST(Api, Version) {
  int v = -1;
  ASSERT_EQ(ncclMoeGetVersion(&v), ncclSuccess);
  EXPECT_EQ(v, NCCL_MOE_VERSION_CODE);
  EXPECT_EQ(v, NCCL_MOE_MAJOR * 10000 + NCCL_MOE_MINOR * 100 + NCCL_MOE_PATCH);
  EXPECT_REJECTS(ncclMoeGetVersion(nullptr), "version");
}

TEST(Api, LastErrorClearedBySuccess) {
  EXPECT_NE(ncclMoeCheckErrors(nullptr), ncclSuccess);
  EXPECT_STRNE(ncclMoeGetLastError(), "");
  int v;
  ASSERT_EQ(ncclMoeGetVersion(&v), ncclSuccess);
  EXPECT_STREQ(ncclMoeGetLastError(), "");
}

TEST(Api, LastErrorIsThreadLocal) {
  int v;
  ASSERT_EQ(ncclMoeGetVersion(&v), ncclSuccess);
  std::string other;
  std::thread t([&] {
    ncclMoeCheckErrors(nullptr);
    other = ncclMoeGetLastError();
  });
  t.join();
  EXPECT_TRUE(containsWord(other, "moeComm")) << other;
  EXPECT_STREQ(ncclMoeGetLastError(), "");
}

TEST(Api, CommCreateNullArguments) {
  ncclMoeConfig_t cfg = goodConfig();
  ncclMoeComm_t moe = reinterpret_cast<ncclMoeComm_t>(0x1);
  EXPECT_REJECTS(ncclMoeCommCreate(nullptr, &cfg, &moe), "comm");
  EXPECT_REJECTS(ncclMoeCommCreate(fakeComm(), nullptr, &moe), "config");
  EXPECT_REJECTS(ncclMoeCommCreate(fakeComm(), &cfg, nullptr), "moeComm");
  EXPECT_REJECTS(ncclMoeCommDestroy(nullptr), "moeComm");
}

TEST(Api, NullContext) {
  ncclMoeHandle_t handle = nullptr;
  ncclMoeDispatchOutput_t out;
  EXPECT_REJECTS(ncclMoeDispatch(nullptr, nullptr, nullptr, nullptr, nullptr, 0, 0, &handle, &out,
                                 nullptr),
                 "moeComm");
  EXPECT_EQ(handle, nullptr);  // nothing allocated on failure
  EXPECT_REJECTS(ncclMoeCombine(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr), "moeComm");
  int perRank[4], perExpert[8];
  EXPECT_REJECTS(ncclMoeGetLayout(nullptr, nullptr, 0, perRank, perExpert, nullptr, nullptr),
                 "moeComm");
  int perNode[1];
  EXPECT_REJECTS(ncclMoeGetLayoutNodes(nullptr, nullptr, 0, perRank, perExpert, nullptr, perNode, nullptr,
                                       nullptr),
                 "moeComm");
  EXPECT_REJECTS(ncclMoeCommNodeCount(nullptr, perNode), "moeComm");
  EXPECT_REJECTS(ncclMoeCheckErrors(nullptr), "moeComm");
  EXPECT_REJECTS(ncclMoeHandleDestroy(nullptr), "handle");
}

TEST(Api, LowLatencyNullContext) {
  ncclMoeLowLatencyOutput_t out;
  memset(&out, 0, sizeof(out));
  EXPECT_REJECTS(ncclMoeLowLatencyDispatch(nullptr, nullptr, nullptr, nullptr, 0, 0, &out, nullptr),
                 "moeComm");
  EXPECT_REJECTS(ncclMoeLowLatencyDispatchComplete(nullptr, &out, nullptr), "moeComm");
  EXPECT_REJECTS(ncclMoeLowLatencyCombine(nullptr, &out, nullptr, nullptr, 0, nullptr), "moeComm");
  EXPECT_REJECTS(ncclMoeLowLatencyCombineComplete(nullptr, &out, nullptr, nullptr), "moeComm");
}

// The size query is what creation allocates: validate like creation, then the window layout.
TEST(Api, WindowSizeQuery) {
  ncclMoeConfig_t cfg = goodConfig();
  size_t bytes = 0;
  EXPECT_REJECTS(ncclMoeGetWindowSize(&cfg, 4, nullptr), "bytes");
  ASSERT_EQ(ncclMoeGetWindowSize(&cfg, 4, &bytes), ncclSuccess) << ncclMoeGetLastError();
  ncclMoeConfig_t resolved;
  ASSERT_EQ(nccl_moe::validateConfig(&cfg, 4, 1 << 20, &resolved), ncclSuccess);
  nccl_moe::WindowLayout layout;
  ASSERT_EQ(nccl_moe::computeWindowLayout(resolved, 4, &layout), ncclSuccess);
  EXPECT_EQ(bytes, layout.total);
  // Low latency: slots scale the size.
  cfg.mode = ncclMoeLowLatency;
  cfg.numBufferSlots = 1;
  size_t one = 0, three = 0;
  ASSERT_EQ(ncclMoeGetWindowSize(&cfg, 4, &one), ncclSuccess) << ncclMoeGetLastError();
  cfg.numBufferSlots = 3;
  ASSERT_EQ(ncclMoeGetWindowSize(&cfg, 4, &three), ncclSuccess) << ncclMoeGetLastError();
  EXPECT_GT(three, one);
  EXPECT_EQ((three - one) % 4096, 0u);
  cfg.numExperts = 30;  // not divisible by 4 ranks
  EXPECT_REJECTS(ncclMoeGetWindowSize(&cfg, 4, &bytes), "numExperts");
}
