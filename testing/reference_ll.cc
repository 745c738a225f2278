// CPU reference model of the low-latency mode (see reference_ll.h).
//
// Rules fixed here:
//  - FP8 cast, per group of 128 channels of a BF16 row: amax = max |x| over the group, then
//    amax = max(amax, 1e-4f).
//      FP32:        scale = amax / 448.0f, inverse = 448.0f / amax (two IEEE float divisions);
//      pow2, UE8M0: s = amax / 448.0f; e = the smallest integer with 2^e >= s; scale = 2^e,
//                   inverse = 2^-e; UE8M0 stores the byte e + 127, group 4j+i in byte i of
//                   int32 j (little-endian). A group holding +-Inf (amax = Inf): scale +Inf,
//                   inverse 0, UE8M0 byte 255 (as the FP32 format's amax / 448 and 448 / amax).
//    q = e4m3(x * inverse): the float product, then round to nearest even saturating to 448.
//  - Dequantised value: fp8ToFloat(q) * scale (float), rounded to BF16 for the identity expert.
//  - Dispatch: one row per (token, k) whose expert lives on dst; blocks keyed (local expert,
//    source rank). Counting per (token, k) entry.
//  - Combine: per token, one BF16 partial per destination rank (its k in increasing order, valid
//    entries only), then the partials in rank order.
#include "reference_ll.h"

#include <assert.h>
#include <math.h>
#include <string.h>

#include <algorithm>

namespace moe_ref {

namespace {

constexpr int kGroup = 128;
constexpr float kFp8Max = 448.0f;
constexpr float kAmaxFloor = 1e-4f;

bool isPow2Format(ncclMoeScaleFormat_t fmt) {
  return fmt == ncclMoeScaleFp32Pow2 || fmt == ncclMoeScaleUe8m0;
}

}  // namespace

int llScaleBytesPerRow(int hidden, ncclMoeScaleFormat_t fmt) {
  const int groups = hidden / kGroup;
  if (fmt == ncclMoeScaleUe8m0) return (groups + 3) / 4 * 4;
  return groups * (int)sizeof(float);
}

LlScale llGroupScale(float amax, ncclMoeScaleFormat_t fmt) {
  amax = fmaxf(amax, kAmaxFloor);
  LlScale s;
  if (!isPow2Format(fmt)) {
    volatile float scale = amax / kFp8Max, inverse = kFp8Max / amax;
    s.scale = scale;
    s.inverse = inverse;
    s.exponent = 0;
    return s;
  }
  volatile float r = amax / kFp8Max;
  if (isinf(r)) {
    s.scale = INFINITY;
    s.inverse = 0.0f;
    s.exponent = 128;  // byte 255
    return s;
  }
  int ex = 0;
  const float m = frexpf(r, &ex);  // r = m * 2^ex, m in [0.5, 1)
  const int e = m == 0.5f ? ex - 1 : ex;
  s.scale = ldexpf(1.0f, e);
  s.inverse = ldexpf(1.0f, -e);
  s.exponent = e;
  return s;
}

void llCastRow(const uint16_t* row, int hidden, ncclMoeScaleFormat_t fmt, uint8_t* q,
               uint8_t* scales) {
  assert(hidden % kGroup == 0);
  const int groups = hidden / kGroup;
  memset(scales, 0, (size_t)llScaleBytesPerRow(hidden, fmt));
  for (int g = 0; g < groups; ++g) {
    float amax = 0.0f;
    for (int i = 0; i < kGroup; ++i) amax = fmaxf(amax, fabsf(bf16ToFloat(row[g * kGroup + i])));
    const LlScale s = llGroupScale(amax, fmt);
    for (int i = 0; i < kGroup; ++i)
      q[g * kGroup + i] = floatToFp8e4m3(roundedProduct(bf16ToFloat(row[g * kGroup + i]), s.inverse));
    if (fmt == ncclMoeScaleUe8m0) {
      assert(s.exponent + 127 > 0 && s.exponent + 127 <= 255);
      scales[(g / 4) * 4 + g % 4] = (uint8_t)(s.exponent + 127);  // little-endian int32 j = g/4
    } else {
      memcpy(scales + (size_t)g * sizeof(float), &s.scale, sizeof(float));
    }
  }
}

float llScaleOf(const uint8_t* scales, int group, ncclMoeScaleFormat_t fmt) {
  if (fmt == ncclMoeScaleUe8m0) return ldexpf(1.0f, (int)scales[group] - 127);
  float s;
  memcpy(&s, scales + (size_t)group * sizeof(float), sizeof(float));
  return s;
}

void llDequantRowToBf16(const uint8_t* q, const uint8_t* scales, int hidden,
                        ncclMoeScaleFormat_t fmt, uint16_t* out) {
  for (int c = 0; c < hidden; ++c)
    out[c] = floatToBf16(roundedProduct(fp8e4m3ToFloat(q[c]), llScaleOf(scales, c / kGroup, fmt)));
}

LlRows llSendRows(const std::vector<uint16_t>& bf16, int numTokens, int hidden, bool fp8,
                  ncclMoeScaleFormat_t fmt) {
  assert(bf16.size() >= (size_t)numTokens * hidden);
  LlRows r;
  r.numTokens = numTokens;
  r.rowBytes = fp8 ? hidden : 2 * hidden;
  r.scaleBytes = fp8 ? llScaleBytesPerRow(hidden, fmt) : 0;
  r.x.resize((size_t)numTokens * r.rowBytes);
  r.scales.resize((size_t)numTokens * r.scaleBytes);
  r.ident.resize((size_t)numTokens * hidden);
  for (int t = 0; t < numTokens; ++t) {
    const uint16_t* src = bf16.data() + (size_t)t * hidden;
    uint16_t* id = r.ident.data() + (size_t)t * hidden;
    if (!fp8) {
      memcpy(r.x.data() + (size_t)t * r.rowBytes, src, (size_t)hidden * 2);
      memcpy(id, src, (size_t)hidden * 2);
      continue;
    }
    uint8_t* q = r.x.data() + (size_t)t * r.rowBytes;
    uint8_t* sc = r.scales.data() + (size_t)t * r.scaleBytes;
    llCastRow(src, hidden, fmt, q, sc);
    llDequantRowToBf16(q, sc, hidden, fmt, id);
  }
  return r;
}

long LlReceived::totalRows() const {
  long n = 0;
  for (int c : expertCounts) n += c;
  return n;
}

LlReceived llDispatch(int dst, const std::vector<Routing>& routing, int numExperts) {
  const int R = (int)routing.size();
  assert(R > 0 && numExperts % R == 0 && dst >= 0 && dst < R);
  const int L = numExperts / R;
  LlReceived out;
  out.numLocal = L;
  out.numRanks = R;
  out.countsPerSource.assign((size_t)L * R, 0);
  out.expertCounts.assign(L, 0);
  out.blockTokens.assign((size_t)L * R, {});
  for (int s = 0; s < R; ++s) {
    const Routing& r = routing[s];
    for (int t = 0; t < r.numTokens; ++t)
      for (int k = 0; k < r.topK; ++k) {
        const int64_t e = r.topkIdx[(size_t)t * r.topK + k];
        if (e < 0 || e >= numExperts || e / L != dst) continue;
        const int l = (int)(e - (int64_t)dst * L);
        out.blockTokens[(size_t)l * R + s].push_back(t);  // t increasing: already sorted
        ++out.countsPerSource[(size_t)l * R + s];
        ++out.expertCounts[l];
      }
  }
  for (auto& b : out.blockTokens) std::sort(b.begin(), b.end());
  return out;
}

std::vector<uint16_t> llCombine(const Routing& r, const LlExpertRow& y, int hidden, bool weighted,
                                int numExperts, int nRanks) {
  assert(!weighted || r.topkWeights.size() >= (size_t)r.numTokens * r.topK);
  assert(nRanks > 0 && numExperts % nRanks == 0);
  const int L = numExperts / nRanks;
  std::vector<uint16_t> out((size_t)r.numTokens * hidden);
  std::vector<float> acc(hidden), partial(hidden);
  for (int t = 0; t < r.numTokens; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int d = 0; d < nRanks; ++d) {
      bool any = false;
      std::fill(partial.begin(), partial.end(), 0.0f);
      for (int k = 0; k < r.topK; ++k) {
        const int64_t e = r.topkIdx[(size_t)t * r.topK + k];
        if (e < 0 || e >= numExperts || e / L != d) continue;
        any = true;
        const float w = weighted ? r.topkWeights[(size_t)t * r.topK + k] : 1.0f;
        const uint16_t* row = y(t, k);
        for (int h = 0; h < hidden; ++h) partial[h] = partial[h] + roundedProduct(w, bf16ToFloat(row[h]));
      }
      if (!any) continue;
      for (int h = 0; h < hidden; ++h) acc[h] = acc[h] + bf16ToFloat(floatToBf16(partial[h]));
    }
    for (int h = 0; h < hidden; ++h) out[(size_t)t * hidden + h] = floatToBf16(acc[h]);
  }
  return out;
}

}  // namespace moe_ref
