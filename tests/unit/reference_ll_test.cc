// Tests of the low-latency CPU reference model (testing/reference_ll.h): the FP8 cast and
// its three scale formats on known values, UE8M0 packing, the expert-major dispatch blocks and
// the per-(token, rank) combine: k order and weights inside a rank's partial, the BF16 rounding
// of each partial, which rank owns an expert, the rank order of the partials, and +0 for tokens
// that went nowhere. Combine values are chosen so that every other plausible summation order or
// rounding gives a different BF16 result (the comments name the alternatives).
#include <gtest/gtest.h>
#include <math.h>
#include <string.h>

#include <vector>

#include "../../testing/reference_ll.h"

using namespace moe_ref;

namespace {

uint16_t bf(float f) { return floatToBf16(f); }

// A row of `groups` groups of 128 channels; group g holds `first[g]` in channel 0 and
// first[g] * 2^-3 elsewhere (so amax = |first[g]| when first[g] != 0).
std::vector<uint16_t> groupRow(const std::vector<float>& first) {
  std::vector<uint16_t> row(first.size() * 128);
  for (size_t g = 0; g < first.size(); ++g)
    for (int i = 0; i < 128; ++i) row[g * 128 + i] = bf(i == 0 ? first[g] : first[g] / 8);
  return row;
}

float scaleFloat(const std::vector<uint8_t>& sc, int g) {
  float f;
  memcpy(&f, sc.data() + 4 * g, 4);
  return f;
}


// Expert outputs of hidden size 1: y[t][k], each value exact in BF16.
struct Column {
  int topK;
  std::vector<uint16_t> v;  // [T][K] BF16
  Column(int k, const std::vector<std::vector<float>>& y) : topK(k) {
    for (auto& row : y)
      for (float f : row) {
        EXPECT_EQ(bf16ToFloat(bf(f)), f) << "test value not exact in BF16";
        v.push_back(bf(f));
      }
  }
  LlExpertRow rows() const {
    return [this](int t, int k) { return &v[(size_t)t * topK + k]; };
  }
};

}  // namespace

// A group holding +-Inf: scale +Inf and inverse 0 in every format (byte 255 in UE8M0, its NaN
// code), so finite values cast to +-0, the Inf to NaN, and the whole group dequantises to NaN —
// never to finite values with flipped signs (what 2^-128 built from its bits gave before).
TEST(RefLlScale, InfinityGivesANaNGroupInEveryFormat) {
  for (ncclMoeScaleFormat_t f : {ncclMoeScaleFp32, ncclMoeScaleFp32Pow2, ncclMoeScaleUe8m0}) {
    const LlScale s = llGroupScale(INFINITY, f);
    EXPECT_TRUE(isinf(s.scale) && s.scale > 0) << f;
    EXPECT_EQ(s.inverse, 0.0f) << f;
    std::vector<uint16_t> row(128, floatToBf16(-3.0f));
    row[5] = floatToBf16(INFINITY);
    std::vector<uint8_t> q(128), scales(llScaleBytesPerRow(128, f));
    llCastRow(row.data(), 128, f, q.data(), scales.data());
    if (f == ncclMoeScaleUe8m0) {
      EXPECT_EQ(scales[0], 255) << f;
    }
    EXPECT_TRUE(isinf(llScaleOf(scales.data(), 0, f))) << f;
    std::vector<uint16_t> back(128);
    llDequantRowToBf16(q.data(), scales.data(), 128, f, back.data());
    for (int c = 0; c < 128; ++c) {
      EXPECT_EQ(q[c] & 0x7f, c == 5 ? 0x7f : 0x00) << f << " channel " << c;  // NaN / +-0
      EXPECT_TRUE(isnan(bf16ToFloat(back[c]))) << f << " channel " << c;
    }
  }
}

TEST(RefLlScale, KnownScales) {
  // amax 448: scale 1 in every format.
  for (ncclMoeScaleFormat_t f : {ncclMoeScaleFp32, ncclMoeScaleFp32Pow2, ncclMoeScaleUe8m0}) {
    LlScale s = llGroupScale(448.0f, f);
    EXPECT_EQ(s.scale, 1.0f) << f;
    EXPECT_EQ(s.inverse, 1.0f) << f;
  }
  // amax 1: FP32 1/448 and 448; powers of two: 1/448 = 2^-8.807.. rounds up to 2^-8.
  LlScale a = llGroupScale(1.0f, ncclMoeScaleFp32);
  EXPECT_EQ(a.scale, 1.0f / 448.0f);
  EXPECT_EQ(a.inverse, 448.0f);
  LlScale b = llGroupScale(1.0f, ncclMoeScaleFp32Pow2);
  EXPECT_EQ(b.scale, ldexpf(1.0f, -8));
  EXPECT_EQ(b.inverse, 256.0f);
  EXPECT_EQ(b.exponent, -8);
  // An exact power of two times 448 is not rounded up.
  EXPECT_EQ(llGroupScale(896.0f, ncclMoeScaleUe8m0).exponent, 1);
  EXPECT_EQ(llGroupScale(56.0f, ncclMoeScaleFp32Pow2).exponent, -3);
  // Just above 448 * 2^-3: the next power.
  EXPECT_EQ(llGroupScale(nextafterf(56.0f, 100.0f), ncclMoeScaleFp32Pow2).exponent, -2);
  // Zero group: amax clamped to 1e-4; 1e-4/448 = 2.23e-7 lies in (2^-23, 2^-22].
  LlScale z = llGroupScale(0.0f, ncclMoeScaleFp32);
  EXPECT_EQ(z.scale, 1e-4f / 448.0f);
  EXPECT_EQ(z.inverse, 448.0f / 1e-4f);
  EXPECT_EQ(llGroupScale(0.0f, ncclMoeScaleFp32Pow2).exponent, -22);
  EXPECT_EQ(llGroupScale(0.0f, ncclMoeScaleUe8m0).scale, ldexpf(1.0f, -22));
  // Below the floor behaves as the floor.
  EXPECT_EQ(llGroupScale(1e-6f, ncclMoeScaleFp32Pow2).exponent, -22);
  EXPECT_EQ(llGroupScale(2e-4f, ncclMoeScaleFp32Pow2).exponent, -21);
}

TEST(RefLlCast, Fp32Values) {
  std::vector<uint16_t> row = groupRow({1.0f, 448.0f, 0.0f, -2.0f});
  row[1] = bf(0.5f);
  row[2] = bf(-1.0f);
  std::vector<uint8_t> q(512), sc(llScaleBytesPerRow(512, ncclMoeScaleFp32));
  ASSERT_EQ(sc.size(), 16u);
  llCastRow(row.data(), 512, ncclMoeScaleFp32, q.data(), sc.data());
  EXPECT_EQ(scaleFloat(sc, 0), 1.0f / 448.0f);
  EXPECT_EQ(q[0], 0x7e);   // 1 * 448
  EXPECT_EQ(q[1], 0x76);   // 0.5 * 448 = 224 = 1.75 * 2^7
  EXPECT_EQ(q[2], 0xfe);   // -448
  EXPECT_EQ(q[3], floatToFp8e4m3(0.125f * 448.0f));
  EXPECT_EQ(scaleFloat(sc, 1), 1.0f);
  EXPECT_EQ(q[128], 0x7e);
  EXPECT_EQ(q[129], floatToFp8e4m3(56.0f));
  EXPECT_EQ(scaleFloat(sc, 2), 1e-4f / 448.0f);  // zero group
  for (int i = 256; i < 384; ++i) EXPECT_EQ(q[i], 0x00) << i;
  EXPECT_EQ(scaleFloat(sc, 3), 2.0f / 448.0f);
  EXPECT_EQ(q[384], 0xfe);
}

TEST(RefLlCast, Pow2Values) {
  std::vector<uint16_t> row = groupRow({1.0f, 448.0f, 0.0f, 3.0f});
  row[1] = bf(0.5f);
  std::vector<uint8_t> q(512), sc(16);
  llCastRow(row.data(), 512, ncclMoeScaleFp32Pow2, q.data(), sc.data());
  EXPECT_EQ(scaleFloat(sc, 0), ldexpf(1.0f, -8));
  EXPECT_EQ(q[0], 0x78);  // 256
  EXPECT_EQ(q[1], 0x70);  // 128
  EXPECT_EQ(q[2], 0x60);  // 0.125 * 256 = 32 = 2^5
  EXPECT_EQ(scaleFloat(sc, 1), 1.0f);
  EXPECT_EQ(scaleFloat(sc, 2), ldexpf(1.0f, -22));
  // amax 3: 3/448 = 2^-7.22 -> 2^-7; 3 * 128 = 384 = 0x7c.
  EXPECT_EQ(scaleFloat(sc, 3), ldexpf(1.0f, -7));
  EXPECT_EQ(q[384], 0x7c);
  // Dequantisation of a power-of-two row is exact for values that fit.
  std::vector<uint16_t> back(512);
  llDequantRowToBf16(q.data(), sc.data(), 512, ncclMoeScaleFp32Pow2, back.data());
  EXPECT_EQ(back[0], bf(1.0f));
  EXPECT_EQ(back[1], bf(0.5f));
  EXPECT_EQ(back[384], bf(3.0f));
  EXPECT_EQ(back[300], 0);
}

TEST(RefLlCast, Ue8m0PackingOrder) {
  // Group g has amax 448 * 2^(g - 3): exponent g - 3, byte 124 + g.
  std::vector<float> first;
  for (int g = 0; g < 8; ++g) first.push_back(ldexpf(448.0f, g - 3));
  std::vector<uint16_t> row = groupRow(first);
  ASSERT_EQ(llScaleBytesPerRow(1024, ncclMoeScaleUe8m0), 8);  // H/512 = 2 int32
  std::vector<uint8_t> q(1024), sc(8, 0xAA);
  llCastRow(row.data(), 1024, ncclMoeScaleUe8m0, q.data(), sc.data());
  uint32_t w[2];
  memcpy(w, sc.data(), 8);
  EXPECT_EQ(w[0], 124u | 125u << 8 | 126u << 16 | 127u << 24);
  EXPECT_EQ(w[1], 128u | 129u << 8 | 130u << 16 | 131u << 24);
  for (int g = 0; g < 8; ++g) {
    EXPECT_EQ(llScaleOf(sc.data(), g, ncclMoeScaleUe8m0), ldexpf(1.0f, g - 3)) << g;
    EXPECT_EQ(q[g * 128], 0x7e) << g;  // amax / scale = 448
  }
  // Same q bytes as the FP32 power-of-two format.
  std::vector<uint8_t> q2(1024), sc2(32);
  llCastRow(row.data(), 1024, ncclMoeScaleFp32Pow2, q2.data(), sc2.data());
  EXPECT_EQ(q, q2);
  // A zero group stores 127 - 22 = 105.
  std::vector<uint16_t> zeros(512, 0);
  std::vector<uint8_t> qz(512), sz(4);
  llCastRow(zeros.data(), 512, ncclMoeScaleUe8m0, qz.data(), sz.data());
  EXPECT_EQ(sz, std::vector<uint8_t>(4, 105));
  // H % 512 != 0 (the library rejects it): a partial last int32 with zero bytes.
  EXPECT_EQ(llScaleBytesPerRow(640, ncclMoeScaleUe8m0), 8);
  std::vector<uint16_t> r5 = groupRow({448.0f, 448.0f, 448.0f, 448.0f, 448.0f});
  std::vector<uint8_t> q5(640), s5(8, 0xAA);
  llCastRow(r5.data(), 640, ncclMoeScaleUe8m0, q5.data(), s5.data());
  EXPECT_EQ(s5, (std::vector<uint8_t>{127, 127, 127, 127, 127, 0, 0, 0}));
}

TEST(RefLlCast, SaturatesAndKeepsSign) {
  // Values whose product with the inverse rounds above 448 saturate.
  std::vector<uint16_t> row(128, bf(-0.0f));
  row[0] = bf(-3.0f);
  row[1] = bf(3.0f);
  std::vector<uint8_t> q(128), sc(4);
  llCastRow(row.data(), 128, ncclMoeScaleFp32, q.data(), sc.data());
  EXPECT_EQ(q[0], 0xfe);
  EXPECT_EQ(q[1], floatToFp8e4m3(3.0f * (448.0f / 3.0f)));
  EXPECT_EQ(q[2], 0x80);  // -0 stays -0
  for (int i = 0; i < 128; ++i) EXPECT_LE(fabsf(fp8e4m3ToFloat(q[i])), 448.0f);
}

TEST(RefLlRows, SendRowsBf16AndFp8) {
  std::vector<uint16_t> x = groupRow({1.0f, 2.0f});
  LlRows b = llSendRows(x, 1, 256, false, ncclMoeScaleFp32);
  EXPECT_EQ(b.rowBytes, 512);
  EXPECT_EQ(b.scaleBytes, 0);
  EXPECT_EQ(memcmp(b.row(0), x.data(), 512), 0);
  EXPECT_EQ(b.ident, x);
  LlRows f = llSendRows(x, 1, 256, true, ncclMoeScaleFp32Pow2);
  EXPECT_EQ(f.rowBytes, 256);
  EXPECT_EQ(f.scaleBytes, 8);
  // Power-of-two scales and values exact in e4m3: the identity expert gives x back.
  EXPECT_EQ(f.ident, x);
}

TEST(RefLlDispatch, BlocksPerExpertAndSource) {
  // R = 2, E = 4 (L = 2). Rank 1 owns experts 2 (l 0) and 3 (l 1).
  std::vector<Routing> rt = {
      makeRouting(2, {{0, 3}, {1, 2}, {2, 3}}),
      makeRouting(2, {{2, -1}, {3, 2}, {-1, -1}, {3, 0}}),
  };
  LlReceived r1 = llDispatch(1, rt, 4);
  EXPECT_EQ(r1.countsPerSource, (std::vector<int>{2, 2, 2, 2}));  // [l][s]
  EXPECT_EQ(r1.tokens(0, 0), (std::vector<int>{1, 2}));
  EXPECT_EQ(r1.tokens(1, 0), (std::vector<int>{0, 2}));  // token 2 has both experts here
  EXPECT_EQ(r1.tokens(0, 1), (std::vector<int>{0, 1}));
  EXPECT_EQ(r1.tokens(1, 1), (std::vector<int>{1, 3}));
  EXPECT_EQ(r1.expertCounts, (std::vector<int>{4, 4}));
  EXPECT_EQ(r1.totalRows(), 8);
  LlReceived r0 = llDispatch(0, rt, 4);
  EXPECT_EQ(r0.countsPerSource, (std::vector<int>{1, 1, 1, 0}));
  EXPECT_EQ(r0.tokens(0, 0), (std::vector<int>{0}));
  EXPECT_EQ(r0.tokens(0, 1), (std::vector<int>{3}));
  EXPECT_EQ(r0.tokens(1, 0), (std::vector<int>{1}));
  EXPECT_TRUE(r0.tokens(1, 1).empty());
  EXPECT_EQ(r0.expertCounts, (std::vector<int>{2, 1}));
}

// One rank owns every expert (E = 8, R = 1): one partial per token, i.e. the k-order sum.
TEST(RefLlCombine, OneRankKOrderWeightsAndSkippedEntries) {
  const int H = 2;
  // Token 0: k order 2^24, 1, 1, -2^24: in order the ones vanish (2^24 + 1 rounds to even).
  // Token 1: weights, -1 entry skipped (its weight would change the result).
  // Token 2: no valid k -> +0.
  Routing r = makeRouting(4, {{0, 1, 2, 3}, {4, -1, 5, 6}, {-1, -1, -1, -1}},
                          {{1, 1, 1, 1}, {0.5f, 100.0f, 0.25f, 2.0f}, {1, 1, 1, 1}});
  std::vector<std::vector<uint16_t>> y(12, std::vector<uint16_t>(H));
  auto set = [&](int t, int k, float a, float b) { y[t * 4 + k] = {bf(a), bf(b)}; };
  set(0, 0, 16777216.0f, 1.0f);
  set(0, 1, 1.0f, 1.0f);
  set(0, 2, 1.0f, 1.0f);
  set(0, 3, -16777216.0f, 1.0f);
  set(1, 0, 2.0f, -4.0f);
  set(1, 1, 1000.0f, 1000.0f);
  set(1, 2, 4.0f, 8.0f);
  set(1, 3, 0.5f, 0.5f);
  auto rows = [&](int t, int k) { return y[t * 4 + k].data(); };
  std::vector<uint16_t> u = llCombine(r, rows, H, false, 8, 1);
  EXPECT_EQ(u[0], bf(0.0f));  // not 2: k order
  EXPECT_EQ(u[1], bf(4.0f));
  EXPECT_EQ(u[2], bf(2.0f + 4.0f + 0.5f));
  EXPECT_EQ(u[3], bf(-4.0f + 8.0f + 0.5f));
  EXPECT_EQ(u[4], 0x0000);
  EXPECT_EQ(u[5], 0x0000);
  std::vector<uint16_t> w = llCombine(r, rows, H, true, 8, 1);
  EXPECT_EQ(w[2], bf(0.5f * 2 + 0.25f * 4 + 2.0f * 0.5f));
  EXPECT_EQ(w[3], bf(0.5f * -4 + 0.25f * 8 + 2.0f * 0.5f));
  EXPECT_EQ(w[4], 0x0000);
}

TEST(RefLlCombine, ProductRoundedBeforeAdd) {
  // acc = 1 + round(w * -3) with w = float(1/3): the rounded product is exactly -1, so the sum
  // is 0; a fused multiply-add would leave -2^-25 (BF16 0xb300).
  const float third = 1.0f / 3.0f;
  Routing r = makeRouting(2, {{0, 1}}, {{1.0f, third}});
  std::vector<uint16_t> y0 = {bf(1.0f)}, y1 = {bf(-3.0f)};
  auto rows = [&](int, int k) { return k == 0 ? y0.data() : y1.data(); };
  EXPECT_EQ(llCombine(r, rows, 1, true, 2, 1)[0], 0x0000);
}

// E = 4 on R = 2: experts 0, 1 on rank 0, experts 2, 3 on rank 1. u = 3 * 2^-10 is below half a
// BF16 ulp of 1 (2^-8), 2u above it.
TEST(RefLlCombine, PartialRoundedToBf16PerRank) {
  const float u = ldexpf(3.0f, -10);
  Routing r = makeRouting(3, {{0, 1, 2}, {0, 2, 1}, {0, 2, 1}});
  Column y(3, {{1, u, u}, {1, u, u}, {1, u, -u}});
  std::vector<uint16_t> out = llCombine(r, y.rows(), 1, false, 4, 2);
  // Token 0: p(0) = bf16(1 + u) = 1, p(1) = u, out = bf16(1 + u) = 1. One FP32 sum over every k,
  // or p(0) left unrounded, gives bf16(1 + 2u) = 1 + 2^-7.
  EXPECT_EQ(out[0], bf(1.0f));
  // Token 1: rank 0's experts at k = 0 and k = 2 share one partial; a partial per run of
  // consecutive k on one rank would add 1, u, u: 1 + 2^-7.
  EXPECT_EQ(out[1], bf(1.0f));
  // Token 2: expert e lives on rank e / (E/R): p(0) = bf16(1 - u) = 1 - 2^-8 (k = 0 and 2),
  // p(1) = u, out = bf16(1 - 2^-10) = 1. Ranks e % R would pair k = 0 and 1: p(0) = bf16(1 + u)
  // = 1, p(1) = -u, out = bf16(1 - u) = 1 - 2^-8.
  EXPECT_EQ(out[2], bf(1.0f));
}

// R = 3 ranks of one expert each (E = 3); the token names them in k order 1, 2, 0. As 2^24 + 1
// rounds back to 2^24 (ties to even), the partials in increasing rank order give
// (2^24 + 1) - 2^24 = 0, while k order (1 - 2^24 + 2^24) and decreasing rank order
// (-2^24 + 1 + 2^24) both give 1.
TEST(RefLlCombine, PartialsAddedInIncreasingRankOrder) {
  const float big = 16777216.0f;
  Routing r = makeRouting(3, {{1, 2, 0}});
  Column y(3, {{1, -big, big}});
  EXPECT_EQ(llCombine(r, y.rows(), 1, false, 3, 3)[0], 0x0000);
}

// Weights multiply each entry inside its rank's partial, before the partial is rounded; the
// weight and row of a -1 entry are ignored. E = 4 on R = 2 as above; u = 3 * 2^-10.
TEST(RefLlCombine, WeightsInsideThePartial) {
  const float s = ldexpf(1.0f, -7);
  Routing r = makeRouting(4, {{0, 1, 2, -1}}, {{0.5f, 0.375f, 0.375f, 100.0f}});
  Column y(4, {{2, s, s, 1000}});
  // Weighted: products 1, u, u; p(0) = bf16(1 + u) = 1, p(1) = u, out = bf16(1 + u) = 1 (one
  // FP32 sum: bf16(1 + 2u) = 1 + 2^-7; unweighted partials times their weight sums: 1.75).
  EXPECT_EQ(llCombine(r, y.rows(), 1, true, 4, 2)[0], bf(1.0f));
  // Unweighted: p(0) = bf16(2 + 2^-7) = 2 (a tie, to even), p(1) = 2^-7, out = bf16(2 + 2^-7)
  // = 2 (one FP32 sum: 2 + 2^-6, exact in BF16).
  EXPECT_EQ(llCombine(r, y.rows(), 1, false, 4, 2)[0], bf(2.0f));
}

// A token with no valid expert gives +0, and so does one whose only expert output is -0 (the
// partial and the final sum both start from +0), weighted or not. The rows of -1 entries (5)
// must not be read.
TEST(RefLlCombine, NothingGivesPositiveZero) {
  Routing r = makeRouting(2, {{-1, -1}, {-1, 3}}, {{1, 1}, {7, 0.5f}});
  Column y(2, {{5, 5}, {5, -0.0f}});
  for (bool weighted : {false, true}) {
    std::vector<uint16_t> out = llCombine(r, y.rows(), 1, weighted, 4, 2);
    EXPECT_EQ(out[0], 0x0000) << "weighted " << weighted;
    EXPECT_EQ(out[1], 0x0000) << "weighted " << weighted;
  }
}
