// The one-launch form of low-latency one-shot calls (src/device/ll/one_launch_lsa.cu): a rank
// whose T is at most the operation's NCCL_MOE_LL_ONE_LAUNCH limit (read at ncclMoeCommCreate,
// "D" or "D,C", default "4,1") runs that one-shot dispatch or combine as one kernel, with the
// rows, signals and bits of the two-launch form. Every case is checked exactly as the LL suites check (ll_test_util.h: counts, every block
// as a set keyed by srcToken with row and scale bytes, the combine bitwise against moe_ref):
//  - small T (1 token under the default limits; 2, 4, 8 under the limit "8"; the test shape and
//    DeepSeek's), and each operation alone in one launch ("8,0", "0,8");
//  - the limit forced above maxTokensPerRank on every rank, so that the one-launch kernels also
//    run with full slots (several fan-out CTAs, the combine's finisher election), one SM, skewed
//    routing into the fullest blocks;
//  - a dispatch grid of one CTA (maxTokensPerRank 1-4: no ticket), equal and unequal T, an
//    empty rank, and mixed with a two-launch rank;
//  - ranks on different forms in the same operations (the limit 0 on some ranks), and a rank
//    with no tokens (one launch) receiving full batches from two-launch ranks;
//  - two one-launch operations in flight, stream-ordered (buffer slots), each combine with its
//    own dispatch's weights;
//  - on a one-CTA grid, per-rank T that changes every round (empty ranks, every rank empty,
//    equal and unequal T) on one context, and two or three operations in flight;
//  - the fan-out with more than 64 scale words (FP32 scales, H 16384) on one and several CTAs
//    and in the two-launch and split forms, and 1024 / 2048 experts (L = 512 / 1024 local
//    experts at 2 ranks: as many as the CTA's threads, and more).
// Graph capture and the peer timeout of 1-token operations: ll_graph_timeout_test.cc. Every LL
// suite runs on either form alone with NCCL_MOE_LL_ONE_LAUNCH=0 / =1000000 in the environment.
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "ll_test_util.h"

namespace moe_gpu {
namespace {

class LlOneLaunch : public GpuTest {};

// Sets NCCL_MOE_LL_ONE_LAUNCH for the contexts created in its scope (NULL: unset), then puts
// back what the process had.
class ScopedLimit : public ScopedEnv {
 public:
  explicit ScopedLimit(const char* value) : ScopedEnv("NCCL_MOE_LL_ONE_LAUNCH", value) {}
};
constexpr const char* kAlways = "1000000";  // above any maxTokensPerRank of these tests

LlShape shape(bool fp8, ncclMoeScaleFormat_t fmt = ncclMoeScaleFp32) {
  LlShape s;
  s.fp8 = fp8;
  s.fmt = fmt;
  return s;
}

LlShape deepSeek(bool fp8) {
  LlShape s = shape(fp8, ncclMoeScaleUe8m0);
  s.hidden = 7168;
  s.experts = 288;
  return s;
}

// --- small batches ------------------------------------------------------------------------------

TEST_F(LlOneLaunch, OneTokenBf16) {
  ScopedLimit limit(nullptr);
  llScenario(shape(false), spec(2101, Route::Random, 1), LlRunOpts());
}

TEST_F(LlOneLaunch, OneTokenFp8Ue8m0) {
  ScopedLimit limit(nullptr);
  llScenario(shape(true, ncclMoeScaleUe8m0), spec(2102, Route::Random, 1), LlRunOpts());
}

TEST_F(LlOneLaunch, TwoTokensFp8Pow2) {
  ScopedLimit limit("8");
  llScenario(shape(true, ncclMoeScaleFp32Pow2), spec(2103, Route::Random, 2), LlRunOpts());
}

TEST_F(LlOneLaunch, EightTokensFp8Fp32Skewed) {
  ScopedLimit limit("8");
  llScenario(shape(true, ncclMoeScaleFp32), spec(2104, Route::RankZeroOnly, 8), LlRunOpts());
}

TEST_F(LlOneLaunch, DeepSeekShapeOneTokenFp8Ue8m0) {
  ScopedLimit limit(nullptr);
  llScenario(deepSeek(true), spec(2105, Route::Random, 1), LlRunOpts(), 3);
}

TEST_F(LlOneLaunch, DeepSeekShapeTwoTokensBf16) {
  ScopedLimit limit("8");
  llScenario(deepSeek(false), spec(2106, Route::Random, 2), LlRunOpts(), 3);
}

// Under the default limits 4 tokens dispatch in one launch and combine in two.
TEST_F(LlOneLaunch, DefaultLimitsFourTokensFp8Ue8m0) {
  ScopedLimit limit(nullptr);
  llScenario(shape(true, ncclMoeScaleUe8m0), spec(2107, Route::Random, 4), LlRunOpts());
}

TEST_F(LlOneLaunch, DispatchOnlyEightTokensBf16) {
  ScopedLimit limit("8,0");
  llScenario(shape(false), spec(2108, Route::Random, 8), LlRunOpts());
}

TEST_F(LlOneLaunch, CombineOnlyEightTokensFp8Fp32) {
  ScopedLimit limit("0,8");
  llScenario(shape(true, ncclMoeScaleFp32), spec(2109, Route::RankZeroOnly, 8), LlRunOpts());
}

// --- every size through one launch --------------------------------------------------------------

TEST_F(LlOneLaunch, ForcedRandomBf16) {
  ScopedLimit limit(kAlways);
  llScenario(shape(false), spec(2111), LlRunOpts());
}

TEST_F(LlOneLaunch, ForcedMaxTokensSkewedFp8Ue8m0) {
  ScopedLimit limit(kAlways);
  LlShape s = shape(true, ncclMoeScaleUe8m0);
  llScenario(s, spec(2112, Route::RankZeroOnly, s.maxTokens), LlRunOpts());
}

TEST_F(LlOneLaunch, ForcedDeepSeekShapeFp8Ue8m0) {
  ScopedLimit limit(kAlways);
  llScenario(deepSeek(true), spec(2113), LlRunOpts(), 2);
}

TEST_F(LlOneLaunch, ForcedOneSmFp8Pow2) {  // one CTA per kernel: no other role, no election
  ScopedLimit limit(kAlways);
  LlShape s = shape(true, ncclMoeScaleFp32Pow2);
  s.numSms = 1;
  llScenario(s, spec(2114), LlRunOpts());
}

TEST_F(LlOneLaunch, ForcedOneBufferSlotBf16) {
  ScopedLimit limit(kAlways);
  LlShape s = shape(false);
  s.slots = 1;
  llScenario(s, spec(2115, Route::Random, 3), LlRunOpts(), 3);
}

// --- a dispatch grid of one CTA at the default SM count -----------------------------------------
// R * maxTokens * row chunks <= 32 one-launch items (the host sizes the grid so: llOneLaunchCtas),
// as in ll_perf's 1-8 token runs: the CTA sends without a ticket or `go`, and its send count is
// read off the routing's path. The combine's guess of the first route entries (every source
// sending this rank's T) holds with equal T and misses with unequal T or an empty rank.

LlShape maxTokens(LlShape s, int m) {
  s.maxTokens = m;
  return s;
}

TEST_F(LlOneLaunch, OneCtaGridOneTokenBf16) {
  ScopedLimit limit(nullptr);
  llScenario(maxTokens(shape(false), 1), spec(2131, Route::Random, 1), LlRunOpts(), 3);
}

TEST_F(LlOneLaunch, OneCtaGridDeepSeekOneTokenFp8Ue8m0) {
  ScopedLimit limit(nullptr);
  llScenario(maxTokens(deepSeek(true), 1), spec(2132, Route::Random, 1), LlRunOpts(), 3);
}

TEST_F(LlOneLaunch, OneCtaGridDeepSeekOneTokenFp8Fp32) {
  ScopedLimit limit(nullptr);
  LlShape s = maxTokens(deepSeek(true), 1);
  s.fmt = ncclMoeScaleFp32;
  llScenario(s, spec(2133, Route::Random, 1), LlRunOpts(), 3);
}

TEST_F(LlOneLaunch, OneCtaGridUnequalTokensFp8Ue8m0) {  // T = 4 or 3 by rank
  ScopedLimit limit(kAlways);
  llScenario(maxTokens(shape(true, ncclMoeScaleUe8m0), 4), spec(2134), LlRunOpts());
}

TEST_F(LlOneLaunch, OneCtaGridRankZeroTwoLaunchesFp8Ue8m0) {  // forms mixed, one-CTA grids
  ScopedLimit limit(rank() == 0 ? "0" : kAlways);
  llScenario(maxTokens(deepSeek(true), 1), spec(2136, Route::Random, 1), LlRunOpts(), 3);
}

TEST_F(LlOneLaunch, OneCtaGridEmptyRankFp8Pow2) {  // rank 0: T = 0 (its counts without a round)
  ScopedLimit limit(kAlways);
  GenSpec g = spec(2135, Route::Random, 2);
  g.zeroTokenRank = 0;
  llScenario(maxTokens(shape(true, ncclMoeScaleFp32Pow2), 2), g, LlRunOpts());
}

// --- ranks on different forms -------------------------------------------------------------------

TEST_F(LlOneLaunch, RankZeroTwoLaunchesOthersOneBf16) {
  ScopedLimit limit(rank() == 0 ? "0" : kAlways);
  llScenario(shape(false), spec(2121), LlRunOpts());
}

TEST_F(LlOneLaunch, RankZeroOneLaunchOthersTwoFp8Ue8m0) {
  ScopedLimit limit(rank() == 0 ? kAlways : "0");
  llScenario(shape(true, ncclMoeScaleUe8m0), spec(2122), LlRunOpts());
}

// Rank 0 sends nothing (one launch under the default limits) and receives full batches from the
// two-launch ranks: its fan-out and its combine's partials need several CTAs.
TEST_F(LlOneLaunch, EmptyRankReceivesFullBatchesFp8Fp32) {
  ScopedLimit limit(nullptr);
  GenSpec g = spec(2123);
  g.zeroTokenRank = 0;
  llScenario(shape(true, ncclMoeScaleFp32), g, LlRunOpts());
}

// --- operations in flight -------------------------------------------------------------------

// Warm-up rounds reveal every slot; then s.slots one-launch operations are enqueued back to back
// (all dispatches, then all combines, no host step between them) with block-constant expert
// outputs in separate buffers, op 1 dispatched without weights.
void inFlight(const LlShape& s, uint64_t seed, int tokens) {
  const int n = s.slots, me = rank(), H = s.hidden;
  LlEp ep(s);
  if (!ep.create()) return;
  std::vector<LlProblem> p;
  std::vector<std::unique_ptr<LlInputs>> in;
  std::vector<std::unique_ptr<DevMem>> expert, comb;
  bool ok = true;
  for (int i = 0; i < n; i++) {
    p.push_back(makeLlProblem(s, spec(seed + i, Route::Random, tokens)));
    in.emplace_back(new LlInputs);
    ok = in[i]->upload(p[i]) && ok;
  }
  MOE_AGREE_OR_RETURN(ok, "upload inputs");
  for (int i = 0; i < n; i++)
    if (!llRunAndCheck(ep, *in[i], p[i], LlRunOpts(), s.str() + " [warm-up " + std::to_string(i) + "]")) return;
  for (int i = 0; i < n; i++) {
    ok = ep.poisonSlot(i) && ok;
    expert.emplace_back(new DevMem(s.slotRows() * H * 2));
    comb.emplace_back(new DevMem((size_t)s.maxTokens * H * 2));
    ok = ok && expert[i]->get() && comb[i]->get() && writeBlockConstantExpert(expert[i]->get(), s) &&
         poison(comb[i]->get(), comb[i]->bytes());
  }
  const std::string what = s.str() + " [" + std::to_string(n) + " one-launch operations in flight, " +
                           std::to_string(tokens) + " tokens]";
  MOE_AGREE_OR_RETURN(ok, (what + ": poison and expert outputs").c_str());
  usleep(2000 * me);  // the ranks enqueue at different times
  std::vector<ncclMoeLowLatencyOutput_t> out(n);
  auto weighted = [](int i) { return i != 1; };
  for (int i = 0; i < n && ok; i++) {
    memset(&out[i], 0, sizeof(out[i]));
    ok = MOE_OK(ncclMoeLowLatencyDispatch(ep.comm, in[i]->x.get(), in[i]->topkIdx.as<int64_t>(),
                                          weighted(i) ? in[i]->weights.as<float>() : nullptr, p[i].tokens(me), 0,
                                          &out[i], stream()));
  }
  for (int i = 0; i < n && ok; i++)
    ok = MOE_OK(ncclMoeLowLatencyCombine(ep.comm, &out[i], expert[i]->get(), comb[i]->get(), 0, stream()));
  ok = CUDA_OK(cudaStreamSynchronize(stream())) && ok;
  MOE_AGREE_OR_RETURN(ok, (what + ": enqueue and run").c_str());
  for (int i = 0; i < n; i++) {
    ep.record(out[i], what.c_str());
    const std::string tag = what + " op " + std::to_string(i);
    agreeMismatches(checkLlDispatch(out[i], p[i], llReference(p[i]), tag.c_str()), (tag + ": dispatch output").c_str());
    agreeMismatches(checkCombine(comb[i]->get(), llBlockConstantCombine(p[i], weighted(i)), p[i].tokens(me), H,
                                 tag.c_str()),
                    (tag + ": combine output").c_str());
  }
  MOE_AGREE_OR_RETURN(MOE_OK(ncclMoeCheckErrors(ep.comm)), "ncclMoeCheckErrors");
}

TEST_F(LlOneLaunch, TwoInFlightOneTokenBf16) {
  ScopedLimit limit(nullptr);
  inFlight(shape(false), 2131, 1);
}

TEST_F(LlOneLaunch, ThreeInFlightFourTokensFp8Ue8m0) {
  ScopedLimit limit("8");
  LlShape s = shape(true, ncclMoeScaleUe8m0);
  s.slots = 3;
  inFlight(s, 2132, 4);
}

// --- one-CTA grids with per-rank T changing between rounds (82a5fa8; review_s7.md 5, 4) -------
// M = 4 and one row chunk: R * M * chunks <= 32 items up to 8 ranks, a dispatch grid of one CTA
// (no ticket, no go) and a combine grid of one CTA. Rounds on one context (2 slots, each reused):
// unequal T, rank 0 empty, every rank empty, the last rank empty, equal T (the combine's guess of
// the first route entries holds), 1 token on rank 0 only, 2 each. Each round: poison, dispatch,
// full check, identity combine, bitwise check.
void tokensChangeEveryRound(const LlShape& s, uint64_t seed) {
  const int R = nRanks();
  auto tokens = [R](int i, int r) {
    switch (i) {
      case 0: return r == 0 ? 3 : 1;
      case 1: return r == 0 ? 0 : 4;
      case 2: return 0;
      case 3: return r == R - 1 ? 0 : r % 4 + 1;
      case 4: return 4;
      case 5: return r == 0 ? 1 : 0;
      default: return 2;
    }
  };
  LlEp ep(s);
  if (!ep.create()) return;
  LlInputs in;
  for (int i = 0; i < 7; i++) {
    LlProblem p = makeLlProblem(s, spec(seed + i, Route::Random, s.maxTokens));
    std::vector<int> t(R);
    for (int r = 0; r < R; r++) t[r] = tokens(i, r);
    cutLlTokens(p, t);
    MOE_AGREE_OR_RETURN(in.upload(p), "upload inputs");
    LlRunOpts o;
    o.src = i % 2 ? LlExpertSrc::Separate : LlExpertSrc::CombineInput;
    o.weighted = i % 3 != 1;
    const std::string tag = s.str() + " [round " + std::to_string(i + 1) + ", T " + std::to_string(t[rank()]) +
                            (o.weighted ? ", weighted]" : ", unweighted]");
    if (!llRunAndCheck(ep, in, p, o, tag)) return;
  }
}

TEST_F(LlOneLaunch, OneCtaGridTokensChangeEveryRoundBf16) {
  ScopedLimit limit(kAlways);
  tokensChangeEveryRound(maxTokens(shape(false), 4), 2141);
}

TEST_F(LlOneLaunch, OneCtaGridTokensChangeEveryRoundFp8Ue8m0) {
  ScopedLimit limit(kAlways);
  tokensChangeEveryRound(maxTokens(shape(true, ncclMoeScaleUe8m0), 4), 2142);
}

TEST_F(LlOneLaunch, OneCtaGridTokensChangeEveryRoundMixedFormsFp8Fp32) {  // rank 0: two launches
  ScopedLimit limit(rank() == 0 ? "0" : kAlways);
  tokensChangeEveryRound(maxTokens(shape(true, ncclMoeScaleFp32), 4), 2143);
}

// Operations in flight on one-CTA grids (the solo dispatch takes no ticket and releases no go,
// so nothing orders two launches on different slots but the stream).
TEST_F(LlOneLaunch, TwoInFlightOneCtaGridUnequalTokensBf16) {  // T = 4 or 3 by rank
  ScopedLimit limit(kAlways);
  inFlight(maxTokens(shape(false), 4), 2151, -1);
}

TEST_F(LlOneLaunch, ThreeInFlightOneCtaGridFp8Pow2) {
  ScopedLimit limit(kAlways);
  LlShape s = maxTokens(shape(true, ncclMoeScaleFp32Pow2), 2);
  s.slots = 3;
  inFlight(s, 2152, 2);
}

// --- fan-out with more than 64 scale words (82a5fa8; review_s7.md 5, 6) -----------------------
// A token with several experts on one rank reaches it once and is copied there to the further
// rows (fanOutChunk): the row's first 64 scale words are loaded with its first chunk, the others
// by the tail loop (lane + 64 ..). FP32 scales at H 16384: 128 words per row (4 row chunks).

LlShape wideScales(ncclMoeScaleFormat_t fmt, int m) {
  LlShape s = shape(true, fmt);
  s.hidden = 16384;
  s.maxTokens = m;
  return s;
}

// Tokens (over every rank) with at least two experts on one rank: the fan-out's work.
int tokensWithSharedRank(const LlProblem& p) {
  const int R = nRanks(), L = p.shape.local(), K = p.shape.topK;
  int n = 0;
  for (int r = 0; r < R; r++)
    for (int t = 0; t < p.tokens(r); t++) {
      std::vector<int> per(R, 0);
      bool shared = false;
      for (int k = 0; k < K; k++) {
        const int64_t e = p.routing[r].topkIdx[(size_t)t * K + k];
        if (e >= 0 && ++per[e / L] >= 2) shared = true;
      }
      n += shared;
    }
  return n;
}

void wideScalesScenario(const LlShape& s, uint64_t seed, const LlRunOpts& o) {
  EXPECT_GT(tokensWithSharedRank(makeLlProblem(s, spec(seed))), 0) << "no token to fan out in the first round";
  llScenario(s, spec(seed), o, 3);
}

TEST_F(LlOneLaunch, WideScalesOneCtaGridFp8Fp32H16384) {  // 2 ranks: 2 * 4 * 4 chunks = 32 items
  ScopedLimit limit(kAlways);
  wideScalesScenario(wideScales(ncclMoeScaleFp32, 4), 2161, LlRunOpts());
}

TEST_F(LlOneLaunch, WideScalesSeveralCtasFp8Pow2H16384) {
  ScopedLimit limit(kAlways);
  wideScalesScenario(wideScales(ncclMoeScaleFp32Pow2, 16), 2162, LlRunOpts());
}

TEST_F(LlOneLaunch, WideScalesTwoLaunchesFp8Fp32H16384) {
  ScopedLimit limit("0");
  wideScalesScenario(wideScales(ncclMoeScaleFp32, 16), 2163, LlRunOpts());
}

TEST_F(LlOneLaunch, WideScalesSplitFp8Fp32H16384) {
  LlRunOpts o;
  o.split = true;
  wideScalesScenario(wideScales(ncclMoeScaleFp32, 16), 2164, o);
}

// --- more experts than threads (82a5fa8; review_s7.md 5, 7) -----------------------------------
// E = 1024 (at 2 ranks L = 512) and 2048 (L = 1024): the solo send's count stores stride over E
// (512 threads), and the completion's count sums over L start from the last threads and stride.

LlShape manyExperts(bool fp8, int experts, int hidden, int m) {
  LlShape s = shape(fp8, ncclMoeScaleUe8m0);
  s.experts = experts;
  s.hidden = hidden;
  s.maxTokens = m;
  return s;
}

TEST_F(LlOneLaunch, ManyExpertsE1024OneCtaGridBf16) {
  ScopedLimit limit(kAlways);
  llScenario(manyExperts(false, 1024, 1024, 8), spec(2171), LlRunOpts(), 3);
}

TEST_F(LlOneLaunch, ManyExpertsE2048OneCtaGridFp8Ue8m0) {
  ScopedLimit limit(kAlways);
  llScenario(manyExperts(true, 2048, 2048, 4), spec(2172), LlRunOpts(), 3);
}

TEST_F(LlOneLaunch, ManyExpertsE2048TwoLaunchesBf16) {
  ScopedLimit limit("0");
  llScenario(manyExperts(false, 2048, 1024, 8), spec(2173), LlRunOpts(), 3);
}

}  // namespace
}  // namespace moe_gpu
