// Tests of the CPU reference model (testing/reference.h): number formats against known
// encodings, FP8 quantisation error, and layout / dispatch / combine on hand-computed examples
// and on random routings checked through invariants.
#include <gtest/gtest.h>
#include <math.h>
#include <string.h>

#include <random>
#include <vector>

#include "../../testing/reference.h"

using namespace moe_ref;

namespace {

float bitsFloat(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }


// Random routing of `numTokens` tokens: ids in [-1, E) with about 1 in 5 being -1.
Routing randomRouting(std::mt19937& rng, int numTokens, int topK, int numExperts) {
  Routing r;
  r.numTokens = numTokens;
  r.topK = topK;
  std::uniform_int_distribution<int> e(-numExperts / 4, numExperts - 1);
  std::uniform_real_distribution<float> w(0.0f, 1.0f);
  for (int i = 0; i < numTokens * topK; ++i) {
    int v = e(rng);
    r.topkIdx.push_back(v < 0 ? -1 : v);
    r.topkWeights.push_back(w(rng));
  }
  return r;
}

}  // namespace

// --- BF16 --------------------------------------------------------------------------------------

TEST(RefBf16, KnownValues) {
  EXPECT_EQ(floatToBf16(1.0f), 0x3f80);
  EXPECT_EQ(floatToBf16(-2.5f), 0xc020);
  EXPECT_EQ(floatToBf16(0.0f), 0x0000);
  EXPECT_EQ(floatToBf16(-0.0f), 0x8000);
  EXPECT_EQ(floatToBf16(INFINITY), 0x7f80);
  EXPECT_EQ(bf16ToFloat(0x3f80), 1.0f);
  EXPECT_EQ(bf16ToFloat(0xc020), -2.5f);
  EXPECT_EQ(bf16ToFloat(0x4380), 256.0f);
  EXPECT_TRUE(isnan(bf16ToFloat(floatToBf16(NAN))));
  EXPECT_TRUE(isnan(bf16ToFloat(floatToBf16(bitsFloat(0x7f800001)))));  // NaN with low payload
  EXPECT_EQ(floatToBf16(bitsFloat(0x7f7fffff)), 0x7f80);  // FLT_MAX rounds up to infinity
}

TEST(RefBf16, RoundToNearestEven) {
  EXPECT_EQ(floatToBf16(bitsFloat(0x3f808000)), 0x3f80);  // tie, even below
  EXPECT_EQ(floatToBf16(bitsFloat(0x3f818000)), 0x3f82);  // tie, even above
  EXPECT_EQ(floatToBf16(bitsFloat(0x3f808001)), 0x3f81);  // just above the tie
  EXPECT_EQ(floatToBf16(bitsFloat(0x3f807fff)), 0x3f80);  // just below the tie
  EXPECT_EQ(floatToBf16(bitsFloat(0xbf818000)), 0xbf82);  // negative tie
}

TEST(RefBf16, RoundTripAllFinite) {
  for (uint32_t v = 0; v < 0x10000; ++v) {
    if ((v & 0x7f80) == 0x7f80 && (v & 0x7f)) continue;  // NaN
    ASSERT_EQ(floatToBf16(bf16ToFloat((uint16_t)v)), v) << std::hex << v;
  }
}

// --- FP8 e4m3fn -------------------------------------------------------------------------------

TEST(RefCombine, RankWeightSumsTheRanksEntriesInKOrder) {
  // 16 experts on 4 ranks (4 each); -1 and an id past the experts count for no rank.
  const int64_t idx[] = {0, 5, 1, -1, 2, 9, 16};
  const float w[] = {1e8f, 0.25f, 1.0f, 7.0f, -1e8f, 0.5f, 3.0f};
  // Rank 0 in k order: (1e8 + 1) rounds to 1e8, then - 1e8 = 0 (any other order gives 1).
  EXPECT_EQ(rankWeight(idx, w, 7, 0, 16, 4), 0.0f);
  EXPECT_EQ(rankWeight(idx, w, 7, 1, 16, 4), 0.25f);
  EXPECT_EQ(rankWeight(idx, w, 7, 2, 16, 4), 0.5f);
  EXPECT_EQ(rankWeight(idx, w, 7, 3, 16, 4), 0.0f);
  EXPECT_EQ(rankWeight(idx, w, 2, 1, 16, 4), 0.25f);  // only the first topK entries
  EXPECT_EQ(rankWeight(idx, w, 1, 1, 16, 4), 0.0f);
}

TEST(RefFp8, KnownValues) {
  EXPECT_EQ(floatToFp8e4m3(1.0f), 0x38);
  EXPECT_EQ(floatToFp8e4m3(-2.5f), 0xc2);
  EXPECT_EQ(floatToFp8e4m3(448.0f), 0x7e);
  EXPECT_EQ(floatToFp8e4m3(-448.0f), 0xfe);
  EXPECT_EQ(floatToFp8e4m3(500.0f), 0x7e);       // saturates
  EXPECT_EQ(floatToFp8e4m3(-1e6f), 0xfe);
  EXPECT_EQ(floatToFp8e4m3(INFINITY), 0x7e);
  EXPECT_EQ(floatToFp8e4m3(-INFINITY), 0xfe);
  EXPECT_EQ(floatToFp8e4m3(ldexpf(1.0f, -9)), 0x01);  // smallest subnormal
  EXPECT_EQ(floatToFp8e4m3(ldexpf(7.0f, -9)), 0x07);  // largest subnormal
  EXPECT_EQ(floatToFp8e4m3(ldexpf(1.0f, -6)), 0x08);  // smallest normal
  EXPECT_EQ(floatToFp8e4m3(0.0f), 0x00);
  EXPECT_EQ(floatToFp8e4m3(-0.0f), 0x80);
  EXPECT_EQ(floatToFp8e4m3(ldexpf(1.0f, -11)), 0x00);  // underflows to zero
  EXPECT_EQ(floatToFp8e4m3(NAN) & 0x7f, 0x7f);

  EXPECT_EQ(fp8e4m3ToFloat(0x38), 1.0f);
  EXPECT_EQ(fp8e4m3ToFloat(0xc2), -2.5f);
  EXPECT_EQ(fp8e4m3ToFloat(0x7e), 448.0f);
  EXPECT_EQ(fp8e4m3ToFloat(0x01), ldexpf(1.0f, -9));
  EXPECT_EQ(fp8e4m3ToFloat(0x81), -ldexpf(1.0f, -9));
  EXPECT_EQ(fp8e4m3ToFloat(0x00), 0.0f);
  EXPECT_TRUE(signbit(fp8e4m3ToFloat(0x80)));
  EXPECT_EQ(fp8e4m3ToFloat(0x78), 256.0f);  // exponent 15 is finite in e4m3fn
  EXPECT_TRUE(isnan(fp8e4m3ToFloat(0x7f)));
  EXPECT_TRUE(isnan(fp8e4m3ToFloat(0xff)));
}

TEST(RefFp8, RoundTripAllCodes) {
  int finite = 0;
  for (int c = 0; c < 256; ++c) {
    if ((c & 0x7f) == 0x7f) continue;
    float f = fp8e4m3ToFloat((uint8_t)c);
    ASSERT_FALSE(isnan(f)) << c;
    ASSERT_EQ(floatToFp8e4m3(f), c) << "code " << c << " value " << f;
    ++finite;
  }
  EXPECT_EQ(finite, 254);
}

TEST(RefFp8, DecodeIsMonotonic) {
  for (int c = 0; c < 0x7e; ++c)
    EXPECT_LT(fp8e4m3ToFloat((uint8_t)c), fp8e4m3ToFloat((uint8_t)(c + 1))) << c;
}

TEST(RefFp8, RoundToNearestEvenTies) {
  EXPECT_EQ(floatToFp8e4m3(1.0625f), 0x38);   // between 1 (0x38) and 1.125 (0x39)
  EXPECT_EQ(floatToFp8e4m3(1.1875f), 0x3a);   // between 1.125 and 1.25: up to even
  EXPECT_EQ(floatToFp8e4m3(432.0f), 0x7e);    // between 416 and 448: up to even 448
  EXPECT_EQ(floatToFp8e4m3(400.0f), 0x7c);    // between 384 and 416: down to even 384
  EXPECT_EQ(floatToFp8e4m3(ldexpf(0.5f, -9)), 0x00);  // subnormal ties
  EXPECT_EQ(floatToFp8e4m3(ldexpf(1.5f, -9)), 0x02);
  EXPECT_EQ(floatToFp8e4m3(ldexpf(2.5f, -9)), 0x02);
  EXPECT_EQ(floatToFp8e4m3(ldexpf(7.5f, -9)), 0x08);  // subnormal/normal boundary
  EXPECT_EQ(floatToFp8e4m3(-1.1875f), 0xba);
  EXPECT_EQ(floatToFp8e4m3(nextafterf(1.0625f, 2.0f)), 0x39);  // just above a tie
  EXPECT_EQ(floatToFp8e4m3(nextafterf(1.1875f, 0.0f)), 0x39);  // just below a tie
  // Every midpoint between adjacent finite codes goes to the code with an even mantissa.
  for (int c = 0; c < 0x7e; ++c) {
    float mid = 0.5f * (fp8e4m3ToFloat((uint8_t)c) + fp8e4m3ToFloat((uint8_t)(c + 1)));
    int even = (c % 2 == 0) ? c : c + 1;
    EXPECT_EQ(floatToFp8e4m3(mid), even) << "midpoint above code " << c;
    EXPECT_EQ(floatToFp8e4m3(-mid), 0x80 | even) << "midpoint above code " << c;
  }
}

// The encoder picks the nearest code (ties to even) for arbitrary values: compared with a
// brute-force search over all finite codes.
TEST(RefFp8, NearestByBruteForce) {
  std::mt19937 rng(1234);
  std::uniform_real_distribution<float> mag(-12.0f, 9.0f);  // log2 of |x|
  for (int i = 0; i < 20000; ++i) {
    float x = exp2f(mag(rng)) * ((i & 1) ? -1.0f : 1.0f);
    if (fabsf(x) >= 448.0f) continue;
    int best = -1;
    float bestErr = INFINITY;
    for (int c = 0; c < 256; ++c) {
      if ((c & 0x7f) == 0x7f) continue;
      float v = fp8e4m3ToFloat((uint8_t)c);
      if (signbit(v) != signbit(x)) continue;
      float err = fabsf(v - x);
      if (err < bestErr || (err == bestErr && (c & 1) == 0)) { best = c; bestErr = err; }
    }
    ASSERT_EQ(floatToFp8e4m3(x), best) << x;
  }
}

TEST(RefFp8, QuantizeRow) {
  const int hidden = 384;
  std::mt19937 rng(42);
  std::normal_distribution<float> n(0.0f, 3.0f);
  std::vector<float> x(hidden);
  for (int i = 0; i < 128; ++i) x[i] = n(rng);
  for (int i = 128; i < 256; ++i) x[i] = 0.0f;             // all-zero group
  for (int i = 256; i < 384; ++i) x[i] = 1e-3f * n(rng);   // small values, small scale
  x[300] = -0.05f;                                         // amax of group 2, negative
  std::vector<uint8_t> q(hidden);
  std::vector<float> scales(hidden / 128);
  quantizeFp8Row(x.data(), hidden, q.data(), scales.data());

  for (int g = 0; g < 3; ++g) {
    float amax = 0.0f;
    for (int i = 0; i < 128; ++i) amax = fmaxf(amax, fabsf(x[g * 128 + i]));
    EXPECT_EQ(scales[g], amax == 0.0f ? 1.0f : amax / 448.0f) << g;
  }
  EXPECT_EQ(scales[1], 1.0f);
  EXPECT_EQ(q[300], 0xfe);  // the amax element maps to -448
  for (int i = 0; i < hidden; ++i) {
    float s = scales[i / 128];
    float deq = fp8e4m3ToFloat(q[i]) * s;
    // Half an ulp: 2^-4 relative for normals, 2^-10 * scale absolute for subnormals.
    float tol = fmaxf(fabsf(x[i]) * 0.0625f, ldexpf(s, -10)) * 1.0001f;
    EXPECT_LE(fabsf(deq - x[i]), tol) << "element " << i;
    if (i >= 128 && i < 256) {
      EXPECT_EQ(q[i], 0);
    }
  }
}

// --- layout ----------------------------------------------------------------------------------

TEST(RefLayout, HandExample) {
  // E = 8, R = 2: experts 0..3 on rank 0, 4..7 on rank 1.
  Routing r = makeRouting(3, {{0, 5, -1},     // t0: ranks 0, 1
                              {1, 2, 3},      // t1: three experts on rank 0, counted once
                              {-1, -1, -1},   // t2: nowhere
                              {7, 4, 4},      // t3: rank 1, expert 4 twice
                              {6, -1, 0},     // t4: ranks 1, 0
                              {8, -2, 3}});   // t5: invalid ids ignored, rank 0 via 3
  Layout l = layout(r, 8, 2);
  EXPECT_EQ(l.tokensPerRank, (std::vector<int>{4, 3}));
  EXPECT_EQ(l.tokensPerExpert, (std::vector<int>{2, 1, 1, 2, 2, 1, 1, 1}));
  EXPECT_EQ(l.isTokenInRank, (std::vector<uint8_t>{1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0}));
  // One node (the default): every token that goes anywhere, once.
  EXPECT_EQ(l.tokensPerNode, (std::vector<int>{5}));
  EXPECT_EQ(l.isTokenInNode, (std::vector<uint8_t>{1, 1, 0, 1, 1, 1}));
}

TEST(RefLayout, HandExampleTwoNodes) {
  // E = 8, R = 4, 2 nodes: ranks 0, 1 (experts 0..3) on node 0, ranks 2, 3 (experts 4..7) on node 1.
  Routing r = makeRouting(3, {{0, 3, -1},    // t0: ranks 0, 1, both on node 0: counted once there
                              {2, 5, 6},     // t1: ranks 1, 2, 3: nodes 0, 1
                              {-1, -1, -1},  // t2: nowhere
                              {7, 6, 7},     // t3: rank 3 (expert 7 twice): node 1
                              {8, -2, 4}});  // t4: invalid ids ignored, rank 2 via 4: node 1
  Layout l = layout(r, 8, 4, 2);
  EXPECT_EQ(l.tokensPerRank, (std::vector<int>{1, 2, 2, 2}));
  EXPECT_EQ(l.tokensPerExpert, (std::vector<int>{1, 0, 1, 1, 1, 1, 2, 2}));
  EXPECT_EQ(l.tokensPerNode, (std::vector<int>{2, 3}));
  EXPECT_EQ(l.isTokenInNode, (std::vector<uint8_t>{1, 0, 1, 1, 0, 0, 0, 1, 0, 1}));
}

TEST(RefLayout, ZeroTokens) {
  Routing r = makeRouting(2, {});
  Layout l = layout(r, 4, 4, 2);
  EXPECT_EQ(l.tokensPerRank, (std::vector<int>{0, 0, 0, 0}));
  EXPECT_EQ(l.tokensPerExpert, (std::vector<int>{0, 0, 0, 0}));
  EXPECT_EQ(l.tokensPerNode, (std::vector<int>{0, 0}));
  EXPECT_TRUE(l.isTokenInRank.empty());
  EXPECT_TRUE(l.isTokenInNode.empty());
}

// Random routings on 8 ranks split into 1, 2, 4 and 8 nodes: a token is on a node exactly when
// it is on one of the node's ranks; per-rank and per-expert results do not depend on the nodes.
TEST(RefLayout, NodesRandom) {
  const int R = 8, E = 64, K = 6, T = 300;
  std::mt19937 rng(11);
  Routing r = randomRouting(rng, T, K, E);
  for (int k = 0; k < K; ++k) r.topkIdx[5 * K + k] = -1;  // token 5 goes nowhere
  const Layout oneNode = layout(r, E, R);
  int anywhere = 0;
  for (int t = 0; t < T; ++t) {
    int ranks = 0;
    for (int rank = 0; rank < R; ++rank) ranks += oneNode.isTokenInRank[t * R + rank];
    EXPECT_EQ(oneNode.isTokenInNode[t], ranks > 0 ? 1 : 0) << t;
    anywhere += ranks > 0;
  }
  EXPECT_EQ(oneNode.tokensPerNode, (std::vector<int>{anywhere}));
  EXPECT_EQ(oneNode.isTokenInNode[5], 0);
  for (int N : {2, 4, 8}) {
    const int G = R / N;
    const Layout l = layout(r, E, R, N);
    EXPECT_EQ(l.tokensPerRank, oneNode.tokensPerRank) << N;
    EXPECT_EQ(l.tokensPerExpert, oneNode.tokensPerExpert) << N;
    EXPECT_EQ(l.isTokenInRank, oneNode.isTokenInRank) << N;
    ASSERT_EQ(l.isTokenInNode.size(), (size_t)T * N);
    std::vector<int> perNode(N, 0);
    bool dedup = false;  // some token has experts on two ranks of one node
    for (int t = 0; t < T; ++t) {
      for (int n = 0; n < N; ++n) {
        int ranks = 0;
        for (int rank = n * G; rank < (n + 1) * G; ++rank) ranks += l.isTokenInRank[t * R + rank];
        EXPECT_EQ(l.isTokenInNode[t * N + n], ranks > 0 ? 1 : 0) << N << " " << t << " " << n;
        perNode[n] += ranks > 0;
        dedup |= ranks > 1;
      }
    }
    EXPECT_EQ(l.tokensPerNode, perNode) << N;
    if (N == R) {
      EXPECT_EQ(l.tokensPerNode, l.tokensPerRank);
    } else {
      EXPECT_TRUE(dedup) << N;
    }
  }
}

// --- dispatch --------------------------------------------------------------------------------

namespace {
// E = 4 over R = 2 (experts 0, 1 on rank 0; 2, 3 on rank 1), K = 2.
std::vector<Routing> twoRankRouting() {
  return {makeRouting(2, {{0, 3}, {2, 3}, {-1, 1}},
                      {{0.5f, 0.25f}, {0.125f, 0.375f}, {0.75f, 1.5f}}),
          makeRouting(2, {{-1, -1}, {1, 0}, {3, 0}},
                      {{2.0f, 3.0f}, {0.0625f, 0.5f}, {4.0f, 0.875f}})};
}
// Row bytes of token t of rank s: distinct per (s, t, byte).
std::vector<std::vector<uint8_t>> twoRankX(int rowBytes) {
  std::vector<std::vector<uint8_t>> xs(2);
  for (int s = 0; s < 2; ++s)
    for (int t = 0; t < 3; ++t)
      for (int i = 0; i < rowBytes; ++i) xs[s].push_back((uint8_t)(s * 100 + t * 30 + i));
  return xs;
}
}  // namespace

TEST(RefDispatch, TwoRankHandExample) {
  auto routing = twoRankRouting();
  const int rowBytes = 16, hidden = 8;
  auto xs = twoRankX(rowBytes);

  Received d0 = dispatch(0, routing, xs, {{}, {}}, rowBytes, hidden, 4);
  ASSERT_EQ(d0.numRows, 4);
  EXPECT_EQ(d0.srcRank, (std::vector<int>{0, 0, 1, 1}));
  EXPECT_EQ(d0.srcToken, (std::vector<int>{0, 2, 1, 2}));
  EXPECT_EQ(d0.topkIdx, (std::vector<int64_t>{0, -1, -1, 1, 1, 0, -1, 0}));
  EXPECT_EQ(d0.topkWeights,
            (std::vector<float>{0.5f, 0.0f, 0.0f, 1.5f, 0.0625f, 0.5f, 0.0f, 0.875f}));
  EXPECT_EQ(d0.expertCounts, (std::vector<int>{3, 2}));
  EXPECT_TRUE(d0.scales.empty());
  ASSERT_EQ(d0.x.size(), (size_t)4 * rowBytes);
  for (int row = 0; row < 4; ++row)
    for (int i = 0; i < rowBytes; ++i)
      EXPECT_EQ(d0.x[row * rowBytes + i], xs[d0.srcRank[row]][d0.srcToken[row] * rowBytes + i]);

  Received d1 = dispatch(1, routing, xs, {{}, {}}, rowBytes, hidden, 4);
  ASSERT_EQ(d1.numRows, 3);
  EXPECT_EQ(d1.srcRank, (std::vector<int>{0, 0, 1}));
  EXPECT_EQ(d1.srcToken, (std::vector<int>{0, 1, 2}));
  EXPECT_EQ(d1.topkIdx, (std::vector<int64_t>{-1, 1, 0, 1, 1, -1}));
  EXPECT_EQ(d1.topkWeights, (std::vector<float>{0.0f, 0.25f, 0.125f, 0.375f, 4.0f, 0.0f}));
  EXPECT_EQ(d1.expertCounts, (std::vector<int>{1, 3}));
  ASSERT_EQ(d1.x.size(), (size_t)3 * rowBytes);
  EXPECT_EQ(d1.x[0], xs[0][0]);
  EXPECT_EQ(d1.x[2 * rowBytes + 5], xs[1][2 * rowBytes + 5]);
}

TEST(RefDispatch, Fp8ScalesTravelWithRows) {
  auto routing = twoRankRouting();
  const int hidden = 256, rowBytes = 256;  // FP8: one byte per element, two scale groups
  auto xs = twoRankX(rowBytes);
  std::vector<std::vector<float>> scales(2);
  for (int s = 0; s < 2; ++s)
    for (int t = 0; t < 3; ++t)
      for (int g = 0; g < 2; ++g) scales[s].push_back(s * 10.0f + t + g * 0.5f);
  Received d1 = dispatch(1, routing, xs, scales, rowBytes, hidden, 4);
  EXPECT_EQ(d1.scales, (std::vector<float>{0.0f, 0.5f, 1.0f, 1.5f, 12.0f, 12.5f}));
}

TEST(RefDispatch, WithoutWeights) {
  auto routing = twoRankRouting();
  for (auto& r : routing) r.topkWeights.clear();
  auto xs = twoRankX(16);
  Received d0 = dispatch(0, routing, xs, {{}, {}}, 16, 8, 4);
  EXPECT_EQ(d0.numRows, 4);
  EXPECT_TRUE(d0.topkWeights.empty());
}

// Random routings: rows agree with layout, counts agree with tokensPerExpert.
TEST(RefDispatch, InvariantsRandom) {
  const int R = 4, E = 16, K = 4, rowBytes = 8;
  std::mt19937 rng(7);
  std::vector<Routing> routing;
  std::vector<std::vector<uint8_t>> xs;
  const int tokens[R] = {37, 0, 64, 5};
  for (int s = 0; s < R; ++s) {
    routing.push_back(randomRouting(rng, tokens[s], K, E));
    xs.emplace_back((size_t)tokens[s] * rowBytes, (uint8_t)s);
  }
  std::vector<Layout> lay;
  for (int s = 0; s < R; ++s) lay.push_back(layout(routing[s], E, R));
  for (int dst = 0; dst < R; ++dst) {
    Received d = dispatch(dst, routing, xs, {}, rowBytes, 8, E);
    int rows = 0;
    for (int s = 0; s < R; ++s) rows += lay[s].tokensPerRank[dst];
    EXPECT_EQ(d.numRows, rows);
    for (int l = 0; l < E / R; ++l) {
      int sum = 0;
      for (int s = 0; s < R; ++s) sum += lay[s].tokensPerExpert[dst * (E / R) + l];
      EXPECT_EQ(d.expertCounts[l], sum) << "dst " << dst << " expert " << l;
    }
    for (int row = 0; row < d.numRows; ++row) {
      if (row > 0) {  // ordered by (source rank, source token), strictly
        bool ordered = d.srcRank[row - 1] < d.srcRank[row] ||
                       (d.srcRank[row - 1] == d.srcRank[row] && d.srcToken[row - 1] < d.srcToken[row]);
        EXPECT_TRUE(ordered) << row;
      }
      bool anyLocal = false;
      for (int k = 0; k < K; ++k) {
        int64_t l = d.topkIdx[row * K + k];
        int64_t e = routing[d.srcRank[row]].topkIdx[d.srcToken[row] * K + k];
        if (l >= 0) {
          EXPECT_EQ(e, dst * (E / R) + l);
          anyLocal = true;
        } else {
          EXPECT_TRUE(e < dst * (E / R) || e >= (dst + 1) * (E / R));
        }
      }
      EXPECT_TRUE(anyLocal);
      EXPECT_EQ(d.x[row * rowBytes], (uint8_t)d.srcRank[row]);
    }
  }
}

// --- combine ---------------------------------------------------------------------------------

TEST(RefCombine, TwoRankHandExample) {
  auto routing = twoRankRouting();
  const int hidden = 8;
  // Rank r's expert output row i is the constant 10*r + i + 1 (d0 has 4 rows, d1 has 3).
  std::vector<std::vector<uint16_t>> eo(2);
  for (int r = 0; r < 2; ++r)
    for (int i = 0; i < (r == 0 ? 4 : 3); ++i)
      for (int h = 0; h < hidden; ++h) eo[r].push_back(floatToBf16(10.0f * r + i + 1));
  auto at = [&](const std::vector<uint16_t>& v, int t) { return bf16ToFloat(v[t * hidden + 3]); };

  auto u0 = combine(0, routing, eo, hidden, 4, false);
  EXPECT_EQ(at(u0, 0), 1.0f + 11.0f);  // rank 0 row 0 + rank 1 row 0
  EXPECT_EQ(at(u0, 1), 12.0f);         // rank 1 row 1
  EXPECT_EQ(at(u0, 2), 2.0f);          // rank 0 row 1
  auto u1 = combine(1, routing, eo, hidden, 4, false);
  EXPECT_EQ(at(u1, 0), 0.0f);          // went nowhere
  EXPECT_EQ(at(u1, 1), 3.0f);          // rank 0 row 2
  EXPECT_EQ(at(u1, 2), 4.0f + 13.0f);  // rank 0 row 3 + rank 1 row 2

  auto w0 = combine(0, routing, eo, hidden, 4, true);
  EXPECT_EQ(at(w0, 0), 0.5f * 1.0f + 0.25f * 11.0f);
  EXPECT_EQ(at(w0, 1), (0.125f + 0.375f) * 12.0f);
  EXPECT_EQ(at(w0, 2), 1.5f * 2.0f);
  auto w1 = combine(1, routing, eo, hidden, 4, true);
  EXPECT_EQ(at(w1, 0), 0.0f);
  EXPECT_EQ(at(w1, 1), (0.0625f + 0.5f) * 3.0f);
  EXPECT_EQ(at(w1, 2), 0.875f * 4.0f + 4.0f * 13.0f);
  for (int h = 0; h < hidden; ++h) EXPECT_EQ(u1[2 * hidden + h], u1[2 * hidden]);
}

// Dispatch then combine with an identity expert: x * (ranks visited) unweighted, x * (sum of
// the valid weights) weighted. Random routing over 4 ranks, one rank without tokens.
TEST(RefCombine, IdentityExpertRoundTrip) {
  const int R = 4, E = 32, K = 6, H = 64;
  const int tokens[R] = {50, 17, 0, 33};
  std::mt19937 rng(2024);
  std::normal_distribution<float> n(0.0f, 1.0f);
  std::vector<Routing> routing;
  std::vector<std::vector<uint8_t>> xs(R);
  for (int s = 0; s < R; ++s) {
    routing.push_back(randomRouting(rng, tokens[s], K, E));
    if (tokens[s] > 0)  // token 0 goes nowhere
      for (int k = 0; k < K; ++k) routing[s].topkIdx[k] = -1;
    for (int i = 0; i < tokens[s] * H; ++i) {
      uint16_t b = floatToBf16(n(rng));
      xs[s].push_back((uint8_t)(b & 0xff));
      xs[s].push_back((uint8_t)(b >> 8));
    }
  }
  std::vector<std::vector<uint16_t>> eo(R);
  for (int r = 0; r < R; ++r) {
    Received d = dispatch(r, routing, xs, {}, 2 * H, H, E);
    eo[r].resize((size_t)d.numRows * H);
    memcpy(eo[r].data(), d.x.data(), d.x.size());
  }
  int nowhere = 0, multi = 0;
  for (int s = 0; s < R; ++s) {
    Layout lay = layout(routing[s], E, R);
    auto u = combine(s, routing, eo, H, E, false);
    auto w = combine(s, routing, eo, H, E, true);
    ASSERT_EQ(u.size(), (size_t)tokens[s] * H);
    for (int t = 0; t < tokens[s]; ++t) {
      int visits = 0;
      for (int r = 0; r < R; ++r) visits += lay.isTokenInRank[t * R + r];
      nowhere += visits == 0;
      multi += visits > 1;
      float wsum = 0.0f;
      for (int k = 0; k < K; ++k)
        if (routing[s].topkIdx[t * K + k] >= 0) wsum += routing[s].topkWeights[t * K + k];
      for (int h = 0; h < H; ++h) {
        uint16_t xb = (uint16_t)(xs[s][2 * (t * H + h)] | (xs[s][2 * (t * H + h) + 1] << 8));
        float x = bf16ToFloat(xb);
        // Exact: a sum of at most 4 equal bf16 values is exact in FP32, then rounded once.
        // A token that went nowhere is +0.
        ASSERT_EQ(u[t * H + h], visits ? floatToBf16(x * visits) : 0) << s << " " << t << " " << h;
        float expect = x * wsum, got = bf16ToFloat(w[t * H + h]);
        ASSERT_LE(fabsf(got - expect), fabsf(expect) * ldexpf(1.0f, -7) + 1e-6f)
            << s << " " << t << " " << h;
      }
    }
  }
  EXPECT_GT(nowhere, 0);  // the random routing exercised both cases
  EXPECT_GT(multi, 0);
}

// The reference rounds each product w * y to FP32 before adding it (as the kernel does with
// __fmul_rn / __fadd_rn): a fused multiply-add would leave 2^-30 here instead of 0.
TEST(RefCombine, ProductsRoundedBeforeTheSum) {
  const float w0 = -(1.0f + ldexpf(1.0f, -7) + ldexpf(1.0f, -23));
  const float w1 = 1.0f + ldexpf(1.0f, -23);
  std::vector<Routing> routing = {makeRouting(2, {{0, 1}}, {{w0, w1}}), makeRouting(2, {})};
  const int hidden = 8;
  std::vector<std::vector<uint16_t>> eo = {std::vector<uint16_t>(hidden, 0x3f80),   // 1
                                           std::vector<uint16_t>(hidden, 0x3f81)};  // 1 + 2^-7
  auto out = combine(0, routing, eo, hidden, 2, true);
  ASSERT_EQ(out.size(), (size_t)hidden);
  EXPECT_EQ(out[0], 0x0000) << "FMA would give " << floatToBf16(fmaf(w1, bf16ToFloat(0x3f81), w0));
}
