// Reliability of the low-latency path (issue 10): a bad expert id on one rank only is a local
// error. The last rank names expert E (out of range) for its first token; every rank dispatches
// and combines with no host check in between, twice (split the second time): the operation
// completes on every rank with the entry dropped (the reference ignores ids outside [0, E) the
// same way), that rank's ncclMoeCheckErrors reports the id once, and no peer waits or fails.
#include <chrono>
#include <string>

#include "ll_test_util.h"

namespace moe_gpu {
namespace {

class LlReliability : public GpuTest {};

TEST_F(LlReliability, BadExpertIdOnOneRankIsLocal) {
  using Clock = std::chrono::steady_clock;
  LlShape s;
  s.timeoutMs = 5000;
  LlEp ep(s);
  if (!ep.create()) return;
  const int me = rank(), bad = nRanks() - 1;
  const Clock::time_point t0 = Clock::now();
  LlInputs in;
  for (int round = 0; round < 2; round++) {
    LlProblem p = makeLlProblem(s, spec(1701 + round));
    if (p.routing[bad].numTokens > 0) p.routing[bad].topkIdx[0] = s.numExperts();
    const std::string tag = "LL bad id on rank " + std::to_string(bad) + ", round " + std::to_string(round);
    bool ok = in.upload(p) && ep.poisonNextSlot();
    MOE_AGREE_OR_RETURN(ok, (tag + ": inputs").c_str());
    ncclMoeLowLatencyOutput_t out;
    ok = runLlDispatch(ep, in, p.tokens(me), true, round == 1, &out);
    ok = CUDA_OK(cudaStreamSynchronize(stream())) && ok;
    MOE_AGREE_OR_RETURN(ok, (tag + ": dispatch").c_str());
    ep.record(out, tag.c_str());
    LlBlocks blocks;
    agreeMismatches(checkLlDispatch(out, p, llReference(p), tag.c_str(), false, &blocks),
                    (tag + ": dispatch output").c_str());
    DevMem combOut((size_t)s.maxTokens * s.hidden * 2);
    ok = combOut.get() && writeIdentityExpert(out.combineInput, s, blocks) &&
         poison(combOut.get(), combOut.bytes());
    MOE_AGREE_OR_RETURN(ok, (tag + ": expert output").c_str());
    ok = runLlCombine(ep, out, out.combineInput, combOut.get(), round == 1);
    ok = CUDA_OK(cudaStreamSynchronize(stream())) && ok;
    MOE_AGREE_OR_RETURN(ok, (tag + ": combine").c_str());
    agreeMismatches(checkCombine(combOut.get(), llIdentityCombine(p, true), p.tokens(me), s.hidden,
                                 tag.c_str()),
                    (tag + ": combine output").c_str());
    const ncclResult_t r = ncclMoeCheckErrors(ep.comm);
    const std::string msg = ncclMoeGetLastError();
    if (me == bad && p.tokens(me) > 0) {
      EXPECT_EQ(r, ncclInvalidArgument) << tag << ": bad id not reported: " << msg;
      EXPECT_NE(msg.find("topkIdx[0][0]"), std::string::npos) << tag << ": " << msg;
      EXPECT_EQ(ncclMoeCheckErrors(ep.comm), ncclSuccess)
          << tag << ": a local error must be reported once: " << ncclMoeGetLastError();
    } else {
      EXPECT_EQ(r, ncclSuccess) << tag << ": rank " << me << ": " << msg;
    }
  }
  const double took = std::chrono::duration<double>(Clock::now() - t0).count();
  EXPECT_LT(took, s.timeoutMs / 2000.0) << "rank " << me << ": a peer waited (" << took << " s)";
}

}  // namespace
}  // namespace moe_gpu
