// The host side of the low-latency one-launch form (kernel_args.h, config.h): the
// NCCL_MOE_LL_ONE_LAUNCH value, which calls take it, and the grid arithmetic its kernels rely on.
// The kernels themselves are GPU-tested (tests/gpu/ll_one_launch_test.cc).
#include <limits.h>
#include <string>
#include <vector>
#include <gtest/gtest.h>

#include "config.h"
#include "device/kernel_args.h"
#include "nccl_moe.h"

using namespace nccl_moe;

TEST(LlOneLaunch, UnsetOrEmptyIsTheDefault) {
  for (const char* value : {(const char*)nullptr, ""}) {
    LlOneLaunchLimits l{-1, -1};
    EXPECT_EQ(parseLlOneLaunchLimits(value, &l), ncclSuccess);
    EXPECT_EQ(l.dispatchTokens, kLlOneLaunchDefaults.dispatchTokens);
    EXPECT_EQ(l.combineTokens, kLlOneLaunchDefaults.combineTokens);
  }
  EXPECT_EQ(kLlOneLaunchDefaults.dispatchTokens, 4);
  EXPECT_EQ(kLlOneLaunchDefaults.combineTokens, 1);
}

// "D" sets both limits, "D,C" each; counts saturate at INT_MAX ("always").
TEST(LlOneLaunch, TokenCountsParse) {
  struct Case {
    const char* value;
    int dispatch, combine;
  };
  for (const Case& c : {Case{"0", 0, 0}, Case{"1", 1, 1}, Case{"128", 128, 128}, Case{"2147483647", INT_MAX, INT_MAX},
                        Case{"99999999999999999999999", INT_MAX, INT_MAX}, Case{"4,1", 4, 1}, Case{"0,8", 0, 8},
                        Case{"8,0", 8, 0}, Case{"1000000,99999999999999", 1000000, INT_MAX}}) {
    LlOneLaunchLimits l{-1, -1};
    EXPECT_EQ(parseLlOneLaunchLimits(c.value, &l), ncclSuccess) << c.value;
    EXPECT_EQ(l.dispatchTokens, c.dispatch) << c.value;
    EXPECT_EQ(l.combineTokens, c.combine) << c.value;
  }
}

TEST(LlOneLaunch, BadValuesRejectedWithTheValue) {
  for (const char* bad : {"-1", "8x", "x", " 8", "8 ", "1e3", "0x10", "+4", "4,", ",1", "4,1,2", "4;1", "4, 1"}) {
    LlOneLaunchLimits l{-1, -1};
    EXPECT_EQ(parseLlOneLaunchLimits(bad, &l), ncclInvalidArgument) << bad;
    EXPECT_EQ(l.dispatchTokens, kLlOneLaunchDefaults.dispatchTokens) << bad;  // nothing half-parsed
    const std::string msg = ncclMoeGetLastError();
    EXPECT_NE(msg.find("NCCL_MOE_LL_ONE_LAUNCH"), std::string::npos) << msg;
    EXPECT_NE(msg.find(std::string("\"") + bad + "\""), std::string::npos) << msg;
  }
}

// One-shot calls of small T on one node with at most 32 ranks; never send-only (the split's
// halves keep their kernels), never across nodes, never above the limit.
TEST(LlOneLaunch, WhichCallsTakeIt) {
  EXPECT_TRUE(llOneLaunchChosen(8, 0, false, 1, 2));
  EXPECT_TRUE(llOneLaunchChosen(8, 1, false, 1, 2));
  EXPECT_TRUE(llOneLaunchChosen(8, 8, false, 1, 8));
  EXPECT_TRUE(llOneLaunchChosen(INT_MAX, 4096, false, 1, 32));
  EXPECT_FALSE(llOneLaunchChosen(8, 9, false, 1, 2));
  EXPECT_FALSE(llOneLaunchChosen(0, 0, false, 1, 2));  // 0: never
  EXPECT_FALSE(llOneLaunchChosen(8, 1, true, 1, 2));   // send-only
  EXPECT_FALSE(llOneLaunchChosen(8, 1, false, 2, 4));  // several nodes
  EXPECT_FALSE(llOneLaunchChosen(8, 1, false, 1, 33));
}

// The kernels' CTA counts: at least 1, one more per kLlOneLaunchItemsPerCta items, never more
// than the cap; the combine's signal shares over that count still sum to the total.
TEST(LlOneLaunch, CtaCounts) {
  EXPECT_EQ(llOneLaunchCtas(0, 132), 1);
  EXPECT_EQ(llOneLaunchCtas(1, 132), 1);
  EXPECT_EQ(llOneLaunchCtas(kLlOneLaunchItemsPerCta, 132), 1);
  EXPECT_EQ(llOneLaunchCtas(kLlOneLaunchItemsPerCta + 1, 132), 2);
  EXPECT_EQ(llOneLaunchCtas(2LL * 128 * 7, 132), 56);  // EP2, 128 tokens, H 7168 combine items
  EXPECT_EQ(llOneLaunchCtas(1LL << 40, 132), 132);
  EXPECT_EQ(llOneLaunchCtas(1000, 1), 1);
  for (int total : {1, 24, 132})
    for (long long items = 0; items < 5000; items += 37) {
      const int n = llOneLaunchCtas(items, total);
      ASSERT_GE(n, 1);
      ASSERT_LE(n, total);
      uint64_t sum = 0;
      for (int cta = 0; cta < n; ++cta) sum += llCombineSignalShare(cta, n, total);
      EXPECT_EQ(sum, (uint64_t)total) << items << " items, total " << total;
    }
}

// The dispatch's roles: each launch takes exactly G tickets from a per-slot counter that starts
// at 0, so the tickets of launch n are n*G .. n*G + G - 1: ticket % G hands out every role once
// (role 0 to the first CTA to start) and ticket / G is n, whatever order the CTAs start in.
TEST(LlOneLaunch, TicketsGiveEveryRoleOncePerLaunch) {
  for (unsigned G : {1u, 2u, 16u, 132u}) {
    unsigned long long ticket = 0;
    for (unsigned long long launch = 0; launch < 5; ++launch) {
      std::vector<int> seen(G, 0);
      for (unsigned c = 0; c < G; ++c, ++ticket) {
        seen[ticket % G]++;
        EXPECT_EQ(ticket / G, launch);
      }
      for (unsigned r = 0; r < G; ++r) EXPECT_EQ(seen[r], 1) << "G " << G << ", role " << r;
    }
  }
}
