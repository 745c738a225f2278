// Low-latency mode in CUDA graphs, the peer timeout, and argument validation.
//  - Graphs: one dispatch (given the weights, or NULL) + combine (one-shot, or split with the
//    completions on a forked stream; full batches, or 1 and 2 tokens per rank: the one-launch
//    form; also on one-CTA grids) captured once and replayed many times, each replay after new
//    routing, weights and data were written into the same input buffers; every replay
//    checks the counts and the combine, every 10th the whole dispatch output. The captured
//    dispatch keeps the slot it had at capture; the test synchronises after every replay.
//    Expert output: BF16 -> a captured device copy of x into combineInput (identity); FP8 ->
//    block-constant rows in a separate buffer.
//  - Timeout: config.timeoutMs = 2000 and rank 0 skips a dispatch (full batches, and 1 token,
//    the one-launch form) or the combine of a 1-token operation: the other ranks' call gives up
//    and ncclMoeCheckErrors reports ncclRemoteError naming the timeout (rank 0 joins their
//    failed-rank set: ll_failed_rank_test.cc); destroying the context works and a fresh context
//    works.
//  - Validation: bad configurations at create, bad arguments (NULL, out of range, misaligned
//    combine buffers, unknown flags), *Complete without a send-only call pending, LL calls on an
//    HT context and HT calls on an LL context are rejected with a message and leave the context
//    usable.
#include <string.h>
#include <strings.h>

#include <chrono>
#include <initializer_list>

#include "ll_test_util.h"

namespace moe_gpu {
namespace {

class LlGraph : public GpuTest {};
class LlTimeout : public GpuTest {};
class LlValidation : public GpuTest {};

// tokens: per rank (-1: spec's default, maxTokens minus a per-rank amount).
void graphScenario(const LlShape& s, uint64_t seed, int replays, bool split, bool weighted, int tokens = -1) {
  LlEp ep(s);
  if (!ep.create()) return;
  const int me = rank();
  const size_t expertBytes = s.slotRows() * s.hidden * 2;
  LlProblem p0 = makeLlProblem(s, spec(seed, Route::Random, tokens));
  LlInputs in;
  DevMem combOut((size_t)s.maxTokens * s.hidden * 2), separate;
  bool ok = in.upload(p0) && combOut.get();
  if (s.fp8) ok = ok && separate.alloc(expertBytes) && writeBlockConstantExpert(separate.get(), s);
  sideStream();  // created before the capture
  MOE_AGREE_OR_RETURN(ok, "inputs");

  OwnedGraph g;
  ncclMoeLowLatencyOutput_t out;
  memset(&out, 0, sizeof(out));
  ok = CUDA_OK(cudaStreamBeginCapture(stream(), cudaStreamCaptureModeThreadLocal));
  if (ok) {
    bool cap = runLlDispatch(ep, in, p0.tokens(me), weighted, split, &out);
    const void* expert = s.fp8 ? separate.get() : out.combineInput;
    if (cap && !s.fp8)
      cap = CUDA_OK(cudaMemcpyAsync(out.combineInput, out.x, expertBytes,
                                    cudaMemcpyDeviceToDevice, stream()));
    if (cap) cap = runLlCombine(ep, out, expert, combOut.get(), split);
    ok = CUDA_OK(cudaStreamEndCapture(stream(), &g.graph)) && cap;
  }
  if (ok) ok = CUDA_OK(cudaGraphInstantiate(&g.exec, g.graph, 0));
  MOE_AGREE_OR_RETURN(ok, "graph capture");
  const std::string base = s.str() + (split ? " [split graph" : " [one-shot graph");
  ep.record(out, base.c_str());

  for (int r = 0; r < replays; r++) {
    const std::string tag = base + ", replay " + std::to_string(r + 1) + "]";
    const bool full = r == 0 || r % 10 == 9 || r == replays - 1;
    LlProblem q = makeLlProblem(s, spec(seed + 1 + r, Route::Random, tokens));
    ok = in.upload(q) && ep.poisonSlot(out.slot) && poison(combOut.get(), combOut.bytes());
    MOE_AGREE_OR_RETURN(ok, (tag + ": inputs and poison").c_str());
    ok = CUDA_OK(cudaGraphLaunch(g.exec, stream()));
    ok = CUDA_OK(cudaStreamSynchronize(stream())) && ok;
    MOE_AGREE_OR_RETURN(ok, (tag + ": cudaGraphLaunch").c_str());
    agreeMismatches(checkLlDispatch(out, q, llReference(q), tag.c_str(), !full),
                    (tag + ": dispatch output").c_str());
    std::vector<uint16_t> expected =
        s.fp8 ? llBlockConstantCombine(q, weighted) : llIdentityCombine(q, weighted);
    agreeMismatches(checkCombine(combOut.get(), expected, q.tokens(me), s.hidden, tag.c_str()),
                    (tag + ": combine output").c_str());
    MOE_AGREE_OR_RETURN(MOE_OK(ncclMoeCheckErrors(ep.comm)), (tag + ": check errors").c_str());
  }
  // Eager operations on the same context afterwards (the other slot, then the graph's).
  for (int i = 0; i < 2; i++) {
    LlProblem q = makeLlProblem(s, spec(seed + 5000 + i, Route::Random, tokens));
    MOE_AGREE_OR_RETURN(in.upload(q), "upload inputs");
    LlRunOpts o;
    o.split = split;
    if (!llRunAndCheck(ep, in, q, o, s.str() + " [eager after replays " + std::to_string(i) + "]"))
      return;
  }
}

LlShape shape(bool fp8, ncclMoeScaleFormat_t fmt = ncclMoeScaleFp32) {
  LlShape s;
  s.fp8 = fp8;
  s.fmt = fmt;
  return s;
}

TEST_F(LlGraph, OneShotBf16Weighted100Replays) { graphScenario(shape(false), 1101, 100, false, true); }

TEST_F(LlGraph, OneShotFp8Ue8m0Unweighted50Replays) {
  graphScenario(shape(true, ncclMoeScaleUe8m0), 1102, 50, false, false);
}

TEST_F(LlGraph, SplitBf16) { graphScenario(shape(false), 1103, 5, true, true); }

TEST_F(LlGraph, SplitFp8Fp32) { graphScenario(shape(true, ncclMoeScaleFp32), 1104, 5, true, true); }

// Under the default one-launch limits ("4,1", ll_one_launch_test.cc) both one-shot calls of 1
// token per rank run in one launch each, and of 2 tokens the dispatch only.
TEST_F(LlGraph, OneShotOneTokenFp8Ue8m0Weighted50Replays) {
  graphScenario(shape(true, ncclMoeScaleUe8m0), 1105, 50, false, true, 1);
}

TEST_F(LlGraph, OneShotTwoTokensBf16Unweighted20Replays) { graphScenario(shape(false), 1106, 20, false, false, 2); }

// A grid of one CTA for both one-launch kernels (maxTokensPerRank 2 or 4 with one row chunk:
// the solo dispatch takes no ticket and releases no go; 82a5fa8), captured once and replayed
// with new routing each time; the limit is forced so that both calls run in one launch whatever
// NCCL_MOE_LL_ONE_LAUNCH the environment has.
TEST_F(LlGraph, OneCtaGridOneShotBf16Weighted20Replays) {
  ScopedEnv limit("NCCL_MOE_LL_ONE_LAUNCH", "1000000");
  LlShape s = shape(false);
  s.maxTokens = 2;
  graphScenario(s, 1107, 20, false, true);
}

TEST_F(LlGraph, OneCtaGridOneShotUnequalTokensFp8Ue8m0Unweighted20Replays) {  // T = 4 or 3 by rank
  ScopedEnv limit("NCCL_MOE_LL_ONE_LAUNCH", "1000000");
  LlShape s = shape(true, ncclMoeScaleUe8m0);
  s.maxTokens = 4;
  graphScenario(s, 1108, 20, false, false);
}

// --- timeout -----------------------------------------------------------------------------------

bool mentionsTimeout(const char* msg) {
  return msg && (strcasestr(msg, "timeout") != nullptr || strcasestr(msg, "timed out") != nullptr);
}

// Rank 0 skips one operation's dispatch (skipCombine: it dispatches, then skips the combine),
// every rank sending `tokens` (-1: spec's default): the others' call gives up after timeoutMs,
// ncclMoeCheckErrors reports the timeout; destroy and a fresh context work.
void peerSkips(int tokens, bool skipCombine, uint64_t seed) {
  using Clock = std::chrono::steady_clock;
  LlShape s = shape(false);
  s.timeoutMs = 2000;
  const int me = rank();
  const char* what = skipCombine ? "combine" : "dispatch";
  {
    LlEp ep(s);
    if (!ep.create()) return;
    LlProblem p = makeLlProblem(s, spec(seed, Route::Random, tokens));
    LlInputs in;
    MOE_AGREE_OR_RETURN(in.upload(p), "upload inputs");
    DevMem combOut((size_t)s.maxTokens * s.hidden * 2);
    ncclMoeLowLatencyOutput_t out;
    bool ok = combOut.get() != nullptr;
    if (skipCombine) {  // every rank dispatches
      ok = ok && MOE_OK(ncclMoeLowLatencyDispatch(ep.comm, in.x.get(), in.topkIdx.as<int64_t>(),
                                                  in.weights.as<float>(), p.tokens(me), 0, &out, stream()));
      ok = CUDA_OK(cudaStreamSynchronize(stream())) && ok;
      MOE_AGREE_OR_RETURN(ok, "dispatch of every rank");
    }
    const Clock::time_point t0 = Clock::now();
    if (me != 0) {  // rank 0 never calls the dispatch (or the combine)
      if (skipCombine)
        ok = MOE_OK(ncclMoeLowLatencyCombine(ep.comm, &out, out.combineInput, combOut.get(), 0, stream()));
      else
        ok = MOE_OK(ncclMoeLowLatencyDispatch(ep.comm, in.x.get(), in.topkIdx.as<int64_t>(),
                                              in.weights.as<float>(), p.tokens(me), 0, &out, stream()));
      ok = CUDA_OK(cudaStreamSynchronize(stream())) && ok;
      const ncclResult_t r = ncclMoeCheckErrors(ep.comm);
      const std::string msg = ncclMoeGetLastError();
      EXPECT_EQ(r, ncclRemoteError) << "rank " << me << ": ncclMoeCheckErrors after a peer "
                                    << "skipped the " << what << ": \"" << msg << "\"";
      EXPECT_TRUE(mentionsTimeout(msg.c_str())) << "rank " << me << ": message \"" << msg
                                                << "\" does not name the timeout";
      const double waited = std::chrono::duration<double>(Clock::now() - t0).count();
      EXPECT_GE(waited, 1.5) << "rank " << me << ": gave up before timeoutMs";
      EXPECT_LT(waited, 8.0) << "rank " << me << ": took far longer than timeoutMs";
      if (me == 1) {
        printf("[   INFO   ] rank 1: timed-out %s (%d tokens): %.2f s, check -> %d \"%s\"\n", what, p.tokens(me),
               waited, int(r), msg.c_str());
        fflush(stdout);
      }
    }
    MOE_AGREE_OR_RETURN(ok, "operation without rank 0");
    if (me == 0) {
      const ncclResult_t r = ncclMoeCheckErrors(ep.comm);
      printf("[   INFO   ] rank 0 (skipped the %s): ncclMoeCheckErrors -> %d \"%s\"\n", what, int(r),
             r == ncclSuccess ? "" : ncclMoeGetLastError());
      fflush(stdout);
    }
    const Clock::time_point t1 = Clock::now();
    MOE_AGREE_OR_RETURN(ep.destroy(), "ncclMoeCommDestroy after the timeout");
    const double all = std::chrono::duration<double>(Clock::now() - t0).count();
    const double destroy = std::chrono::duration<double>(Clock::now() - t1).count();
    EXPECT_LT(all, 10.0) << "rank " << me << ": timeout + destroy took " << all << " s (destroy "
                         << destroy << " s)";
  }
  // A fresh context works.
  LlRunOpts o;
  s.timeoutMs = 0;
  llScenario(s, spec(seed + 1, Route::Random, tokens), o, 2);
}

TEST_F(LlTimeout, PeerSkipsDispatch) { peerSkips(-1, false, 1201); }

// 1 token: the one-launch form's waits (ll_one_launch_test.cc).
TEST_F(LlTimeout, PeerSkipsOneTokenDispatch) { peerSkips(1, false, 1203); }

TEST_F(LlTimeout, PeerSkipsOneTokenCombine) { peerSkips(1, true, 1205); }

// --- validation --------------------------------------------------------------------------------

// Records a call that must be rejected with one of `codes` and a message. Rank 0 prints it.
void expectRejected(ncclResult_t r, std::initializer_list<ncclResult_t> codes, const char* what) {
  const std::string msg = r == ncclSuccess ? "" : ncclMoeGetLastError();
  bool expected = false;
  for (ncclResult_t c : codes) expected |= r == c;
  EXPECT_TRUE(expected) << "rank " << rank() << ": " << what << ": returned " << int(r) << " ("
                        << ncclGetErrorString(r) << ") \"" << msg << "\"";
  if (r != ncclSuccess) {
    EXPECT_STRNE(msg.c_str(), "") << what << ": no message";
  }
  if (rank() == 0) {
    printf("[   INFO   ] %s -> %d \"%s\"\n", what, int(r), msg.c_str());
    fflush(stdout);
  }
}

TEST_F(LlValidation, CreateRejectsBadConfigs) {
  struct Case {
    const char* what;
    void (*edit)(ncclMoeConfig_t&);
  };
  const Case cases[] = {
      {"FP8 with hidden 2000 (not a multiple of 128)",
       [](ncclMoeConfig_t& c) { c.dispatchDtype = ncclMoeFp8E4m3; c.hidden = 2000; }},
      {"UE8M0 with hidden 640 (not a multiple of 512)",
       [](ncclMoeConfig_t& c) { c.dispatchDtype = ncclMoeFp8E4m3; c.hidden = 640;
                                c.fp8Scales = ncclMoeScaleUe8m0; }},
      {"numBufferSlots 9", [](ncclMoeConfig_t& c) { c.numBufferSlots = 9; }},
      {"numBufferSlots -1", [](ncclMoeConfig_t& c) { c.numBufferSlots = -1; }},
      {"fp8Scales 7", [](ncclMoeConfig_t& c) { c.dispatchDtype = ncclMoeFp8E4m3;
                                               c.fp8Scales = (ncclMoeScaleFormat_t)7; }},
  };
  for (const Case& k : cases) {
    ncclMoeConfig_t cfg = makeLlConfig(shape(false));
    k.edit(cfg);
    ncclMoeComm_t c = nullptr;
    const ncclResult_t r = ncclMoeCommCreate(comm(), &cfg, &c);
    expectRejected(r, {ncclInvalidArgument}, (std::string("create: ") + k.what).c_str());
    bool ok = r != ncclSuccess;
    if (c) ok = MOE_OK(ncclMoeCommDestroy(c)) && false;  // created by mistake: collective
    MOE_AGREE_OR_RETURN(ok, k.what);
  }
}

TEST_F(LlValidation, RejectedCallsLeaveContextUsable) {
  LlShape s = shape(true, ncclMoeScaleFp32Pow2);
  s.timeoutMs = 5000;  // a call accepted by mistake on every rank must not hang long
  LlEp ep(s);
  if (!ep.create()) return;
  const int me = rank(), M = s.maxTokens;
  LlProblem p = makeLlProblem(s, spec(1301));
  LlInputs in;
  MOE_AGREE_OR_RETURN(in.upload(p), "upload inputs");
  LlRunOpts o;
  if (!llRunAndCheck(ep, in, p, o, s.str() + " [before the rejected calls]")) return;
  // The operation just dispatched and combined.
  const ncclMoeLowLatencyOutput_t done = ep.known[(ep.nextSlot + s.slots - 1) % s.slots];
  const int T = p.tokens(me);
  const void* x = in.x.get();
  const int64_t* idx = in.topkIdx.as<int64_t>();
  const float* w = in.weights.as<float>();
  DevMem comb((size_t)M * s.hidden * 2 + 16);  // + 16: room for the misaligned `out` below
  void* co = comb.get();
  ncclMoeLowLatencyOutput_t out;
  cudaStream_t st = stream();
  const auto A = ncclInvalidArgument, U = ncclInvalidUsage;

  expectRejected(ncclMoeLowLatencyDispatch(ep.comm, x, idx, w, M + 1, 0, &out, st), {A},
                 "LL dispatch: numTokens = maxTokensPerRank + 1");
  expectRejected(ncclMoeLowLatencyDispatch(ep.comm, x, idx, w, -1, 0, &out, st), {A},
                 "LL dispatch: numTokens = -1");
  expectRejected(ncclMoeLowLatencyDispatch(ep.comm, nullptr, idx, w, T, 0, &out, st), {A},
                 "LL dispatch: x NULL with T > 0");
  expectRejected(ncclMoeLowLatencyDispatch(ep.comm, x, nullptr, w, T, 0, &out, st), {A},
                 "LL dispatch: topkIdx NULL with T > 0 (weights given)");
  expectRejected(ncclMoeLowLatencyDispatch(ep.comm, x, nullptr, nullptr, T, 0, &out, st), {A},
                 "LL dispatch: topkIdx NULL with T > 0 (no weights)");
  expectRejected(ncclMoeLowLatencyDispatch(ep.comm, x, idx, w, T, 0, nullptr, st), {A},
                 "LL dispatch: out NULL");
  expectRejected(ncclMoeLowLatencyDispatch(ep.comm, x, idx, w, T, 0x80, &out, st), {A},
                 "LL dispatch: unknown flag 0x80");
  expectRejected(ncclMoeLowLatencyDispatch(ep.comm, x, idx, w, T, NCCL_MOE_DISPATCH_HOST_COUNTS,
                                           &out, st), {A, U},
                 "LL dispatch: NCCL_MOE_DISPATCH_HOST_COUNTS (LL never syncs the host)");
  expectRejected(ncclMoeLowLatencyDispatchComplete(ep.comm, &done, st), {U, A},
                 "LL dispatch complete without a send-only dispatch pending");
  expectRejected(ncclMoeLowLatencyDispatchComplete(ep.comm, nullptr, st), {A},
                 "LL dispatch complete: out NULL");
  expectRejected(ncclMoeLowLatencyCombineComplete(ep.comm, &done, co, st), {U, A},
                 "LL combine complete without a send-only combine pending");
  expectRejected(ncclMoeLowLatencyCombine(ep.comm, nullptr, done.combineInput, co, 0, st), {A},
                 "LL combine: dispatched NULL");
  expectRejected(ncclMoeLowLatencyCombine(ep.comm, &done, nullptr, co, 0, st), {A},
                 "LL combine: expertOut NULL");
  expectRejected(ncclMoeLowLatencyCombine(ep.comm, &done, done.combineInput, nullptr, 0, st), {A},
                 "LL combine: out NULL");
  // The header requires 16-byte alignment of both buffers: 2 bytes off, still BF16-aligned.
  expectRejected(ncclMoeLowLatencyCombine(ep.comm, &done, (const char*)done.combineInput + 2, co,
                                          0, st), {A}, "LL combine: expertOut not 16-byte aligned");
  expectRejected(ncclMoeLowLatencyCombine(ep.comm, &done, done.combineInput, (char*)co + 2, 0, st),
                 {A}, "LL combine: out not 16-byte aligned");
  ncclMoeDispatchOutput_t htOut;
  ncclMoeHandle_t handle = nullptr;
  expectRejected(ncclMoeDispatch(ep.comm, x, nullptr, idx, w, T, 0, &handle, &htOut, st), {U, A},
                 "HT ncclMoeDispatch on an LL context");
  EXPECT_TRUE(handle == nullptr) << "rank " << me << ": a rejected HT dispatch made a handle";
  bool ok = CUDA_OK(cudaStreamSynchronize(st));
  ok = MOE_OK(ncclMoeCheckErrors(ep.comm)) && ok;
  MOE_AGREE_OR_RETURN(ok, "rejected calls left no error behind");
  // Still usable: a checked dispatch + combine on the next slot, and one more.
  for (int i = 0; i < 2; i++) {
    o.split = i == 1;
    if (!llRunAndCheck(ep, in, p, o, s.str() + " [after the rejected calls]")) return;
  }
}

TEST_F(LlValidation, LowLatencyCallsOnHtContextRejected) {
  if (moe_ranks::fakeNodes() > 1) GTEST_SKIP() << "no high-throughput context across nodes (GpuCreateFailure.HighThroughput*)";
  Shape hs;
  hs.hidden = 2048;
  hs.maxTokens = 64;
  Ep ep(hs);
  if (!ep.create()) return;
  DevMem x((size_t)64 * 2048 * 2), idx((size_t)64 * hs.topK * 8), w((size_t)64 * hs.topK * 4),
      comb((size_t)64 * 2048 * 2);
  ncclMoeLowLatencyOutput_t out;
  memset(&out, 0, sizeof(out));
  expectRejected(ncclMoeLowLatencyDispatch(ep.comm, x.get(), idx.as<int64_t>(), w.as<float>(), 0,
                                           0, &out, stream()),
                 {ncclInvalidUsage, ncclInvalidArgument}, "LL dispatch on an HT context");
  expectRejected(ncclMoeLowLatencyDispatchComplete(ep.comm, &out, stream()),
                 {ncclInvalidUsage, ncclInvalidArgument}, "LL dispatch complete on an HT context");
  expectRejected(ncclMoeLowLatencyCombine(ep.comm, &out, x.get(), comb.get(), 0, stream()),
                 {ncclInvalidUsage, ncclInvalidArgument}, "LL combine on an HT context");
  expectRejected(ncclMoeLowLatencyCombineComplete(ep.comm, &out, comb.get(), stream()),
                 {ncclInvalidUsage, ncclInvalidArgument}, "LL combine complete on an HT context");
  MOE_AGREE_OR_RETURN(CUDA_OK(cudaStreamSynchronize(stream())), "rejected LL calls");
  // The HT context still works.
  Problem p = makeProblem(hs, spec(1401));
  Reference ref = makeReference(p);
  DeviceInputs in;
  MOE_AGREE_OR_RETURN(in.upload(p), "upload inputs");
  RunOpts o;
  runAndCheck(ep, in, p, ref, o, "HT dispatch after rejected LL calls");
}

}  // namespace
}  // namespace moe_gpu
