// Reliability of the high-throughput path (issue 10), one test per property:
//  - an overflowed dispatch leaves 0 rows in its counts, and a combine enqueued behind it (before
//    the host could see the error) reads nothing and returns zeros; the error is then reported;
//  - ranks may pass their expert outputs from different places (out.x, out.combineInput, other
//    memory): every rank reads each peer's rows where that peer put them;
//  - a bad expert id on one rank only is a local error: the operation completes on every rank,
//    that rank's ncclMoeCheckErrors reports it once, no peer waits or fails;
//  - after a timeout every call fails at once, and destroy + create gives a working context.
#include <string.h>
#include <unistd.h>

#include <chrono>
#include <memory>

#include "gpu_env.h"

namespace moe_gpu {
namespace {

class HtReliability : public GpuTest {};

using Clock = std::chrono::steady_clock;
double secondsSince(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Holds `stream` on the host for `ms` so that the calls enqueued behind it return before any of
// their kernels runs (the host checks of those calls see no kernel error yet).
void CUDART_CB sleepOnStream(void* ms) { usleep(1000 * (useconds_t)(uintptr_t)ms); }
bool gateStream(int ms) {
  return CUDA_OK(cudaLaunchHostFunc(stream(), sleepOnStream, (void*)(uintptr_t)ms));
}

// Capacity = maxTokens rows; every token of every rank to expert 0 gives rank 0 R * maxTokens.
TEST_F(HtReliability, OverflowThenCombineReadsNothing) {
  const int M = 64;
  const Shape s = capacityShape(M, M);
  Ep ep(s);
  if (!ep.create()) return;
  const int me = rank(), L = s.numExperts() / nRanks();
  {  // a dispatch that fits (one token per rank) reveals the output pointers
    Problem p = makeProblem(s, spec(801, Route::Random, 1));
    Reference ref = makeReference(p);
    DeviceInputs in;
    MOE_AGREE_OR_RETURN(in.upload(p), "upload inputs");
    if (!runAndCheck(ep, in, p, ref, RunOpts(), "overflow test [fitting dispatch]")) return;
  }
  Problem q = makeProblem(s, spec(802, Route::OneExpert, M));
  DeviceInputs in;
  const ncclMoeDispatchOutput_t prev = ep.lastOut;
  DevMem expert((size_t)s.capacity() * s.hidden * 2), combOut((size_t)M * s.hidden * 2);
  std::vector<uint16_t> ones((size_t)s.capacity() * s.hidden, 0x3f80);  // 1.0 in BF16
  bool ok = in.upload(q) && poisonDispatchOutput(prev, s) && poison(combOut.get(), combOut.bytes());
  ok = ok && poison(prev.combineInput, (size_t)s.capacity() * s.hidden * 2);
  ok = ok && upload(expert.get(), ones.data(), ones.size() * 2);
  MOE_AGREE_OR_RETURN(ok, "overflowing inputs and poison");

  ncclMoeDispatchOutput_t out;
  ok = gateStream(300);
  ok = ok && MOE_OK(ncclMoeDispatch(ep.comm, in.x.get(), nullptr, in.topkIdx.as<int64_t>(),
                                    in.weights.as<float>(), M, 0, &ep.handle, &out, stream()));
  // Enqueued behind the overflowing dispatch before it ran: the copy path and the combine.
  ok = ok && MOE_OK(ncclMoeCombine(ep.comm, ep.handle, expert.get(), in.weights.as<float>(),
                                   combOut.get(), stream()));
  ok = CUDA_OK(cudaStreamSynchronize(stream())) && ok;
  MOE_AGREE_OR_RETURN(ok, "overflowing dispatch + combine enqueued");

  std::vector<int> counts(1 + L, -1);
  ok = download(counts.data(), out.numRecvTokens, sizeof(int)) &&
       download(counts.data() + 1, out.expertCounts, sizeof(int) * L);
  long bad = 0;
  for (int j = 0; j <= L; j++) bad += counts[j] != 0;
  EXPECT_EQ(bad, 0) << "rank " << me << ": counts after an overflow: numRecvTokens "
                    << counts[0] << " (must advertise 0 rows)";
  std::vector<uint16_t> got((size_t)M * s.hidden, 0xffff);
  ok = download(got.data(), combOut.get(), got.size() * 2) && ok;
  long nonZero = 0;
  for (uint16_t v : got) nonZero += v != 0;
  EXPECT_EQ(nonZero, 0) << "rank " << me << ": combine behind an overflow read rows";
  bad += nonZero;
  bad += countUnpoisoned(prev.combineInput, (size_t)s.capacity() * s.hidden * 2,
                         "combineInput written by the copy behind an overflow");
  bad += countUnpoisoned(prev.x, (size_t)s.capacity() * s.rowBytes(), "x written by an overflow");
  agreeMismatches(bad, "overflow then combine");
  const ncclResult_t r = ncclMoeCheckErrors(ep.comm);
  const std::string msg = ncclMoeGetLastError();
  EXPECT_EQ(r, ncclInvalidUsage) << "rank " << me << ": overflow not reported: " << msg;
  EXPECT_NE(msg.find("outputCapacity"), std::string::npos) << "rank " << me << ": " << msg;
  MOE_AGREE_OR_RETURN(ok, "downloads");
}

// Expert = 2 * x (exact in BF16), written where each rank chooses; peers' other regions poisoned.
TEST_F(HtReliability, RanksChooseDifferentExpertOutputRegions) {
  Shape s = capacityShape(256, 0);
  s.hidden = 4096;
  Ep ep(s);
  if (!ep.create()) return;
  const int me = rank();
  const ExpertSrc kinds[3] = {ExpertSrc::DispatchX, ExpertSrc::CombineInput, ExpertSrc::Copy};
  const char* names[3] = {"out.x", "out.combineInput", "external memory"};
  DeviceInputs in;
  DevMem external((size_t)s.capacity() * s.hidden * 2), combOut((size_t)s.maxTokens * s.hidden * 2);
  for (int round = 0; round < 3; round++) {
    Problem p = makeProblem(s, spec(811 + round));
    Reference ref = makeReference(p);
    for (std::vector<uint16_t>& rows : ref.expertOut)
      for (uint16_t& v : rows) v = moe_ref::floatToBf16(2.0f * moe_ref::bf16ToFloat(v));
    const ExpertSrc mine = kinds[(me + round) % 3];
    const std::string tag = std::string("round ") + std::to_string(round) + ", rank " +
                            std::to_string(me) + " passes " + names[(me + round) % 3];
    bool ok = in.upload(p) && poison(combOut.get(), combOut.bytes());
    if (ep.haveOut) ok = ok && poisonDispatchOutput(ep.lastOut, s);
    MOE_AGREE_OR_RETURN(ok, (tag + ": inputs").c_str());
    ncclMoeDispatchOutput_t out;
    ok = MOE_OK(ncclMoeDispatch(ep.comm, in.x.get(), nullptr, in.topkIdx.as<int64_t>(),
                                in.weights.as<float>(), p.tokens(me), 0, &ep.handle, &out, stream()));
    ok = CUDA_OK(cudaStreamSynchronize(stream())) && ok;
    MOE_AGREE_OR_RETURN(ok, (tag + ": dispatch").c_str());
    ep.lastOut = out;
    ep.haveOut = true;
    agreeMismatches(checkDispatch(out, p, ref.recv[me], DispatchChecks(), tag.c_str()),
                    (tag + ": dispatch output").c_str());
    // The expert output where this rank chose; the window region it did not choose keeps
    // something else (x keeps the dispatched rows, combineInput is poisoned).
    const std::vector<uint16_t>& host = ref.expertOut[me];
    void* dst = mine == ExpertSrc::DispatchX ? out.x
              : mine == ExpertSrc::CombineInput ? out.combineInput : external.get();
    ok = poison(out.combineInput, (size_t)s.capacity() * s.hidden * 2);
    ok = ok && upload(dst, host.data(), host.size() * 2);
    MOE_AGREE_OR_RETURN(ok, (tag + ": expert output").c_str());
    ok = MOE_OK(ncclMoeCombine(ep.comm, ep.handle, dst, in.weights.as<float>(), combOut.get(),
                               stream()));
    ok = CUDA_OK(cudaStreamSynchronize(stream())) && ok;
    MOE_AGREE_OR_RETURN(ok, (tag + ": combine").c_str());
    agreeMismatches(checkCombine(combOut.get(), referenceCombine(p, ref, true), p.tokens(me),
                                 s.hidden, tag.c_str()),
                    (tag + ": combine output").c_str());
  }
  MOE_AGREE_OR_RETURN(MOE_OK(ncclMoeCheckErrors(ep.comm)), "ncclMoeCheckErrors");
}

// The last rank names expert E (out of range) in its first token; every rank then dispatches
// and combines without a host check in between, twice.
TEST_F(HtReliability, BadExpertIdOnOneRankIsLocal) {
  const Shape s = capacityShape(64, 0);
  Ep ep(s);
  if (!ep.create()) return;
  const int me = rank(), bad = nRanks() - 1;
  const Clock::time_point t0 = Clock::now();
  for (int round = 0; round < 2; round++) {
    Problem p = makeProblem(s, spec(821 + round));
    if (round == 0 && p.routing[bad].numTokens > 0) p.routing[bad].topkIdx[0] = s.numExperts();
    Reference ref = makeReference(p);  // ignores ids outside [0, E), as the entry is dropped
    DeviceInputs in;
    MOE_AGREE_OR_RETURN(in.upload(p), "upload inputs");
    const std::string tag = std::string("bad id on rank ") + std::to_string(bad) + ", round " +
                            std::to_string(round);
    if (ep.haveOut) MOE_AGREE_OR_RETURN(poisonDispatchOutput(ep.lastOut, s), "poison");
    ncclMoeDispatchOutput_t out;
    DevMem combOut((size_t)s.maxTokens * s.hidden * 2);
    bool ok = MOE_OK(ncclMoeDispatch(ep.comm, in.x.get(), nullptr, in.topkIdx.as<int64_t>(),
                                     in.weights.as<float>(), p.tokens(me), 0, &ep.handle, &out,
                                     stream()));
    ok = ok && MOE_OK(ncclMoeCombine(ep.comm, ep.handle, out.x, in.weights.as<float>(),
                                     combOut.get(), stream()));
    ok = CUDA_OK(cudaStreamSynchronize(stream())) && ok;
    MOE_AGREE_OR_RETURN(ok, (tag + ": dispatch + combine").c_str());
    ep.lastOut = out;
    ep.haveOut = true;
    agreeMismatches(checkDispatch(out, p, ref.recv[me], DispatchChecks(), tag.c_str()),
                    (tag + ": dispatch output").c_str());
    agreeMismatches(checkCombine(combOut.get(), referenceCombine(p, ref, true), p.tokens(me),
                                 s.hidden, tag.c_str()),
                    (tag + ": combine output").c_str());
    const ncclResult_t r = ncclMoeCheckErrors(ep.comm);
    const std::string msg = ncclMoeGetLastError();
    if (me == bad && round == 0) {
      EXPECT_EQ(r, ncclInvalidArgument) << "rank " << me << ": bad id not reported: " << msg;
      EXPECT_NE(msg.find("topkIdx[0][0]"), std::string::npos) << "rank " << me << ": " << msg;
      EXPECT_EQ(ncclMoeCheckErrors(ep.comm), ncclSuccess)
          << "rank " << me << ": a local error must be reported once: " << ncclMoeGetLastError();
    } else {
      EXPECT_EQ(r, ncclSuccess) << "rank " << me << ": " << tag << ": " << msg;
    }
  }
  const double took = secondsSince(t0);
  EXPECT_LT(took, s.timeoutMs / 2000.0) << "rank " << me << ": a peer waited (" << took << " s)";
}

// Rank 0 skips a dispatch: the others time out; later calls fail at once; destroy + create works.
TEST_F(HtReliability, TimeoutThenDestroyAndCreateAgain) {
  Shape s = capacityShape(64, 0);
  s.timeoutMs = 2000;
  const int me = rank();
  {
    Ep ep(s);
    if (!ep.create()) return;
    Problem p = makeProblem(s, spec(831));
    DeviceInputs in;
    MOE_AGREE_OR_RETURN(in.upload(p), "upload inputs");
    ncclMoeDispatchOutput_t out;
    bool ok = true;
    if (me != 0) {
      const Clock::time_point t0 = Clock::now();
      ok = MOE_OK(ncclMoeDispatch(ep.comm, in.x.get(), nullptr, in.topkIdx.as<int64_t>(), nullptr,
                                  p.tokens(me), 0, &ep.handle, &out, stream()));
      ok = CUDA_OK(cudaStreamSynchronize(stream())) && ok;
      const double waited = secondsSince(t0);
      const ncclResult_t r = ncclMoeCheckErrors(ep.comm);
      const std::string msg = ncclMoeGetLastError();
      EXPECT_EQ(r, ncclSystemError) << "rank " << me << ": " << msg;
      EXPECT_NE(msg.find("timeout"), std::string::npos) << "rank " << me << ": " << msg;
      EXPECT_GE(waited, 1.5) << "rank " << me;
      EXPECT_LT(waited, 6.0) << "rank " << me << ": far longer than timeoutMs";
      // Every later call fails at once with the same error, without waiting on a peer.
      const Clock::time_point t1 = Clock::now();
      const ncclResult_t again = ncclMoeDispatch(ep.comm, in.x.get(), nullptr,
                                                 in.topkIdx.as<int64_t>(), nullptr, p.tokens(me),
                                                 0, &ep.handle, &out, stream());
      EXPECT_EQ(again, ncclSystemError) << "rank " << me << ": call after a timeout: "
                                        << ncclMoeGetLastError();
      ok = CUDA_OK(cudaStreamSynchronize(stream())) && ok;
      EXPECT_LT(secondsSince(t1), 0.5) << "rank " << me << ": a call after a timeout waited";
    }
    MOE_AGREE_OR_RETURN(ok, "dispatch without rank 0");
    ep.destroyHandle();
    const bool destroyed = MOE_OK(ncclMoeCommDestroy(ep.comm));
    ep.comm = nullptr;
    MOE_AGREE_OR_RETURN(destroyed, "ncclMoeCommDestroy after a timeout");
  }
  s.timeoutMs = 10000;
  runScenario(s, spec(832), RunOpts());
}

}  // namespace
}  // namespace moe_gpu
