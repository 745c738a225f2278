#include <gtest/gtest.h>

#include "device/kernel_args.h"

using namespace nccl_moe;

// The LL combine signal (device/kernel_args.h, llCombineSignalShare): whatever CTA count a rank's
// send uses, its shares sum to the context's total and none is zero, so the completion (with its
// own CTA count) waits for total * epoch and cannot see it before every CTA of the send added.
TEST(LlCombineSignal, SharesSumToTheTotalForEveryCtaCount) {
  for (int total : {1, 2, 24, 132}) {
    for (int n = 1; n <= total; ++n) {
      uint64_t sum = 0;
      for (int cta = 0; cta < n; ++cta) {
        const uint64_t share = llCombineSignalShare(cta, n, total);
        EXPECT_GE(share, 1u) << "cta " << cta << " of " << n << ", total " << total;
        sum += share;
      }
      EXPECT_EQ(sum, (uint64_t)total) << n << " CTAs, total " << total;
      // Any CTA missing leaves the sum short of the total.
      for (int missing = 0; missing < n; ++missing)
        EXPECT_LT(sum - llCombineSignalShare(missing, n, total), (uint64_t)total);
    }
  }
}
