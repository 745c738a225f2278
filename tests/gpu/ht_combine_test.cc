// High-throughput combine: the three places the expert output can come from (out.x zero-copy,
// out.combineInput zero-copy, a separate buffer that the library copies), the cached dispatch
// that reuses a handle's routing (topkIdx = NULL, the backward pass), and SM budgets; the pair
// path (two ranks or fewer) at small and uneven row sizes with 0, 1 and empty dispatches, with
// and without ncclMoeCombineWithWeights.
#include <string.h>
#include <unistd.h>

#include <memory>

#include "gpu_env.h"

namespace moe_gpu {
namespace {

class HtCombine : public GpuTest {};

RunOpts from(ExpertSrc src, bool weighted) {
  RunOpts o;
  o.src = src;
  o.combineWeighted = weighted;
  return o;
}

TEST_F(HtCombine, ZeroCopyDispatchXWeighted) {
  runScenario(htShape(7168, 32, ncclMoeBf16), spec(201), from(ExpertSrc::DispatchX, true));
}

TEST_F(HtCombine, ZeroCopyDispatchXUnweighted) {
  runScenario(htShape(7168, 256, ncclMoeBf16), spec(202), from(ExpertSrc::DispatchX, false));
}

TEST_F(HtCombine, CombineInputBf16Weighted) {
  runScenario(htShape(7168, 32, ncclMoeBf16), spec(203), from(ExpertSrc::CombineInput, true));
}

TEST_F(HtCombine, CopyPathBf16Weighted) {
  runScenario(htShape(7168, 32, ncclMoeBf16), spec(204), from(ExpertSrc::Copy, true));
}

TEST_F(HtCombine, CopyPathBf16Unweighted) {
  runScenario(htShape(2048, 256, ncclMoeBf16), spec(205), from(ExpertSrc::Copy, false));
}

TEST_F(HtCombine, CopyPathFp8Weighted) {
  runScenario(htShape(2048, 32, ncclMoeFp8E4m3), spec(206), from(ExpertSrc::Copy, true));
}

// Dispatch with routing, then twice with other data and topkIdx = NULL (the handle's routing;
// the device topkIdx buffer then holds invalid ids, so reading it would show), combining after
// every dispatch.
void cachedScenario(const Shape& s, uint64_t seed, ExpertSrc src) {
  Ep ep(s);
  if (!ep.create()) return;
  Problem p = makeProblem(s, spec(seed));
  DeviceInputs in;
  MOE_AGREE_OR_RETURN(in.upload(p), "upload inputs");
  {
    Reference ref = makeReference(p);
    RunOpts o = from(src, true);
    if (!runAndCheck(ep, in, p, ref, o, (s.str() + " [dispatch with routing]").c_str())) return;
  }
  const int me = rank();
  const size_t idxCount = (size_t)p.tokens(me) * s.topK;
  std::vector<int64_t> invalid(idxCount, (int64_t)s.numExperts() + 5);
  for (int round = 0; round < 2; round++) {
    regenerateX(p, seed + 17 + round);
    Reference ref = makeReference(p);
    bool ok = in.upload(p);
    ok = ok && upload(in.topkIdx.get(), invalid.data(), idxCount * sizeof(int64_t));
    MOE_AGREE_OR_RETURN(ok, "upload new data");
    RunOpts o = from(src, round == 0);
    o.reuseRouting = true;
    o.dispatchWeights = false;
    std::string tag = s.str() + " [cached dispatch " + std::to_string(round + 1) +
                      ", topkIdx NULL]";
    if (!runAndCheck(ep, in, p, ref, o, tag.c_str())) return;
  }
}

TEST_F(HtCombine, CachedDispatchBf16) {
  cachedScenario(htShape(7168, 32, ncclMoeBf16), 211, ExpertSrc::DispatchX);
}

TEST_F(HtCombine, CachedDispatchBf16CopyPath) {
  cachedScenario(htShape(2048, 256, ncclMoeBf16), 212, ExpertSrc::Copy);
}

TEST_F(HtCombine, CachedDispatchFp8) {
  cachedScenario(htShape(7168, 32, ncclMoeFp8E4m3), 213, ExpertSrc::CombineInput);
}

// Four dispatch + combine pairs (new routing and data each time, one handle, zero-copy combine
// from out.x) enqueued back to back with no host synchronisation in between, the ranks skewed
// by a few milliseconds of host sleep: the library alone must keep a peer's next dispatch from
// overwriting rows that this rank's combine still reads. Every combine output is checked.
TEST_F(HtCombine, BackToBackWithoutHostSync) {
  const Shape s = htShape(7168, 32, ncclMoeBf16);
  Ep ep(s);
  if (!ep.create()) return;
  const int me = rank(), kIters = 4;
  std::vector<Problem> probs;
  std::vector<std::unique_ptr<DeviceInputs>> ins;
  std::vector<std::unique_ptr<DevMem>> outs;
  bool ok = true;
  for (int i = 0; i < kIters; i++) {
    probs.push_back(makeProblem(s, spec(231 + i)));  // same T per rank for every seed
    ins.emplace_back(new DeviceInputs);
    ok = ins[i]->upload(probs[i]) && ok;
    outs.emplace_back(new DevMem((size_t)s.maxTokens * s.hidden * 2));
    ok = poison(outs[i]->get(), outs[i]->bytes()) && ok;
  }
  MOE_AGREE_OR_RETURN(ok, "upload inputs");
  ncclMoeDispatchOutput_t out;
  for (int i = 0; i < kIters && ok; i++) {
    usleep(2000 * ((me + i) % nRanks()));
    const int T = probs[i].tokens(me);
    ok = MOE_OK(ncclMoeDispatch(ep.comm, ins[i]->x.get(), nullptr, ins[i]->topkIdx.as<int64_t>(),
                                ins[i]->weights.as<float>(), T, 0, &ep.handle, &out, stream()));
    ok = ok && MOE_OK(ncclMoeCombine(ep.comm, ep.handle, out.x,
                                     i % 2 ? nullptr : ins[i]->weights.as<float>(),
                                     outs[i]->get(), stream()));
  }
  ok = CUDA_OK(cudaStreamSynchronize(stream())) && ok;
  MOE_AGREE_OR_RETURN(ok, "back-to-back dispatch + combine");
  ep.lastOut = out;
  ep.haveOut = true;
  for (int i = 0; i < kIters; i++) {
    const std::string tag = s.str() + " [back-to-back " + std::to_string(i + 1) + "]";
    Reference ref = makeReference(probs[i]);
    if (i == kIters - 1) {
      DispatchChecks dc;
      agreeMismatches(checkDispatch(out, probs[i], ref.recv[me], dc, tag.c_str()),
                      (tag + ": dispatch output").c_str());
    }
    std::vector<uint16_t> expected = referenceCombine(probs[i], ref, i % 2 == 0);
    agreeMismatches(checkCombine(outs[i]->get(), expected, probs[i].tokens(me), s.hidden,
                                 tag.c_str()),
                    (tag + ": combine output").c_str());
  }
  MOE_AGREE_OR_RETURN(MOE_OK(ncclMoeCheckErrors(ep.comm)), "ncclMoeCheckErrors");
}

// The same problem with 1, 8 and 24 SMs: each matches the reference, and the combine outputs
// are bitwise identical across budgets.
void smBudget(Shape base, uint64_t seed) {
  std::vector<uint16_t> first;
  const int budgets[] = {1, 8, 24};
  for (int i = 0; i < 3; i++) {
    Shape s = base;
    s.numSms = budgets[i];
    Ep ep(s);
    if (!ep.create()) return;
    Problem p = makeProblem(s, spec(seed));
    Reference ref = makeReference(p);
    DeviceInputs in;
    MOE_AGREE_OR_RETURN(in.upload(p), "upload inputs");
    std::vector<uint16_t> got;
    RunOpts o = from(ExpertSrc::DispatchX, true);
    o.combineResult = &got;
    if (!runAndCheck(ep, in, p, ref, o, s.str().c_str())) return;
    if (i == 0) {
      first = std::move(got);
      continue;
    }
    long bad = got.size() != first.size() ? 1 : 0;
    for (size_t j = 0; bad == 0 && j < got.size(); j++)
      if (got[j] != first[j])
        for (size_t k = j; k < got.size(); k++) bad += got[k] != first[k];
    EXPECT_EQ(bad, 0) << "rank " << rank() << ": combine with " << budgets[i]
                      << " SMs differs from 1 SM";
    agreeMismatches(bad, "combine across SM budgets");
  }
}

TEST_F(HtCombine, SmBudgetBf16) { smBudget(htShape(7168, 32, ncclMoeBf16), 221); }

TEST_F(HtCombine, SmBudgetFp8) { smBudget(htShape(2048, 256, ncclMoeFp8E4m3), 222); }

// --- the pair path (51be0c4; review_s7.md section 5, 3) -------------------------------------------
// With at most two ranks the pull combine reduces each token with reduceTokenPair: 8 vectors
// per lane from each rank in flight (blocks of 256 vectors), the next token's routing loaded
// behind the first block's loads. Row sizes around its blocks: H 8 and 16 (one or two vectors:
// lanes 1-31 or 2-31 idle), 248 (31 vectors), 256 (32), 2056 (a block of 256 vectors and one of
// 1). 3 SMs (48 warps) and up to 200 tokens give every warp several tokens, so the prefetched
// routing is used. Rounds on one context: full batches, no tokens anywhere, 1 token, an empty
// dispatch (every entry -1: no rows, zeros out), rank 0 empty with skewed routing, one expert
// per token; each combined from out.x / combineInput / a copy, weighted or not, and then again
// by ncclMoeCombineWithWeights (rows and per-row top-k values), all bitwise against moe_ref.
// On more ranks the same runs the general path (kPairs = false). The pull kernel is forced (an
// NCCL_MOE_HT_COMBINE=tma in the environment would bypass it).

// Per-row values of rank r, [rows][K] (as ht_training_test.cc: small multiples of 1/8).
std::vector<float> rowValues(int r, int rows, int K) {
  std::vector<float> v((size_t)rows * K);
  for (int i = 0; i < rows; i++)
    for (int k = 0; k < K; k++) v[(size_t)i * K + k] = (float)((r * 131 + i * 7 + k * 3) % 97) / 8.0f - 6.0f;
  return v;
}

long compareFloatsBitwise(const std::vector<float>& got, const std::vector<float>& want, const std::string& tag) {
  if (got.size() != want.size()) {
    ADD_FAILURE() << tag << ": rank " << rank() << ": " << got.size() << " values, expected " << want.size();
    return 1;
  }
  long bad = 0;
  for (size_t j = 0; j < got.size(); j++) {
    if (memcmp(&got[j], &want[j], sizeof(float)) == 0) continue;
    if (bad++ < 5)
      ADD_FAILURE() << tag << ": rank " << rank() << ": top-k value " << j << " = " << got[j] << ", expected "
                    << want[j];
  }
  return bad;
}

// ncclMoeCombineWithWeights on ep's handle (the last dispatch, of p): expert output and per-row
// values in caller memory; checks both outputs (poisoned first). Collective.
bool combineWithWeightsAndCheck(Ep& ep, const Problem& p, const Reference& ref, const DeviceInputs& in,
                                bool weighted, const std::string& tag) {
  const Shape& s = p.shape;
  const int me = rank(), R = nRanks(), K = s.topK, T = p.tokens(me);
  std::vector<std::vector<float>> values(R);
  for (int r = 0; r < R; r++) values[r] = rowValues(r, ref.recv[r].numRows, K);
  const std::vector<uint16_t>& host = ref.expertOut[me];
  DevMem rows(std::max<size_t>(16, host.size() * 2)), vals((size_t)std::max(1, ref.recv[me].numRows) * K * 4),
      outX((size_t)std::max(1, T) * s.hidden * 2), outVals((size_t)std::max(1, T) * K * 4);
  bool ok = rows.get() && vals.get() && outX.get() && outVals.get();
  ok = ok && upload(rows.get(), host.data(), host.size() * 2) &&
       upload(vals.get(), values[me].data(), values[me].size() * 4);
  ok = ok && poison(outX.get(), outX.bytes()) && poison(outVals.get(), outVals.bytes());
  if (!allRanksOk(ok, (tag + ": combine-with-weights inputs").c_str())) return false;
  ok = MOE_OK(ncclMoeCombineWithWeights(ep.comm, ep.handle, rows.get(), weighted ? in.weights.as<float>() : nullptr,
                                        vals.as<float>(), outVals.as<float>(), outX.get(), stream()));
  ok = CUDA_OK(cudaStreamSynchronize(stream())) && ok;
  if (!allRanksOk(ok, (tag + ": ncclMoeCombineWithWeights").c_str())) return false;
  agreeMismatches(checkCombine(outX.get(), referenceCombine(p, ref, weighted), T, s.hidden, tag.c_str()),
                  (tag + ": combine-with-weights rows").c_str());
  std::vector<float> got((size_t)T * K);
  download(got.data(), outVals.get(), got.size() * 4);
  agreeMismatches(compareFloatsBitwise(got, referenceTopkValues(p, values), tag),
                  (tag + ": combine-with-weights top-k values").c_str());
  return allRanksOk(MOE_OK(ncclMoeCheckErrors(ep.comm)), (tag + ": ncclMoeCheckErrors").c_str());
}

void pairPath(int hidden, ncclMoeDtype_t dtype, uint64_t seed) {
  Shape s = htShape(hidden, 32, dtype);
  s.maxTokens = 200;
  s.numSms = 3;
  Ep ep(s);
  {
    ScopedEnv env("NCCL_MOE_HT_COMBINE", "pull");
    if (!ep.create()) return;
  }
  struct Round {
    const char* what;
    GenSpec g;
    ExpertSrc src;
    bool weighted;
  };
  std::vector<Round> rounds = {
      {"full batches", spec(seed), ExpertSrc::DispatchX, true},
      {"no tokens anywhere", spec(seed + 1, Route::Random, 0), ExpertSrc::CombineInput, false},
      {"1 token", spec(seed + 2, Route::Random, 1), ExpertSrc::Copy, true},
      {"empty dispatch", spec(seed + 3), ExpertSrc::DispatchX, false},
      {"rank 0 empty, skewed", spec(seed + 4, Route::RankZeroOnly), ExpertSrc::CombineInput, true},
      {"one expert per token", spec(seed + 5, Route::OneExpert), ExpertSrc::Copy, false},
      {"1 token after full", spec(seed + 6, Route::Random, 1), ExpertSrc::DispatchX, false},
  };
  rounds[3].g.dropProb = 1.0;
  rounds[4].g.zeroTokenRank = 0;
  DeviceInputs in;
  for (size_t i = 0; i < rounds.size(); i++) {
    const Round& rd = rounds[i];
    Problem p = makeProblem(s, rd.g);
    Reference ref = makeReference(p);
    MOE_AGREE_OR_RETURN(in.upload(p), "upload inputs");
    RunOpts o = from(rd.src, rd.weighted);
    const std::string tag = s.str() + " [round " + std::to_string(i + 1) + ": " + rd.what +
                            (rd.weighted ? ", weighted]" : ", unweighted]");
    if (!runAndCheck(ep, in, p, ref, o, tag.c_str())) return;
    if (!combineWithWeightsAndCheck(ep, p, ref, in, !rd.weighted, tag + " with weights")) return;
  }
}

TEST_F(HtCombine, PairPathH8Bf16) { pairPath(8, ncclMoeBf16, 241); }

TEST_F(HtCombine, PairPathH16Bf16) { pairPath(16, ncclMoeBf16, 251); }

TEST_F(HtCombine, PairPathH248Bf16) { pairPath(248, ncclMoeBf16, 261); }

TEST_F(HtCombine, PairPathH256Bf16) { pairPath(256, ncclMoeBf16, 271); }

TEST_F(HtCombine, PairPathH2056Bf16) { pairPath(2056, ncclMoeBf16, 281); }

TEST_F(HtCombine, PairPathH256Fp8) { pairPath(256, ncclMoeFp8E4m3, 291); }

}  // namespace
}  // namespace moe_gpu
