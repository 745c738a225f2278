// Issue 14 item 1, the calls a training framework needs, without a GPU: the reference model of
// ncclMoeCombineWithWeights' per-row top-k values (hand example, and the round trip through
// dispatch that makes it the routing-weight gradient), and the host checks of
// ncclMoeCombineWithWeights, ncclMoeHandleRelease and of combining an older handle (two
// operations in flight) that run before any CUDA call.
#include <string.h>
#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "../../testing/reference.h"
#include "error_message_match.h"
#include "fake_context.h"
#include "nccl_moe.h"

using namespace moe_ref;

namespace {

// Host memory that stands for the EP window of a fake context (never read by these tests'
// calls: they fail before touching it).
alignas(256) unsigned char window[1 << 16];

void fakeWindow(ncclMoeComm* c) {
  c->winBase = (char*)window;
  c->layout.recvX = 0;
  c->layout.recvTopkWeights = 1 << 12;
  c->layout.combineIn = 1 << 13;
  c->layout.total = sizeof(window);
}

}  // namespace

// --- reference ---------------------------------------------------------------------------------

// E = 4 over R = 2 (experts 0, 1 on rank 0; 2, 3 on rank 1), K = 2.
TEST(RefCombineValues, TwoRankHandExample) {
  std::vector<Routing> routing = {makeRouting(2, {{0, 2}, {1, -1}, {-1, -1}}),  // rank 0: 3 tokens
                                  makeRouting(2, {{3, -1}})};                   // rank 1: 1 token
  // Rank 0 received (s0 t0), (s0 t1); rank 1 received (s0 t0), (s1 t0).
  std::vector<std::vector<float>> recv = {{1, 2, 3, 4}, {10, 20, 30, 40}};
  EXPECT_EQ(combineTopkValues(0, routing, recv, 4), (std::vector<float>{11, 22, 3, 4, 0, 0}));
  EXPECT_EQ(combineTopkValues(1, routing, recv, 4), (std::vector<float>{30, 40}));
}

// Values that are zero outside the receiving rank's experts (what dispatch delivers as topkWeights)
// come back exactly: combine(dispatch(w)) = w where the expert id is valid, 0 elsewhere. This is
// why the call returns the routing-weight gradient when fed the gradient of the received weights.
TEST(RefCombineValues, RoundTripThroughDispatch) {
  std::mt19937 rng(14);
  const int R = 4, E = 16, K = 6, H = 8;
  std::vector<Routing> routing(R);
  std::vector<std::vector<uint8_t>> xs(R);
  for (int s = 0; s < R; ++s) {
    Routing& r = routing[s];
    r.numTokens = 20 + 7 * s;
    r.topK = K;
    std::uniform_int_distribution<int> e(-4, E - 1);
    std::uniform_real_distribution<float> w(-1.0f, 1.0f);
    for (int i = 0; i < r.numTokens * K; ++i) {
      const int v = e(rng);
      r.topkIdx.push_back(v < 0 ? -1 : v);
      r.topkWeights.push_back(w(rng));
    }
    xs[s].assign((size_t)r.numTokens * H * 2, 0);
  }
  std::vector<std::vector<float>> recv(R);
  for (int d = 0; d < R; ++d) recv[d] = dispatch(d, routing, xs, {}, H * 2, H, E).topkWeights;
  for (int s = 0; s < R; ++s) {
    const std::vector<float> got = combineTopkValues(s, routing, recv, E);
    ASSERT_EQ(got.size(), routing[s].topkWeights.size());
    for (size_t i = 0; i < got.size(); ++i) {
      const float want = routing[s].topkIdx[i] >= 0 ? routing[s].topkWeights[i] : 0.0f;
      EXPECT_EQ(got[i], want) << "rank " << s << " entry " << i;
    }
  }
}

// --- host checks -------------------------------------------------------------------------------

TEST(TrainingApi, NullObjects) {
  EXPECT_FAILS(ncclMoeCombineWithWeights(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr),
               ncclInvalidArgument, "moeComm");
  EXPECT_FAILS(ncclMoeHandleRelease(nullptr, nullptr), ncclInvalidArgument, "handle");
  FakeContext f(ncclMoeHighThroughput);
  EXPECT_FAILS(ncclMoeCombineWithWeights(f.c, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr),
               ncclInvalidArgument, "handle");
  // A context is not a handle.
  EXPECT_FAILS(ncclMoeHandleRelease(reinterpret_cast<ncclMoeHandle_t>(f.c), nullptr), ncclInvalidArgument,
               "handle");
}

TEST(TrainingApi, CombineWithWeightsNeedsBothArrays) {
  FakeContext f(ncclMoeHighThroughput);
  fakeWindow(f.c);
  ncclMoeHandle_t h = f.addHandle(1);
  f.c->htDispatches = 1;
  void* rows = window + f.c->layout.combineIn;
  float out[8];
  EXPECT_FAILS(ncclMoeCombineWithWeights(f.c, h, rows, nullptr, nullptr, out, out, nullptr), ncclInvalidArgument,
               "recvTopkWeights");
  EXPECT_FAILS(ncclMoeCombineWithWeights(f.c, h, rows, nullptr, out, nullptr, out, nullptr), ncclInvalidArgument,
               "outTopkWeights");
  // An in-window address that is not out->topkWeights.
  const float* wrong = (const float*)(window + f.c->layout.recvTopkWeights + 4);
  EXPECT_FAILS(ncclMoeCombineWithWeights(f.c, h, rows, nullptr, wrong, out, out, nullptr), ncclInvalidArgument,
               "recvTopkWeights");
}

// Two operations in flight: after dispatch 2, handle 1's rows are no longer in the window, so a
// combine of handle 1 that names the window (rows or per-row values) is refused, naming both
// dispatches. (From caller memory it is accepted: that path reaches CUDA, tested on GPUs.)
TEST(TrainingApi, OlderHandleCannotReadTheWindow) {
  FakeContext f(ncclMoeHighThroughput);
  fakeWindow(f.c);
  ncclMoeHandle_t h1 = f.addHandle(1);
  f.c->htDispatches = 2;
  float out[8];
  EXPECT_FAILS(ncclMoeCombine(f.c, h1, window + f.c->layout.combineIn, nullptr, out, nullptr), ncclInvalidUsage,
               "dispatch");
  std::string msg = ncclMoeGetLastError();
  EXPECT_TRUE(containsNumber(msg, 1) && containsNumber(msg, 2)) << msg;
  EXPECT_FAILS(ncclMoeCombine(f.c, h1, window + f.c->layout.recvX, nullptr, out, nullptr), ncclInvalidUsage,
               "expertOut");
  const float* values = (const float*)(window + f.c->layout.recvTopkWeights);
  alignas(16) static unsigned char callerRows[64];
  EXPECT_FAILS(ncclMoeCombineWithWeights(f.c, h1, callerRows, nullptr, values, out, out, nullptr),
               ncclInvalidUsage, "recvTopkWeights");
}

// A handle retired like ncclMoeHandleRelease retires it is dead for every call, release included.
TEST(TrainingApi, ReleasedHandleIsDead) {
  FakeContext f(ncclMoeHighThroughput);
  ncclMoeHandle_t h = f.addHandle(1);
  f.retireHandle();
  EXPECT_FAILS(ncclMoeHandleRelease(h, nullptr), ncclInvalidArgument, "handle");
  EXPECT_FAILS(ncclMoeHandleDestroy(h), ncclInvalidArgument, "handle");
  float out[8];
  EXPECT_FAILS(ncclMoeCombineWithWeights(f.c, h, out, nullptr, out, out, out, nullptr), ncclInvalidArgument,
               "handle");
}
