// CPU reference model of layout, dispatch, combine and FP8 quantisation (see reference.h).
// Written for obviousness, not speed: every rule is a loop over tokens / top-k entries.
//
// Conventions fixed here (the GPU tests compare the library against them):
//  - Expert ids outside [0, E) (-1 or invalid) are ignored everywhere: they place a token
//    nowhere, count nowhere, and are rewritten to -1 in dispatch.
//  - Counting is per (token, k) entry: a token naming expert e twice in its top-k adds 2 to
//    tokensPerExpert[e] and a received row naming local expert l twice adds 2 to
//    expertCounts[l]. Hence, for every dst and local expert l,
//      dispatch(dst).expertCounts[l] == sum over sources s of layout(s).tokensPerExpert[dst*E/R+l].
//    tokensPerRank and rows are per token: a token with several experts on a rank counts once
//    there and is received there once. tokensPerNode likewise: a token with experts on several
//    ranks of a node counts once for that node (what the internode path sends it once for).
//  - FP8: scale = amax / 448.0f and q = fp8(x / scale), both IEEE float divisions.
//  - Combine: acc += (w * y rounded to float) per rank in increasing rank order, acc starting
//    at +0.0f, then one bf16 rounding; never a fused multiply-add (the kernel uses
//    __fmul_rn / __fadd_rn). w(t, r) sums the weights in k order, starting at 0.0f.
#include "reference.h"

#include <assert.h>
#include <math.h>
#include <string.h>

#include <algorithm>

namespace moe_ref {

// --- number formats -------------------------------------------------------------------------

float bf16ToFloat(uint16_t v) {
  uint32_t bits = (uint32_t)v << 16;
  float f;
  memcpy(&f, &bits, sizeof(f));
  return f;
}

uint16_t floatToBf16(float f) {
  uint32_t bits;
  memcpy(&bits, &f, sizeof(bits));
  if (isnan(f)) return 0x7fff;  // the canonical NaN, as the device's cvt.rn.bf16 gives
  // Round to nearest even on the 16 dropped bits (overflow to infinity is correct RNE).
  uint32_t lsb = (bits >> 16) & 1u;
  return (uint16_t)((bits + 0x7fffu + lsb) >> 16);
}

// e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; exponent 0 = subnormals (m * 2^-9);
// S.1111.111 is NaN; no infinities; largest finite 0x7e = 1.75 * 2^8 = 448.
float fp8e4m3ToFloat(uint8_t v) {
  const int exp = (v >> 3) & 0xf, mant = v & 7;
  const float sign = (v & 0x80) ? -1.0f : 1.0f;
  if (exp == 15 && mant == 7) return NAN;
  if (exp == 0) return sign * ldexpf((float)mant, -9);
  return sign * ldexpf(1.0f + (float)mant / 8.0f, exp - 7);
}

uint8_t floatToFp8e4m3(float f) {
  const uint8_t sign = signbit(f) ? 0x80 : 0x00;
  if (isnan(f)) return sign | 0x7f;
  const float a = fabsf(f);
  // Everything from 448 up (infinity included) saturates: values below 464 round to 448
  // anyway, larger ones would round past the largest finite code.
  if (a >= 448.0f) return sign | 0x7e;
  if (a < ldexpf(1.0f, -6)) {
    // Subnormal range: a multiple of 2^-9. a * 512 is exact; nearbyintf rounds half to even in
    // the default rounding mode. q == 8 yields code 0x08 = 2^-6, the smallest normal: correct.
    const int q = (int)nearbyintf(a * 512.0f);
    return sign | (uint8_t)q;
  }
  int e2;
  const float m = frexpf(a, &e2);  // a = m * 2^e2, m in [0.5, 1)
  int e = e2 - 1;                  // a = (2m) * 2^e, 2m in [1, 2), e in [-6, 8]
  int mant = (int)nearbyintf((2.0f * m - 1.0f) * 8.0f);  // exact product, RNE
  if (mant == 8) { mant = 0; ++e; }  // rounded up into the next binade (never past 448 here)
  return sign | (uint8_t)(((e + 7) << 3) | mant);
}

void quantizeFp8Row(const float* x, int hidden, uint8_t* q, float* scales) {
  assert(hidden % 128 == 0);
  for (int g = 0; g < hidden / 128; ++g) {
    const float* xg = x + g * 128;
    float amax = 0.0f;
    for (int i = 0; i < 128; ++i) amax = fmaxf(amax, fabsf(xg[i]));
    const float scale = amax == 0.0f ? 1.0f : amax / 448.0f;
    scales[g] = scale;
    for (int i = 0; i < 128; ++i) q[g * 128 + i] = floatToFp8e4m3(xg[i] / scale);
  }
}

// --- routing ---------------------------------------------------------------------------------

namespace {

// Rank owning expert id e, or -1 when e is not a valid expert id.
int rankOf(int64_t e, int numExperts, int numRanks) {
  if (e < 0 || e >= numExperts) return -1;
  return (int)(e / (numExperts / numRanks));
}

// True when token t of `r` has at least one expert on rank `rank`.
bool goesTo(const Routing& r, int t, int rank, int numExperts, int numRanks) {
  for (int k = 0; k < r.topK; ++k)
    if (rankOf(r.topkIdx[(size_t)t * r.topK + k], numExperts, numRanks) == rank) return true;
  return false;
}

}  // namespace

float roundedProduct(float a, float b) {
  volatile float p = a * b;
  return p;
}

float rankWeight(const int64_t* idx, const float* weights, int topK, int r, int numExperts, int numRanks) {
  float w = 0.0f;
  for (int k = 0; k < topK; ++k)
    if (rankOf(idx[k], numExperts, numRanks) == r) w += weights[k];
  return w;
}

Layout layout(const Routing& r, int numExperts, int numRanks, int numNodes) {
  assert(numRanks > 0 && numExperts % numRanks == 0);
  assert(numNodes > 0 && numRanks % numNodes == 0);
  assert(r.topkIdx.size() == (size_t)r.numTokens * r.topK);
  const int ranksPerNode = numRanks / numNodes;
  Layout l;
  l.tokensPerRank.assign(numRanks, 0);
  l.tokensPerExpert.assign(numExperts, 0);
  l.isTokenInRank.assign((size_t)r.numTokens * numRanks, 0);
  l.tokensPerNode.assign(numNodes, 0);
  l.isTokenInNode.assign((size_t)r.numTokens * numNodes, 0);
  for (int t = 0; t < r.numTokens; ++t) {
    for (int k = 0; k < r.topK; ++k) {
      const int64_t e = r.topkIdx[(size_t)t * r.topK + k];
      const int rank = rankOf(e, numExperts, numRanks);
      if (rank < 0) continue;
      ++l.tokensPerExpert[e];                          // per (token, k) entry
      l.isTokenInRank[(size_t)t * numRanks + rank] = 1;
      l.isTokenInNode[(size_t)t * numNodes + rank / ranksPerNode] = 1;
    }
    for (int rank = 0; rank < numRanks; ++rank)
      l.tokensPerRank[rank] += l.isTokenInRank[(size_t)t * numRanks + rank];  // once per token
    for (int node = 0; node < numNodes; ++node)
      l.tokensPerNode[node] += l.isTokenInNode[(size_t)t * numNodes + node];  // once per token
  }
  return l;
}

// Rows of every source s (s = 0..R-1, routing.size() == R) whose tokens have an expert on dst,
// in source order then token order. x rows are copied byte for byte; scales rows (hidden/128
// floats) only when scales[s] is non-empty for every source (BF16 passes empty vectors).
// topkWeights is filled only when the sources carry weights (Routing::topkWeights non-empty),
// otherwise left empty.
Received dispatch(int dst, const std::vector<Routing>& routing,
                  const std::vector<std::vector<uint8_t>>& xs,
                  const std::vector<std::vector<float>>& scales, int rowBytes, int hidden,
                  int numExperts) {
  const int numRanks = (int)routing.size();
  assert(numRanks > 0 && numExperts % numRanks == 0 && dst >= 0 && dst < numRanks);
  assert(xs.size() == routing.size());
  const int perRank = numExperts / numRanks;
  const int topK = routing[0].topK;
  const int groups = hidden / 128;
  // A rank with zero tokens has empty vectors: look at every rank.
  bool withScales = false, withWeights = false;
  for (const std::vector<float>& sc : scales) withScales |= !sc.empty();
  for (const Routing& r : routing) withWeights |= !r.topkWeights.empty();

  Received out;
  out.expertCounts.assign(perRank, 0);
  for (int s = 0; s < numRanks; ++s) {
    const Routing& r = routing[s];
    assert(r.topK == topK && xs[s].size() >= (size_t)r.numTokens * rowBytes);
    for (int t = 0; t < r.numTokens; ++t) {
      if (!goesTo(r, t, dst, numExperts, numRanks)) continue;
      ++out.numRows;
      out.srcRank.push_back(s);
      out.srcToken.push_back(t);
      const uint8_t* row = xs[s].data() + (size_t)t * rowBytes;
      out.x.insert(out.x.end(), row, row + rowBytes);
      if (withScales) {
        const float* sc = scales[s].data() + (size_t)t * groups;
        out.scales.insert(out.scales.end(), sc, sc + groups);
      }
      for (int k = 0; k < topK; ++k) {
        const int64_t e = r.topkIdx[(size_t)t * topK + k];
        const bool local = rankOf(e, numExperts, numRanks) == dst;
        const int64_t l = local ? e - (int64_t)dst * perRank : -1;
        out.topkIdx.push_back(l);
        if (local) ++out.expertCounts[l];  // per (row, k) entry
        if (withWeights) out.topkWeights.push_back(local ? r.topkWeights[(size_t)t * topK + k] : 0.0f);
      }
    }
  }
  return out;
}

std::vector<uint16_t> combine(int src, const std::vector<Routing>& routing,
                              const std::vector<std::vector<uint16_t>>& expertOut, int hidden,
                              int numExperts, bool weighted) {
  const int numRanks = (int)routing.size();
  assert(numRanks > 0 && numExperts % numRanks == 0 && src >= 0 && src < numRanks);
  assert(expertOut.size() == routing.size());
  const Routing& me = routing[src];
  assert(!weighted || me.topkWeights.size() == (size_t)me.numTokens * me.topK);

  // next[r] = row on rank r of src's next token that goes to r: it starts after the rows r
  // received from the sources before src, and src's tokens keep their order there.
  std::vector<int> next(numRanks, 0);
  for (int s = 0; s < src; ++s) {
    const Layout l = layout(routing[s], numExperts, numRanks);
    for (int r = 0; r < numRanks; ++r) next[r] += l.tokensPerRank[r];
  }

  std::vector<uint16_t> out((size_t)me.numTokens * hidden);
  std::vector<float> acc(hidden);
  for (int t = 0; t < me.numTokens; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int r = 0; r < numRanks; ++r) {
      if (!goesTo(me, t, r, numExperts, numRanks)) continue;
      const int row = next[r]++;
      const size_t e0 = (size_t)t * me.topK;
      const float w = weighted ? rankWeight(&me.topkIdx[e0], &me.topkWeights[e0], me.topK, r, numExperts, numRanks)
                               : 1.0f;
      assert(expertOut[r].size() >= (size_t)(row + 1) * hidden);
      const uint16_t* y = expertOut[r].data() + (size_t)row * hidden;
      for (int h = 0; h < hidden; ++h) acc[h] += roundedProduct(w, bf16ToFloat(y[h]));
    }
    for (int h = 0; h < hidden; ++h) out[(size_t)t * hidden + h] = floatToBf16(acc[h]);
  }
  return out;
}

std::vector<float> combineTopkValues(int src, const std::vector<Routing>& routing,
                                     const std::vector<std::vector<float>>& recvValues, int numExperts) {
  const int numRanks = (int)routing.size();
  assert(numRanks > 0 && numExperts % numRanks == 0 && src >= 0 && src < numRanks);
  assert(recvValues.size() == routing.size());
  const Routing& me = routing[src];
  const int K = me.topK;
  std::vector<int> next(numRanks, 0);  // as in combine: src's rows start after lower sources'
  for (int s = 0; s < src; ++s) {
    const Layout l = layout(routing[s], numExperts, numRanks);
    for (int r = 0; r < numRanks; ++r) next[r] += l.tokensPerRank[r];
  }
  std::vector<float> out((size_t)me.numTokens * K, 0.0f);
  for (int t = 0; t < me.numTokens; ++t) {
    for (int r = 0; r < numRanks; ++r) {
      if (!goesTo(me, t, r, numExperts, numRanks)) continue;
      const int row = next[r]++;
      assert(recvValues[r].size() >= (size_t)(row + 1) * K);
      for (int k = 0; k < K; ++k) out[(size_t)t * K + k] += recvValues[r][(size_t)row * K + k];
    }
  }
  return out;
}

Routing makeRouting(int topK, const std::vector<std::vector<int64_t>>& idx,
                    const std::vector<std::vector<float>>& weights) {
  Routing r;
  r.numTokens = (int)idx.size();
  r.topK = topK;
  for (const auto& row : idx) r.topkIdx.insert(r.topkIdx.end(), row.begin(), row.end());
  for (const auto& row : weights) r.topkWeights.insert(r.topkWeights.end(), row.begin(), row.end());
  return r;
}

}  // namespace moe_ref
