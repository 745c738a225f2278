// High-throughput dispatch (each scenario also combines, so that every handle is exercised):
// random routing with -1s in BF16 and FP8, skewed routing, ranks without tokens, tiny inputs,
// host counts. Everything is compared element-exactly with moe_ref. The layout call:
// ht_layout_test.cc.
#include "gpu_env.h"

namespace moe_gpu {
namespace {

class HtDispatch : public GpuTest {};

Shape shape(int hidden, int topK, int experts, int maxTokens, ncclMoeDtype_t dtype) {
  Shape s;
  s.hidden = hidden;
  s.topK = topK;
  s.experts = experts;
  s.maxTokens = maxTokens;
  s.dtype = dtype;
  return s;
}

RunOpts opts(bool weighted) {
  RunOpts o;
  o.combineWeighted = weighted;
  return o;
}

TEST_F(HtDispatch, RandomBf16H7168K8E32Weighted) {
  runScenario(shape(7168, 8, 32, 512, ncclMoeBf16), spec(101), opts(true));
}

TEST_F(HtDispatch, RandomBf16H2048K8E256Unweighted) {
  runScenario(shape(2048, 8, 256, 512, ncclMoeBf16), spec(102), opts(false));
}

TEST_F(HtDispatch, RandomBf16TopK1) {
  runScenario(shape(2048, 1, 32, 512, ncclMoeBf16), spec(103), opts(true));
}

TEST_F(HtDispatch, RandomBf16NoDispatchWeights) {
  RunOpts o = opts(false);
  o.dispatchWeights = false;
  runScenario(shape(2048, 8, 32, 512, ncclMoeBf16), spec(104), o);
}

TEST_F(HtDispatch, RandomFp8H7168K8E32Weighted) {
  runScenario(shape(7168, 8, 32, 512, ncclMoeFp8E4m3), spec(111), opts(true));
}

TEST_F(HtDispatch, RandomFp8H2048K8E256Unweighted) {
  runScenario(shape(2048, 8, 256, 512, ncclMoeFp8E4m3), spec(112), opts(false));
}

TEST_F(HtDispatch, SkewedOneExpertBf16) {
  runScenario(shape(7168, 8, 32, 512, ncclMoeBf16), spec(121, Route::OneExpert), opts(true));
}

TEST_F(HtDispatch, SkewedOneExpertFp8) {
  runScenario(shape(2048, 8, 32, 512, ncclMoeFp8E4m3), spec(122, Route::OneExpert), opts(true));
}

TEST_F(HtDispatch, SkewedRankZeroExpertsBf16) {
  runScenario(shape(7168, 8, 256, 512, ncclMoeBf16), spec(123, Route::RankZeroOnly), opts(true));
}

TEST_F(HtDispatch, ZeroTokensOnRank1) {
  GenSpec g = spec(131);
  g.zeroTokenRank = 1;
  runScenario(shape(7168, 8, 32, 512, ncclMoeBf16), g, opts(true));
}

TEST_F(HtDispatch, ZeroTokensOnRank1Fp8) {
  GenSpec g = spec(132);
  g.zeroTokenRank = 1;
  runScenario(shape(2048, 8, 32, 512, ncclMoeFp8E4m3), g, opts(false));
}

TEST_F(HtDispatch, ZeroTokensEverywhere) {
  GenSpec g = spec(133);
  g.numTokens = 0;
  runScenario(shape(2048, 8, 32, 512, ncclMoeBf16), g, opts(true));
}

TEST_F(HtDispatch, OneTokenPerRank) {
  runScenario(shape(7168, 8, 32, 1, ncclMoeBf16), spec(134), opts(true));
}

TEST_F(HtDispatch, OneTokenPerRankAllDropped) {
  GenSpec g = spec(135);
  g.dropProb = 1.0;  // every entry -1: nothing is sent, combine returns zeros
  runScenario(shape(2048, 8, 32, 1, ncclMoeBf16), g, opts(true));
}

TEST_F(HtDispatch, HostCountsBf16) {
  RunOpts o = opts(true);
  o.flags = NCCL_MOE_DISPATCH_HOST_COUNTS;
  runScenario(shape(7168, 8, 32, 512, ncclMoeBf16), spec(141), o);
}

TEST_F(HtDispatch, HostCountsFp8Skewed) {
  RunOpts o = opts(false);
  o.flags = NCCL_MOE_DISPATCH_HOST_COUNTS;
  runScenario(shape(2048, 8, 256, 512, ncclMoeFp8E4m3), spec(142, Route::RankZeroOnly), o);
}

}  // namespace
}  // namespace moe_gpu
