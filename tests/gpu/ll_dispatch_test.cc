// Low-latency dispatch (and the identity-expert combine after it) on a fresh EP context per test:
// random routing with ~10% -1 entries, skewed routing (every expert of every token on rank 0),
// 1 token per rank, maxTokensPerRank tokens per rank, a rank with no tokens, tokens without any
// expert; BF16 and FP8 with the three scale formats; other shapes (K = 1, small / odd hidden,
// one SM, 1 or 3 buffer slots, a DeepSeek-like shape).
//
// Every scenario runs 4 dispatch + combine rounds with new data (llScenario): the first use of
// each slot cannot be poisoned (its pointers are not known yet), later ones are. Each round
// compares the counts exactly and every (local expert, source) block as a set keyed by srcToken
// (row bytes and scales bitwise), then the combine bitwise against moe_ref::llCombine, with
// the expert output in out.combineInput or in a separate buffer, and the dispatch given the
// weights (weighted combine) or NULL (unweighted).
#include "ll_test_util.h"

namespace moe_gpu {
namespace {

class LlDispatch : public GpuTest {};

LlShape bf16Shape() { return LlShape(); }

LlShape fp8Shape(ncclMoeScaleFormat_t fmt) {
  LlShape s;
  s.fp8 = true;
  s.fmt = fmt;
  return s;
}

LlRunOpts oneShot() { return LlRunOpts(); }

// --- routing scenarios, BF16 and the three FP8 formats ------------------------------------------

TEST_F(LlDispatch, RandomBf16) { llScenario(bf16Shape(), spec(801), oneShot()); }

TEST_F(LlDispatch, RandomFp8Fp32Scales) {
  llScenario(fp8Shape(ncclMoeScaleFp32), spec(802), oneShot());
}

TEST_F(LlDispatch, RandomFp8Pow2Scales) {
  llScenario(fp8Shape(ncclMoeScaleFp32Pow2), spec(803), oneShot());
}

TEST_F(LlDispatch, RandomFp8Ue8m0Scales) {
  llScenario(fp8Shape(ncclMoeScaleUe8m0), spec(804), oneShot());
}

TEST_F(LlDispatch, SkewedToRankZeroBf16) {
  llScenario(bf16Shape(), spec(811, Route::RankZeroOnly), oneShot());
}

TEST_F(LlDispatch, SkewedToRankZeroFp8Ue8m0) {
  llScenario(fp8Shape(ncclMoeScaleUe8m0), spec(812, Route::RankZeroOnly), oneShot());
}

TEST_F(LlDispatch, OneTokenPerRankBf16) {
  llScenario(bf16Shape(), spec(821, Route::Random, 1), oneShot());
}

TEST_F(LlDispatch, OneTokenPerRankFp8Pow2) {
  llScenario(fp8Shape(ncclMoeScaleFp32Pow2), spec(822, Route::Random, 1), oneShot());
}

TEST_F(LlDispatch, MaxTokensPerRankBf16) {
  llScenario(bf16Shape(), spec(831, Route::Random, bf16Shape().maxTokens), oneShot());
}

TEST_F(LlDispatch, MaxTokensPerRankFp8Fp32) {
  LlShape s = fp8Shape(ncclMoeScaleFp32);
  llScenario(s, spec(832, Route::Random, s.maxTokens), oneShot());
}

// All tokens of every rank to rank 0's experts, maxTokensPerRank each: the fullest blocks.
TEST_F(LlDispatch, MaxTokensSkewedFp8Ue8m0) {
  LlShape s = fp8Shape(ncclMoeScaleUe8m0);
  llScenario(s, spec(833, Route::RankZeroOnly, s.maxTokens), oneShot());
}

TEST_F(LlDispatch, RankZeroSendsNothingBf16) {
  GenSpec g = spec(841);
  g.zeroTokenRank = 0;
  llScenario(bf16Shape(), g, oneShot());
}

TEST_F(LlDispatch, LastRankSendsNothingFp8Fp32) {
  GenSpec g = spec(842);
  g.zeroTokenRank = nRanks() - 1;
  llScenario(fp8Shape(ncclMoeScaleFp32), g, oneShot());
}

// Every top-k entry -1: nothing is received anywhere, every combine output is zero.
TEST_F(LlDispatch, NoExpertAtAll) {
  GenSpec g = spec(843);
  g.dropProb = 1.0;
  llScenario(bf16Shape(), g, oneShot(), 2);
  llScenario(fp8Shape(ncclMoeScaleFp32Pow2), g, oneShot(), 2);
}

// --- other shapes ---------------------------------------------------------------------------

TEST_F(LlDispatch, TopOneFp8) {
  LlShape s = fp8Shape(ncclMoeScaleFp32);
  s.topK = 1;
  llScenario(s, spec(851), oneShot());
}

// K = every local expert of one rank: with skewed routing each token goes K times to rank 0.
TEST_F(LlDispatch, AllLocalExpertsOfRankZero) {
  LlShape s = bf16Shape();
  s.experts = 8 * nRanks();
  s.topK = 8;
  llScenario(s, spec(852, Route::RankZeroOnly), oneShot());
}

// One group of 128 channels per row (FP8), and a BF16 row that is not a multiple of any warp
// width (1000 elements = 125 16-byte vectors).
TEST_F(LlDispatch, SmallHiddenFp8) {
  LlShape s = fp8Shape(ncclMoeScaleFp32);
  s.hidden = 128;
  llScenario(s, spec(853), oneShot());
}

TEST_F(LlDispatch, OddHiddenBf16) {
  LlShape s = bf16Shape();
  s.hidden = 1000;
  llScenario(s, spec(854), oneShot());
}

TEST_F(LlDispatch, OneSmBf16) {
  LlShape s = bf16Shape();
  s.numSms = 1;
  llScenario(s, spec(861), oneShot());
}

TEST_F(LlDispatch, EightSmsFp8Ue8m0) {
  LlShape s = fp8Shape(ncclMoeScaleUe8m0);
  s.numSms = 8;
  llScenario(s, spec(862), oneShot());
}

TEST_F(LlDispatch, OneBufferSlot) {
  LlShape s = fp8Shape(ncclMoeScaleFp32Pow2);
  s.slots = 1;
  llScenario(s, spec(871), oneShot(), 3);
}

TEST_F(LlDispatch, ThreeBufferSlots) {
  LlShape s = bf16Shape();
  s.slots = 3;
  llScenario(s, spec(872), oneShot(), 6);
}

// DeepSeek-V3-like decode: H 7168, 288 experts (rounded up to the ranks), top-8, 128 tokens.
TEST_F(LlDispatch, DeepSeekShapeFp8Ue8m0) {
  LlShape s = fp8Shape(ncclMoeScaleUe8m0);
  s.hidden = 7168;
  s.experts = 288;
  llScenario(s, spec(881), oneShot(), 3);
}

TEST_F(LlDispatch, DeepSeekShapeBf16) {
  LlShape s = bf16Shape();
  s.hidden = 7168;
  s.experts = 288;
  llScenario(s, spec(882), oneShot(), 3);
}

// The window is allocated right after memory full of 0xFF bytes was freed (NCCL's allocator and
// cudaMalloc): signals and counts the library did not initialise would look like a peer's.
TEST_F(LlDispatch, WindowOnDirtyMemory) {
  const LlShape s = bf16Shape();
  const ncclMoeConfig_t cfg = makeLlConfig(s);
  size_t bytes = 0;
  bool ok = MOE_OK(ncclMoeGetWindowSize(&cfg, nRanks(), &bytes));
  for (int i = 0; ok && i < 2; i++) {
    void* p = nullptr;
    ok = i == 0 ? MOE_OK(ncclMemAlloc(&p, bytes)) : CUDA_OK(cudaMalloc(&p, bytes));
    ok = ok && CUDA_OK(cudaMemset(p, 0xFF, bytes)) && CUDA_OK(cudaDeviceSynchronize());
    if (p) ok = (i == 0 ? MOE_OK(ncclMemFree(p)) : CUDA_OK(cudaFree(p))) && ok;
  }
  MOE_AGREE_OR_RETURN(ok, "dirty memory before the context");
  llScenario(s, spec(891), oneShot(), 2);
}

}  // namespace
}  // namespace moe_gpu
