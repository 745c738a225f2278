// High-throughput combine: the three places the expert output can come from (out.x zero-copy,
// out.combineInput zero-copy, a separate buffer that the library copies), the cached dispatch
// that reuses a handle's routing (topkIdx = NULL, the backward pass), and SM budgets.
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

}  // namespace
}  // namespace moe_gpu
