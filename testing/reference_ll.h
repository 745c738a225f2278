// CPU reference model of the low-latency (LL) mode: the FP8 cast done in the sending warp, the
// expert-major dispatch layout and the per-(token, rank) combine. See reference_ll.cc for the exact
// rules; the GPU tests (tests/gpu/ll_*) and perf/ll_perf compare the library against it.
// All data is host memory; BF16 values are raw uint16_t bit patterns, FP8 e4m3 raw uint8_t.
#pragma once
#include <stdint.h>

#include <functional>
#include <vector>

#include "nccl_moe.h"
#include "reference.h"

namespace moe_ref {

// --- the LL FP8 cast ---------------------------------------------------------------------------
// Bytes of the scales of one row of `hidden` channels: H/128 floats for the FP32 formats,
// ceil(H/512) int32 for UE8M0 (the library requires H % 512 == 0 for UE8M0, where this is
// H/512; a partial last int32 would hold the remaining groups and zero bytes).
int llScaleBytesPerRow(int hidden, ncclMoeScaleFormat_t fmt);

// The scale of one group, from its amax (before the 1e-4 clamp, which this applies).
struct LlScale {
  float scale;     // dequantisation factor
  float inverse;   // quantisation factor
  int exponent;    // power-of-two formats: scale == 2^exponent (0 for FP32)
};
LlScale llGroupScale(float amax, ncclMoeScaleFormat_t fmt);

// Casts one BF16 row (hidden % 128 == 0) to e4m3: writes hidden bytes to q and
// llScaleBytesPerRow(hidden, fmt) bytes to scales (float array, or packed UE8M0 int32s).
void llCastRow(const uint16_t* row, int hidden, ncclMoeScaleFormat_t fmt, uint8_t* q,
               uint8_t* scales);

// Dequantisation factor of group g of a row's scale bytes.
float llScaleOf(const uint8_t* scales, int group, ncclMoeScaleFormat_t fmt);

// fp8ToFloat(q) * scale rounded to BF16: what the identity expert returns for an FP8 row.
void llDequantRowToBf16(const uint8_t* q, const uint8_t* scales, int hidden,
                        ncclMoeScaleFormat_t fmt, uint16_t* out);

// --- what a source rank sends: one row per token (the same bytes to every destination) --------
struct LlRows {
  int numTokens = 0, rowBytes = 0, scaleBytes = 0;
  std::vector<uint8_t> x;       // [T][rowBytes]: BF16 (2H bytes) or e4m3 (H bytes)
  std::vector<uint8_t> scales;  // [T][scaleBytes], empty for BF16
  std::vector<uint16_t> ident;  // [T][H] BF16: the identity expert's output for the row
  const uint8_t* row(int t) const { return x.data() + (size_t)t * rowBytes; }
  const uint8_t* scale(int t) const { return scales.data() + (size_t)t * scaleBytes; }
  const uint16_t* identRow(int t, int hidden) const { return ident.data() + (size_t)t * hidden; }
};
// bf16: [T][H] BF16 tokens of one rank. fp8 = config.dispatchDtype is FP8.
LlRows llSendRows(const std::vector<uint16_t>& bf16, int numTokens, int hidden, bool fp8,
                  ncclMoeScaleFormat_t fmt);

// --- dispatch ---------------------------------------------------------------------------------
// What rank `dst` receives: for local expert l and source s, the tokens t of s with
// topkIdx_s[t][k] == dst*L + l for some k (one row per such pair), sorted by t. The library puts
// them at x[l][s*M + i], i < count, in any order.
struct LlReceived {
  int numLocal = 0, numRanks = 0;
  std::vector<int> countsPerSource;           // [L][R]
  std::vector<int> expertCounts;              // [L]
  std::vector<std::vector<int>> blockTokens;  // [L*R]: block (l, s) at l*R + s, sorted
  int count(int l, int s) const { return countsPerSource[(size_t)l * numRanks + s]; }
  const std::vector<int>& tokens(int l, int s) const {
    return blockTokens[(size_t)l * numRanks + s];
  }
  long totalRows() const;
};
LlReceived llDispatch(int dst, const std::vector<Routing>& routing, int numExperts);

// --- combine ---------------------------------------------------------------------------------
// Per (token, rank), as the library sums: for every rank d in increasing order that owns an
// expert of token t (expert e on rank e / (numExperts / nRanks)), the partial
//   p(t, d) = bf16( sum over k in increasing order with topkIdx[t][k] on d of w * y(t, k) )
// (FP32: acc = acc + (w * y rounded to float), acc from +0.0f; w the weight, 1 when !weighted);
// then out[t] = bf16( sum over those d in increasing order of float(p(t, d)) ), acc from +0.0f.
// A token with no valid k gives +0. Returns [T][H] BF16.
using LlExpertRow = std::function<const uint16_t*(int t, int k)>;
std::vector<uint16_t> llCombine(const Routing& r, const LlExpertRow& y, int hidden, bool weighted,
                                int numExperts, int nRanks);

}  // namespace moe_ref
