// Sequence numbers of the device protocol (issue 10), with the NCCL_MOE_SEQ_START test hook
// (src/sequence_start.h), which starts a context as if it had run that many operations:
//  - LL: the dispatch signal carries the epoch modulo 2^32; operations across epoch 2^32 on
//    every slot, one-shot and split, give the reference results;
//  - HT: the 64-bit sequences and the per-CTA signal sums wrap; operations across 2^64 work;
//  - a peer ahead of this rank (its sequence started one operation later) is a protocol error
//    reported by every rank that sees it, never taken for the expected operation; the others
//    time out; destroy + create works afterwards.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <chrono>
#include <string>

#include "ll_test_util.h"

namespace moe_gpu {
namespace {

class SeqWrap : public GpuTest {};
class SeqProtocol : public GpuTest {};

// Sets NCCL_MOE_SEQ_START for the contexts created in its scope.
class SequenceStart {
 public:
  explicit SequenceStart(unsigned long long n) {
    char buf[32];
    snprintf(buf, sizeof(buf), "%llu", n);
    setenv("NCCL_MOE_SEQ_START", buf, 1);
  }
  ~SequenceStart() { unsetenv("NCCL_MOE_SEQ_START"); }
};

// Four operations per slot starting two before the wrap of the 32-bit epoch.
void llAcrossWrap(bool split, uint64_t seed) {
  LlShape s;
  LlEp ep(s);
  {
    SequenceStart start((1ull << 32) - 3);
    if (!ep.create()) return;
  }
  for (int op = 0; op < 4 * s.slots; op++) {
    LlProblem p = makeLlProblem(s, spec(seed + op));
    LlInputs in;
    MOE_AGREE_OR_RETURN(in.upload(p), "upload inputs");
    LlRunOpts o;
    o.split = split;
    o.weighted = op % 3 != 1;
    const std::string tag = s.str() + " [epoch 2^32 " + std::to_string(op / s.slots - 2) +
                            " on slot " + std::to_string(op % s.slots) + "]";
    if (!llRunAndCheck(ep, in, p, o, tag)) return;
  }
  MOE_AGREE_OR_RETURN(MOE_OK(ncclMoeCheckErrors(ep.comm)), "ncclMoeCheckErrors");
}

TEST_F(SeqWrap, LowLatencyAcrossEpoch2Pow32) { llAcrossWrap(false, 1501); }

TEST_F(SeqWrap, LowLatencySplitAcrossEpoch2Pow32) { llAcrossWrap(true, 1511); }

TEST_F(SeqWrap, HighThroughputAcrossSequence2Pow64) {
  Shape s;
  s.hidden = 2048;
  s.maxTokens = 128;
  Ep ep(s);
  {
    SequenceStart start(~0ull - 2);  // operations 2^64 - 2, 2^64 - 1, 0, 1, 2
    if (!ep.create()) return;
  }
  DeviceInputs in;
  for (int op = 0; op < 5; op++) {
    Problem p = makeProblem(s, spec(1521 + op));
    Reference ref = makeReference(p);
    MOE_AGREE_OR_RETURN(in.upload(p), "upload inputs");
    RunOpts o;
    o.src = op % 2 ? ExpertSrc::CombineInput : ExpertSrc::DispatchX;
    const std::string tag = s.str() + " [operation 2^64 " + std::to_string(op - 2) + "]";
    if (!runAndCheck(ep, in, p, ref, o, tag.c_str())) return;
  }
}

// Rank 0 starts one operation ahead of the others. Returns through the checks of every rank.
void expectPeerAhead(bool lowLatency) {
  using Clock = std::chrono::steady_clock;
  const int me = rank();
  const int timeoutMs = 2000;
  const unsigned long long start = 1000 + (me == 0 ? 1 : 0);
  LlShape ls;
  ls.timeoutMs = timeoutMs;
  Shape hs;
  hs.hidden = 2048;
  hs.maxTokens = 64;
  hs.timeoutMs = timeoutMs;
  LlEp lep(ls);
  Ep hep(hs);
  {
    SequenceStart seq(start);
    if (lowLatency ? !lep.create() : !hep.create()) return;
  }
  ncclMoeComm_t comm = lowLatency ? lep.comm : hep.comm;
  const Clock::time_point t0 = Clock::now();
  bool ok;
  if (lowLatency) {
    LlProblem p = makeLlProblem(ls, spec(1531));
    LlInputs in;
    ok = in.upload(p);
    ncclMoeLowLatencyOutput_t out;
    ok = ok && runLlDispatch(lep, in, p.tokens(me), true, false, &out);
  } else {
    Problem p = makeProblem(hs, spec(1532));
    DeviceInputs in;
    ok = in.upload(p);
    ncclMoeDispatchOutput_t out;
    ok = ok && MOE_OK(ncclMoeDispatch(comm, in.x.get(), nullptr, in.topkIdx.as<int64_t>(), nullptr,
                                      p.tokens(me), 0, &hep.handle, &out, stream()));
  }
  ok = CUDA_OK(cudaStreamSynchronize(stream())) && ok;
  const double took = std::chrono::duration<double>(Clock::now() - t0).count();
  const ncclResult_t r = ncclMoeCheckErrors(comm);
  const std::string msg = ncclMoeGetLastError();
  if (me == 0) {  // behind no one, ahead of everyone: its peers never send its operation
    // Its peers never send its operation: it times out (low-latency: the peers join its
    // failed-rank set, a local error).
    EXPECT_EQ(r, lowLatency ? ncclRemoteError : ncclSystemError) << "rank 0 (ahead): " << msg;
  } else {
    EXPECT_EQ(r, ncclInvalidUsage) << "rank " << me << ": a peer ahead was not reported: " << msg;
    EXPECT_NE(msg.find("protocol error"), std::string::npos) << "rank " << me << ": " << msg;
    EXPECT_NE(msg.find("rank 0"), std::string::npos) << "rank " << me << ": " << msg;
    EXPECT_LT(took, timeoutMs / 2000.0) << "rank " << me << ": waited for a timeout instead";
  }
  printf("[   INFO   ] rank %d: %s peer ahead: %.2f s, check -> %d \"%s\"\n", me,
         lowLatency ? "LL" : "HT", took, int(r), msg.c_str());
  fflush(stdout);
  MOE_AGREE_OR_RETURN(ok, "operation with a peer ahead");
  hep.destroyHandle();
  const bool destroyed = lowLatency ? lep.destroy() : MOE_OK(ncclMoeCommDestroy(hep.comm));
  hep.comm = nullptr;
  MOE_AGREE_OR_RETURN(destroyed, "ncclMoeCommDestroy after a protocol error");
  // A fresh context works.
  if (lowLatency) {
    llScenario(ls, spec(1533), LlRunOpts(), 2);
  } else {
    runScenario(hs, spec(1534), RunOpts());
  }
}

TEST_F(SeqProtocol, HighThroughputPeerAheadIsAnError) { expectPeerAhead(false); }

TEST_F(SeqProtocol, LowLatencyPeerAheadIsAnError) { expectPeerAhead(true); }

}  // namespace
}  // namespace moe_gpu
