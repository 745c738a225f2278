// Issue 12 item 4: the low-latency failed-rank set (nccl_moe.h, "Low-latency fault tolerance").
//  - Marked: the last rank is put into the set by every other rank, and it puts every other rank
//    into its own; then rounds of dispatch + combine (one-shot and split, BF16 and FP8) must
//    equal the CPU reference of the same inputs with every entry naming an expert of a failed
//    rank dropped and failed sources sending nothing, and must not wait for anyone.
//  - Timeout: the last rank skips one dispatch; every other rank's dispatch times out on it,
//    ncclMoeCheckErrors reports ncclRemoteError once, naming it, and ncclMoeGetFailedRanks shows
//    it; the last rank marks the others; then every rank runs exact operations without waiting.
//  - Validation: bad ranks, self, a wrong count, a high-throughput context.
// At 2 ranks every rank ends up alone; at 4 the first three keep communicating.
#include <chrono>
#include <string>
#include <vector>

#include "ll_test_util.h"

namespace moe_gpu {
namespace {

using Clock = std::chrono::steady_clock;
double secondsSince(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

class LlFailedRanks : public GpuTest {};

// The set each rank holds in these tests: the last rank on ranks 0..R-2; all the others on it.
bool failedFor(int me, int r) {
  const int last = nRanks() - 1;
  if (r == me) return false;
  return me == last || r == last;
}

// What rank `me` must receive and combine once its set is failedFor(me, .): sources in the set
// send nothing, and entries naming an expert of a rank in the set are dropped.
LlProblem maskedProblem(const LlProblem& p, int me) {
  LlProblem q = p;
  const int R = nRanks(), L = p.shape.numExperts() / R;
  for (int s = 0; s < R; s++) {
    moe_ref::Routing& rt = q.routing[s];
    if (failedFor(me, s)) {
      rt.numTokens = 0;
      rt.topkIdx.clear();
      rt.topkWeights.clear();
      continue;
    }
    for (size_t i = 0; i < rt.topkIdx.size(); i++)
      if (rt.topkIdx[i] >= 0 && failedFor(me, (int)(rt.topkIdx[i] / L))) rt.topkIdx[i] = -1;
  }
  return q;
}

bool markAll(LlEp& ep) {
  bool ok = true;
  for (int r = 0; r < nRanks(); r++)
    if (failedFor(rank(), r)) ok = MOE_OK(ncclMoeMarkRankFailed(ep.comm, r)) && ok;
  return ok;
}

// ncclMoeGetFailedRanks equals failedFor(me, .).
void expectSet(LlEp& ep, const char* when) {
  std::vector<int> failed(nRanks(), -1);
  if (!MOE_OK(ncclMoeGetFailedRanks(ep.comm, failed.data(), nRanks()))) return;
  for (int r = 0; r < nRanks(); r++)
    EXPECT_EQ(failed[r], failedFor(rank(), r) ? 1 : 0) << "rank " << rank() << ", " << when << ": failed[" << r << "]";
}

// Rounds of masked operations: exact against maskedProblem, and quick (no wait for a timeout).
void maskedRounds(LlEp& ep, LlInputs& in, const LlShape& s, uint64_t seed, int rounds, bool split) {
  for (int round = 0; round < rounds; round++) {
    LlProblem p = makeLlProblem(s, spec(seed + 1000003ull * round));
    if (!allRanksOk(in.upload(p), "upload inputs")) return;  // the unmasked routing goes in
    LlRunOpts o;
    o.split = split;
    o.weighted = round % 2 == 0;
    o.src = round % 2 == 0 ? LlExpertSrc::CombineInput : LlExpertSrc::Separate;
    const std::string tag = s.str() + (split ? " split" : " one-shot") + " masked [round " +
                            std::to_string(round + 1) + "]";
    const Clock::time_point t0 = Clock::now();
    if (!llRunAndCheck(ep, in, maskedProblem(p, rank()), o, tag)) return;
    EXPECT_LT(secondsSince(t0), s.timeoutMs / 2000.0) << "rank " << rank() << ", " << tag << ": waited for a peer";
  }
}

void markedScenario(LlShape s, uint64_t seed, bool split) {
  s.timeoutMs = 4000;
  LlEp ep(s);
  if (!ep.create()) return;
  MOE_AGREE_OR_RETURN(markAll(ep), "ncclMoeMarkRankFailed");
  expectSet(ep, "after marking");
  LlInputs in;
  maskedRounds(ep, in, s, seed, 4, split);
  expectSet(ep, "after the rounds");
}

TEST_F(LlFailedRanks, MarkedBf16OneShot) { markedScenario(LlShape(), 1601, false); }

TEST_F(LlFailedRanks, MarkedFp8Ue8m0Split) {
  LlShape s;
  s.fp8 = true;
  s.fmt = ncclMoeScaleUe8m0;
  markedScenario(s, 1602, true);
}

TEST_F(LlFailedRanks, TimeoutPutsTheRankInTheSetAndTheOthersGoOn) {
  LlShape s;
  s.timeoutMs = 2000;
  const int me = rank(), last = nRanks() - 1;
  LlEp ep(s);
  if (!ep.create()) return;
  LlInputs in;
  {  // every rank takes part: exact, nothing failed
    LlProblem p = makeLlProblem(s, spec(1611));
    MOE_AGREE_OR_RETURN(in.upload(p), "upload inputs");
    if (!llRunAndCheck(ep, in, p, LlRunOpts(), "all ranks")) return;
  }
  bool ok = true;
  if (me != last) {  // the last rank skips this dispatch
    LlProblem p = makeLlProblem(s, spec(1612));
    ok = in.upload(p);
    ncclMoeLowLatencyOutput_t out;
    const Clock::time_point t0 = Clock::now();
    ok = ok && runLlDispatch(ep, in, p.tokens(me), true, false, &out);
    ok = CUDA_OK(cudaStreamSynchronize(stream())) && ok;
    ep.record(out, "dispatch without the last rank");  // its slot is used; its outputs are undefined
    const double waited = secondsSince(t0);
    const ncclResult_t r = ncclMoeCheckErrors(ep.comm);
    const std::string msg = ncclMoeGetLastError();
    EXPECT_EQ(r, ncclRemoteError) << "rank " << me << ": " << msg;
    EXPECT_NE(msg.find("rank " + std::to_string(last) + " did not take part"), std::string::npos)
        << "rank " << me << ": " << msg;
    EXPECT_NE(msg.find("failed-rank set"), std::string::npos) << "rank " << me << ": " << msg;
    EXPECT_GE(waited, 1.5) << "rank " << me << ": gave up before timeoutMs";
    EXPECT_LT(waited, 8.0) << "rank " << me << ": far longer than timeoutMs";
    EXPECT_EQ(ncclMoeCheckErrors(ep.comm), ncclSuccess) << "rank " << me << ": reported twice: "
                                                        << ncclMoeGetLastError();
    expectSet(ep, "after the timeout");
    if (me == 0) {
      printf("[   INFO   ] rank 0: dispatch without rank %d: %.2f s, check -> %d \"%s\"\n", last, waited, int(r),
             msg.c_str());
      fflush(stdout);
    }
  } else {
    ok = markAll(ep);  // as a framework would, once it learns that the others gave up on it
  }
  MOE_AGREE_OR_RETURN(ok, "dispatch without the last rank");
  maskedRounds(ep, in, s, 1613, 3, false);
  maskedRounds(ep, in, s, 1614, 2, true);
  expectSet(ep, "at the end");
}

TEST_F(LlFailedRanks, BadArgumentsRejected) {
  const int me = rank(), R = nRanks();
  {
    LlEp ep{LlShape()};
    if (!ep.create()) return;
    std::vector<int> failed(R + 1, 0);
    // `got` is evaluated before the body reads the thread's last error.
    auto expectBad = [&](ncclResult_t got, const char* word, const char* what) {
      const std::string msg = ncclMoeGetLastError();
      EXPECT_EQ(got, ncclInvalidArgument) << "rank " << me << ", " << what << ": " << msg;
      EXPECT_NE(msg.find(word), std::string::npos) << "rank " << me << ", " << what << ": \"" << msg << "\"";
    };
    expectBad(ncclMoeMarkRankFailed(ep.comm, -1), "rank = -1", "negative rank");
    expectBad(ncclMoeMarkRankFailed(ep.comm, R), "not a rank", "rank R");
    expectBad(ncclMoeMarkRankFailed(ep.comm, me), "itself", "own rank");
    expectBad(ncclMoeGetFailedRanks(ep.comm, nullptr, R), "failed is NULL", "NULL output");
    expectBad(ncclMoeGetFailedRanks(ep.comm, failed.data(), R + 1), "count", "count R + 1");
    std::vector<int> none(R, -1);
    EXPECT_TRUE(MOE_OK(ncclMoeGetFailedRanks(ep.comm, none.data(), R)));
    for (int r = 0; r < R; r++) EXPECT_EQ(none[r], 0) << "rank " << me << ": a rejected call marked rank " << r;
    LlInputs in;
    LlProblem p = makeLlProblem(ep.shape, spec(1621));
    MOE_AGREE_OR_RETURN(in.upload(p), "upload inputs");
    llRunAndCheck(ep, in, p, LlRunOpts(), "after rejected calls");
  }
  // Across nodes a high-throughput context cannot be created (GpuCreateFailure.HighThroughput*).
  if (moe_ranks::fakeNodes() > 1) return;
  Shape hs = smallShape();
  Ep hep(hs);
  if (!hep.create()) return;
  std::vector<int> failed(R, 0);
  EXPECT_EQ(ncclMoeMarkRankFailed(hep.comm, (me + 1) % R), ncclInvalidUsage) << ncclMoeGetLastError();
  EXPECT_NE(std::string(ncclMoeGetLastError()).find("low-latency"), std::string::npos) << ncclMoeGetLastError();
  EXPECT_EQ(ncclMoeGetFailedRanks(hep.comm, failed.data(), R), ncclInvalidUsage) << ncclMoeGetLastError();
}

}  // namespace
}  // namespace moe_gpu
