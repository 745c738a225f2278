// CPU reference model of layout, dispatch, combine and FP8 quantisation. The GPU tests compare
// the library's outputs to it element by element; the unit tests check the model itself.
// All data is host memory; BF16 values are raw uint16_t bit patterns, FP8 e4m3 raw uint8_t.
#pragma once
#include <stdint.h>
#include <vector>

namespace moe_ref {

// --- number formats -------------------------------------------------------------------------
float bf16ToFloat(uint16_t v);
uint16_t floatToBf16(float f);       // round to nearest even, NaN -> 0x7fff (the device's cvt)
// a * b rounded to float, never fused with a following add into an FMA (a volatile store: GCC
// contracts across statements when FMA is available); the kernels' w * x before the sum.
float roundedProduct(float a, float b);
float fp8e4m3ToFloat(uint8_t v);
uint8_t floatToFp8e4m3(float f);     // round to nearest even, saturating to +-448

// Quantises one token row of `hidden` floats (hidden % 128 == 0) to FP8 e4m3 with one FP32
// scale per 128 channels: scale = amax/448 (1 for an all-zero group), q = fp8(x / scale).
// Writes hidden bytes to q and hidden/128 floats to scales.
void quantizeFp8Row(const float* x, int hidden, uint8_t* q, float* scales);

// --- routing ---------------------------------------------------------------------------------
struct Routing {            // one rank's routing input
  int numTokens = 0, topK = 0;
  std::vector<int64_t> topkIdx;   // [numTokens][topK], -1 = none
  std::vector<float> topkWeights; // [numTokens][topK]
};
// A routing from per-token rows of expert ids (each of topK entries) and, optionally, weights.
Routing makeRouting(int topK, const std::vector<std::vector<int64_t>>& idx,
                    const std::vector<std::vector<float>>& weights = {});

// One rank's routing statistics (ncclMoeGetLayout / ncclMoeGetLayoutNodes). The R ranks form
// numNodes nodes of R/numNodes consecutive ranks (node n holds ranks n*R/N .. (n+1)*R/N - 1);
// a token counts once per rank and once per node it has an expert on (the per-node dedup).
struct Layout {
  std::vector<int> tokensPerRank;     // [R]
  std::vector<int> tokensPerExpert;   // [E]
  std::vector<uint8_t> isTokenInRank; // [numTokens][R]
  std::vector<int> tokensPerNode;     // [N]
  std::vector<uint8_t> isTokenInNode; // [numTokens][N]
};
Layout layout(const Routing& r, int numExperts, int numRanks, int numNodes = 1);

// w(t, r) of one token (idx, weights: its topK entries): the sum in k order, from 0.0f, of the
// weights whose expert lives on rank r (numExperts / numRanks experts per rank; -1 = none) — the
// weight a weighted HT combine gives rank r's row of the token.
float rankWeight(const int64_t* idx, const float* weights, int topK, int r, int numExperts, int numRanks);

// What rank `dst` receives from all ranks in one dispatch, rows ordered by source rank then
// source token. rowBytes = bytes of one token row in the dispatch dtype.
struct Received {
  int numRows = 0;
  std::vector<uint8_t> x;            // [numRows][rowBytes]
  std::vector<float> scales;         // [numRows][hidden/128] (empty for BF16)
  std::vector<int64_t> topkIdx;      // [numRows][topK], local expert id or -1
  std::vector<float> topkWeights;    // [numRows][topK], 0 where topkIdx is -1
  std::vector<int> expertCounts;     // [E/R]
  std::vector<int> srcRank, srcToken;// [numRows]
};
// xs[s]: rank s's tokens, [numTokens][rowBytes]; scales[s]: [numTokens][hidden/128] or empty.
Received dispatch(int dst, const std::vector<Routing>& routing,
                  const std::vector<std::vector<uint8_t>>& xs,
                  const std::vector<std::vector<float>>& scales, int rowBytes, int hidden,
                  int numExperts);

// Combine for source rank `src`: expertOut[r] is rank r's BF16 expert output, rows as
// dispatch(r, ...) ordered them. out[t] = sum over ranks r in increasing order that received t of
// w(t,r) * expertOut_r[row], accumulated in FP32 and rounded to BF16 once; w(t,r) = sum of the
// weights of t's experts on r when weighted, else 1. Returns [numTokens][hidden] BF16.
std::vector<uint16_t> combine(int src, const std::vector<Routing>& routing,
                              const std::vector<std::vector<uint16_t>>& expertOut, int hidden,
                              int numExperts, bool weighted);

// The per-row top-k values of ncclMoeCombineWithWeights for source rank `src`: recvValues[r] is
// rank r's [rows][topK] FP32 values, rows as dispatch(r, ...) ordered them. Returns [T][topK]:
// out[t][k] = sum over ranks r in increasing order that received t of recvValues[r][row][k],
// FP32 from +0.0f; 0 for tokens that went nowhere.
std::vector<float> combineTopkValues(int src, const std::vector<Routing>& routing,
                                     const std::vector<std::vector<float>>& recvValues, int numExperts);

}  // namespace moe_ref
