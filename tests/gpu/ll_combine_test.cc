// Low-latency combine and the split ("hook") form:
//  - split (NCCL_MOE_LL_SEND_ONLY, then the *Complete call on another stream after a host delay
//    and other work, ordered by events) against the reference, for both expert-output sources
//    and with / without weights;
//  - split and one-shot on the same problem give identical dispatch blocks (after sorting by
//    srcToken) and bitwise identical combine outputs;
//  - several operations in flight (dispatch A, dispatch B, ..., combine A, combine B, ...), one
//    per buffer slot, with the host looking at the rows in between, and fully stream-ordered
//    (identity expert by a device copy of x for BF16, block-constant expert outputs otherwise),
//    one-shot and split, the ranks skewed by host delays; operation 1 is dispatched without
//    weights and the others with their own, so each combine must use its own dispatch's.
#include <string.h>
#include <unistd.h>

#include <algorithm>
#include <memory>
#include <numeric>

#include "ll_test_util.h"

namespace moe_gpu {
namespace {

class LlCombine : public GpuTest {};

LlShape shape(bool fp8, ncclMoeScaleFormat_t fmt = ncclMoeScaleFp32) {
  LlShape s;
  s.fp8 = fp8;
  s.fmt = fmt;
  return s;
}

// --- split form against the reference ---------------------------------------------------------

TEST_F(LlCombine, SplitBf16) {
  LlRunOpts o;
  o.split = true;
  llScenario(shape(false), spec(1001), o);
}

TEST_F(LlCombine, SplitFp8Pow2) {
  LlRunOpts o;
  o.split = true;
  llScenario(shape(true, ncclMoeScaleFp32Pow2), spec(1002), o);
}

TEST_F(LlCombine, SplitFp8Ue8m0) {
  LlRunOpts o;
  o.split = true;
  llScenario(shape(true, ncclMoeScaleUe8m0), spec(1003), o);
}

// --- split == one-shot -------------------------------------------------------------------------

// Sorted (by srcToken) content of every block: tokens, rows and scales. Returns mismatches.
long compareBlocks(const LlBlocks& a, const LlBlocks& b, const LlShape& s, const char* tag) {
  long bad = 0;
  if (a.counts != b.counts || a.expertCounts != b.expertCounts) bad++;
  for (size_t blk = 0; blk < a.srcToken.size() && blk < b.srcToken.size(); blk++) {
    const std::vector<int>& ta = a.srcToken[blk];
    const std::vector<int>& tb = b.srcToken[blk];
    if (ta.size() != tb.size()) {
      bad++;
      continue;
    }
    auto sorted = [](const std::vector<int>& t) {
      std::vector<int> o(t.size());
      std::iota(o.begin(), o.end(), 0);
      std::stable_sort(o.begin(), o.end(), [&](int x, int y) { return t[x] < t[y]; });
      return o;
    };
    std::vector<int> oa = sorted(ta), ob = sorted(tb);
    const size_t rb = s.rowBytes(), sb = s.scaleBytes();
    for (size_t i = 0; i < ta.size(); i++) {
      bad += ta[oa[i]] != tb[ob[i]];
      bad += memcmp(&a.rows[blk][oa[i] * rb], &b.rows[blk][ob[i] * rb], rb) != 0;
      if (sb) bad += memcmp(&a.scales[blk][oa[i] * sb], &b.scales[blk][ob[i] * sb], sb) != 0;
    }
  }
  if (a.srcToken.size() != b.srcToken.size()) bad++;
  EXPECT_EQ(bad, 0) << tag << ": rank " << rank() << ": split and one-shot dispatch differ";
  return bad;
}

void splitEqualsOneShot(const LlShape& s, uint64_t seed) {
  LlEp ep(s);
  if (!ep.create()) return;
  LlProblem p = makeLlProblem(s, spec(seed));
  LlInputs in;
  MOE_AGREE_OR_RETURN(in.upload(p), "upload inputs");
  // Rounds: one-shot, split, one-shot, split (the last two on poisoned slots).
  std::vector<uint16_t> comb[4];
  LlBlocks blocks[4];
  for (int round = 0; round < 4; round++) {
    LlRunOpts o;
    o.split = round % 2 == 1;
    o.combineResult = &comb[round];
    o.blocks = &blocks[round];
    const std::string tag = s.str() + (o.split ? " split" : " one-shot") + " [same problem, round " +
                            std::to_string(round + 1) + "]";
    if (!llRunAndCheck(ep, in, p, o, tag)) return;
  }
  long bad = 0;
  for (int round = 1; round < 4; round++) {
    const std::string tag = s.str() + " round " + std::to_string(round + 1) + " vs round 1";
    bad += compareBlocks(blocks[0], blocks[round], s, tag.c_str());
    const bool same = comb[0] == comb[round];
    EXPECT_TRUE(same) << tag << ": rank " << rank() << ": combine outputs differ";
    bad += !same;
  }
  agreeMismatches(bad, "split vs one-shot");
}

TEST_F(LlCombine, SplitEqualsOneShotBf16) { splitEqualsOneShot(shape(false), 1011); }

TEST_F(LlCombine, SplitEqualsOneShotFp8Fp32) {
  splitEqualsOneShot(shape(true, ncclMoeScaleFp32), 1012);
}

TEST_F(LlCombine, SplitEqualsOneShotFp8Ue8m0) {
  splitEqualsOneShot(shape(true, ncclMoeScaleUe8m0), 1013);
}

// --- operations in flight ----------------------------------------------------------------------

// n = s.slots operations. Warm-up: n checked rounds (reveal every slot). Then all slots are
// poisoned and the n operations run with the host looking at the rows between the dispatches
// and the combines (hostInBetween), or fully stream-ordered. Expert outputs: identity from the
// downloaded rows (hostInBetween), else op i even: BF16 -> device copy of x into combineInput,
// FP8 -> block-constant written into combineInput before the dispatches; op i odd:
// block-constant in a separate buffer. Op i's dispatch gets weights unless i == 1.
void inFlight(const LlShape& s, uint64_t seed, bool split, bool hostInBetween) {
  const int n = s.slots, me = rank(), H = s.hidden;
  LlEp ep(s);
  if (!ep.create()) return;
  std::vector<LlProblem> p;
  std::vector<std::unique_ptr<LlInputs>> in;
  bool ok = true;
  for (int i = 0; i < n; i++) {
    p.push_back(makeLlProblem(s, spec(seed + i)));
    in.emplace_back(new LlInputs);
    ok = in[i]->upload(p[i]) && ok;
  }
  MOE_AGREE_OR_RETURN(ok, "upload inputs");
  for (int i = 0; i < n; i++) {
    LlRunOpts o;
    if (!llRunAndCheck(ep, *in[i], p[i], o, s.str() + " [warm-up " + std::to_string(i) + "]"))
      return;
  }
  const std::string what = s.str() + " [" + std::to_string(n) + " in flight, " +
                           (split ? "split" : "one-shot") +
                           (hostInBetween ? ", host between dispatches and combines]" : ", stream-ordered]");
  std::vector<std::unique_ptr<DevMem>> sep, comb;
  for (int slot = 0; slot < n; slot++) ok = ep.poisonSlot(slot) && ok;
  for (int i = 0; i < n; i++) {
    const int slot = (ep.nextSlot + i) % n;
    sep.emplace_back(new DevMem(s.slotRows() * H * 2));
    comb.emplace_back(new DevMem((size_t)s.maxTokens * H * 2));
    ok = ok && sep[i]->get() && comb[i]->get() && poison(comb[i]->get(), comb[i]->bytes());
    if (!ok || hostInBetween) continue;
    if (i % 2 == 1) ok = writeBlockConstantExpert(sep[i]->get(), s);
    else if (s.fp8) ok = writeBlockConstantExpert(ep.known[slot].combineInput, s);
  }
  MOE_AGREE_OR_RETURN(ok, (what + ": poison and expert outputs").c_str());

  std::vector<ncclMoeLowLatencyOutput_t> out(n);
  usleep(3000 * me);
  const unsigned first = split ? NCCL_MOE_LL_SEND_ONLY : 0;
  auto weighted = [](int i) { return i != 1; };
  for (int i = 0; i < n && ok; i++) {
    memset(&out[i], 0, sizeof(out[i]));
    const float* w = weighted(i) ? in[i]->weights.as<float>() : nullptr;
    ok = MOE_OK(ncclMoeLowLatencyDispatch(ep.comm, in[i]->x.get(), in[i]->topkIdx.as<int64_t>(), w,
                                          p[i].tokens(me), first, &out[i], stream()));
  }
  for (int i = 0; i < n && ok && split; i++)
    ok = MOE_OK(ncclMoeLowLatencyDispatchComplete(ep.comm, &out[i], stream()));
  if (hostInBetween) {  // every rank takes part in the collective checks below
    ok = CUDA_OK(cudaStreamSynchronize(stream())) && ok;
    MOE_AGREE_OR_RETURN(ok, (what + ": dispatches").c_str());
    for (int i = 0; i < n; i++) {
      const std::string tag = what + " op " + std::to_string(i);
      LlBlocks blocks;
      agreeMismatches(checkLlDispatch(out[i], p[i], llReference(p[i]), tag.c_str(), false,
                                      &blocks), tag.c_str());
      ok = writeIdentityExpert(i % 2 ? sep[i]->get() : out[i].combineInput, s, blocks) && ok;
    }
    MOE_AGREE_OR_RETURN(ok, (what + ": identity expert outputs").c_str());
  }
  for (int i = 0; i < n && ok && !hostInBetween && !s.fp8; i += 2)
    ok = CUDA_OK(cudaMemcpyAsync(out[i].combineInput, out[i].x, s.slotRows() * H * 2,
                                 cudaMemcpyDeviceToDevice, stream()));
  for (int i = 0; i < n && ok; i++) {
    const void* expert = i % 2 ? sep[i]->get() : out[i].combineInput;
    ok = MOE_OK(ncclMoeLowLatencyCombine(ep.comm, &out[i], expert, comb[i]->get(), first,
                                         stream()));
  }
  for (int i = 0; i < n && ok && split; i++)
    ok = MOE_OK(ncclMoeLowLatencyCombineComplete(ep.comm, &out[i], comb[i]->get(), stream()));
  ok = CUDA_OK(cudaStreamSynchronize(stream())) && ok;
  MOE_AGREE_OR_RETURN(ok, (what + ": enqueue and run").c_str());
  for (int i = 0; i < n; i++) ep.record(out[i], what.c_str());

  for (int i = 0; i < n; i++) {
    const std::string tag = what + " op " + std::to_string(i);
    if (!hostInBetween)
      agreeMismatches(checkLlDispatch(out[i], p[i], llReference(p[i]), tag.c_str()),
                      (tag + ": dispatch output").c_str());
    const bool identity = hostInBetween || (i % 2 == 0 && !s.fp8);
    std::vector<uint16_t> expected = identity ? llIdentityCombine(p[i], weighted(i))
                                              : llBlockConstantCombine(p[i], weighted(i));
    agreeMismatches(checkCombine(comb[i]->get(), expected, p[i].tokens(me), H, tag.c_str()),
                    (tag + ": combine output").c_str());
  }
  MOE_AGREE_OR_RETURN(MOE_OK(ncclMoeCheckErrors(ep.comm)), "ncclMoeCheckErrors");
  // The context goes on normally afterwards.
  LlRunOpts o;
  llRunAndCheck(ep, *in[0], p[0], o, s.str() + " [after the operations in flight]");
}

TEST_F(LlCombine, TwoInFlightHostBetweenBf16) { inFlight(shape(false), 1021, false, true); }

TEST_F(LlCombine, TwoInFlightStreamOrderedBf16) { inFlight(shape(false), 1022, false, false); }

TEST_F(LlCombine, TwoInFlightStreamOrderedSplitBf16) { inFlight(shape(false), 1023, true, false); }

TEST_F(LlCombine, TwoInFlightStreamOrderedFp8Pow2) {
  inFlight(shape(true, ncclMoeScaleFp32Pow2), 1024, false, false);
}

TEST_F(LlCombine, TwoInFlightHostBetweenSplitFp8Ue8m0) {
  inFlight(shape(true, ncclMoeScaleUe8m0), 1025, true, true);
}

TEST_F(LlCombine, FourInFlightSplitBf16) {
  LlShape s = shape(false);
  s.slots = 4;
  inFlight(s, 1026, true, false);
}

// Two operations whose kernels run at the same time on two streams (dispatch A on stream(),
// dispatch B on sideStream(), then the combines likewise), each with its own weights: the header
// allows operations on different slots to run concurrently on different streams.
TEST_F(LlCombine, TwoOperationsOnTwoStreams) {
  const LlShape s = shape(false);
  const int me = rank();
  LlEp ep(s);
  if (!ep.create()) return;
  LlProblem p[2] = {makeLlProblem(s, spec(1031)), makeLlProblem(s, spec(1032))};
  LlInputs in[2];
  MOE_AGREE_OR_RETURN(in[0].upload(p[0]) && in[1].upload(p[1]), "upload inputs");
  for (int i = 0; i < 2; i++)
    if (!llRunAndCheck(ep, in[i], p[i], LlRunOpts(), s.str() + " [warm-up]")) return;
  bool ok = ep.poisonSlot(0) && ep.poisonSlot(1);
  MOE_AGREE_OR_RETURN(ok, "poison");
  const cudaStream_t st[2] = {stream(), sideStream()};
  ncclMoeLowLatencyOutput_t out[2];
  for (int i = 0; i < 2 && ok; i++)
    ok = MOE_OK(ncclMoeLowLatencyDispatch(ep.comm, in[i].x.get(), in[i].topkIdx.as<int64_t>(),
                                          in[i].weights.as<float>(), p[i].tokens(me), 0, &out[i],
                                          st[i]));
  ok = CUDA_OK(cudaStreamSynchronize(st[0])) && CUDA_OK(cudaStreamSynchronize(st[1])) && ok;
  MOE_AGREE_OR_RETURN(ok, "dispatches on two streams");
  DevMem comb[2];
  for (int i = 0; i < 2; i++) {
    ep.record(out[i], "two streams");
    const std::string tag = s.str() + " [two streams, op " + std::to_string(i) + "]";
    LlBlocks b;
    agreeMismatches(checkLlDispatch(out[i], p[i], llReference(p[i]), tag.c_str(), false, &b),
                    tag.c_str());
    ok = writeIdentityExpert(out[i].combineInput, s, b) && ok;
    ok = comb[i].alloc((size_t)s.maxTokens * s.hidden * 2) && poison(comb[i].get(), comb[i].bytes()) && ok;
  }
  MOE_AGREE_OR_RETURN(ok, "expert outputs");
  for (int i = 0; i < 2 && ok; i++)
    ok = MOE_OK(ncclMoeLowLatencyCombine(ep.comm, &out[i], out[i].combineInput, comb[i].get(), 0,
                                         st[i]));
  ok = CUDA_OK(cudaStreamSynchronize(st[0])) && CUDA_OK(cudaStreamSynchronize(st[1])) && ok;
  MOE_AGREE_OR_RETURN(ok, "combines on two streams");
  for (int i = 0; i < 2; i++) {
    const std::string tag = s.str() + " [two streams, combine " + std::to_string(i) + "]";
    agreeMismatches(checkCombine(comb[i].get(), llIdentityCombine(p[i], true), p[i].tokens(me),
                                 s.hidden, tag.c_str()), tag.c_str());
  }
}

}  // namespace
}  // namespace moe_gpu
