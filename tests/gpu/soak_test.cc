// Soak (issue 10): MOE_SOAK_ITERS operations per mode, one test per mode (default 20, the smoke
// version of the normal suite; the soak proper is MOE_SOAK_ITERS=10000 at 2 ranks), on one
// context per mode, every result compared with the CPU reference:
//  - HT: dispatch + combine with the routing cycling through random / one expert / rank 0 only,
//    the token count changing every operation (the same on every rank, or different per rank),
//    the expert output from out.x, out.combineInput or external memory, weighted or not, every
//    16th dispatch with host counts;
//  - LL: groups of numBufferSlots operations, all slots in flight (every dispatch of the group
//    enqueued before any combine), one-shot and split alternating, FP8 cast, block-constant
//    expert outputs, weighted or not;
//  - device memory in use after the context is destroyed equals what it was before (after a
//    warm-up create / destroy, which makes NCCL's own lazy allocations).
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <memory>
#include <string>

#include "ll_test_util.h"

namespace moe_gpu {
namespace {

class Soak : public GpuTest {};

int soakIterations() {
  const char* s = getenv("MOE_SOAK_ITERS");
  const int n = s && *s ? atoi(s) : 20;
  return n > 0 ? n : 20;
}

size_t deviceBytesInUse() {
  size_t freeBytes = 0, total = 0;
  CUDA_OK(cudaMemGetInfo(&freeBytes, &total));
  return total - freeBytes;
}

// Routing and token count of operation i (the same on every rank: a function of i only).
GenSpec soakSpec(uint64_t seed, int i, int maxTokens) {
  const Route routes[3] = {Route::Random, Route::OneExpert, Route::RankZeroOnly};
  GenSpec g = spec(seed + (uint64_t)i, routes[i % 3]);
  g.numTokens = i % 5 == 4 ? -1 : (i * 37 + 11) % (maxTokens + 1);
  g.zeroTokenRank = i % 7 == 6 ? i % nRanks() : -1;
  return g;
}

Shape htShape() {
  Shape s;
  s.hidden = 1024;
  s.maxTokens = 128;
  s.experts = 32;
  return s;
}

LlShape llShape() {
  LlShape s;
  s.hidden = 1024;
  s.maxTokens = 64;
  s.fp8 = true;
  s.fmt = ncclMoeScaleFp32Pow2;
  s.slots = 4;
  return s;
}

// Returns the HT operations that completed their checks.
long soakHt(int iters) {
  const Shape s = htShape();
  Ep ep(s);
  if (!ep.create()) return 0;
  DeviceInputs in;
  const ExpertSrc sources[3] = {ExpertSrc::DispatchX, ExpertSrc::CombineInput, ExpertSrc::Copy};
  long done = 0;
  for (int i = 0; i < iters; i++) {
    Problem p = makeProblem(s, soakSpec(20000, i, s.maxTokens));
    Reference ref = makeReference(p);
    if (!allRanksOk(in.upload(p), "upload inputs")) return done;
    RunOpts o;
    o.src = sources[i % 3];
    o.combineWeighted = i % 2 == 0;
    o.flags = i % 16 == 0 ? NCCL_MOE_DISPATCH_HOST_COUNTS : 0;
    const std::string tag = "soak HT op " + std::to_string(i);
    if (!runAndCheck(ep, in, p, ref, o, tag.c_str())) return done;
    done++;
  }
  return done;
}

// Returns the LL operations that completed their checks.
long soakLl(int iters) {
  const LlShape s = llShape();
  const int n = s.slots, me = rank();
  LlEp ep(s);
  if (!ep.create()) return 0;
  std::vector<std::unique_ptr<LlInputs>> in;
  std::vector<std::unique_ptr<DevMem>> expert, comb;
  bool ok = true;
  for (int i = 0; i < n; i++) {
    in.emplace_back(new LlInputs);
    expert.emplace_back(new DevMem(s.slotRows() * s.hidden * 2));
    comb.emplace_back(new DevMem((size_t)s.maxTokens * s.hidden * 2));
    ok = ok && expert[i]->get() && comb[i]->get() && writeBlockConstantExpert(expert[i]->get(), s);
  }
  if (!allRanksOk(ok, "soak LL buffers")) return 0;
  long done = 0;
  for (int first = 0; first < iters; first += n) {
    const bool split = (first / n) % 2 == 1;
    const std::string what = "soak LL ops " + std::to_string(first) + ".." +
                             std::to_string(first + n - 1) + (split ? " split" : " one-shot");
    std::vector<LlProblem> p;
    for (int i = 0; i < n; i++) {
      p.push_back(makeLlProblem(s, soakSpec(30000, first + i, s.maxTokens)));
      ok = in[i]->upload(p[i]) && ep.poisonSlot((ep.nextSlot + i) % n) &&
           poison(comb[i]->get(), comb[i]->bytes()) && ok;
    }
    if (!allRanksOk(ok, (what + ": inputs and poison").c_str())) return done;
    auto weighted = [&](int i) { return (first + i) % 3 != 2; };
    std::vector<ncclMoeLowLatencyOutput_t> out(n);
    for (int i = 0; i < n && ok; i++)
      ok = runLlDispatch(ep, *in[i], p[i].tokens(me), weighted(i), split, &out[i]);
    ok = CUDA_OK(cudaStreamSynchronize(stream())) && ok;
    if (!allRanksOk(ok, (what + ": dispatches").c_str())) return done;
    for (int i = 0; i < n; i++) {
      ep.record(out[i], what.c_str());
      const std::string tag = what + " op " + std::to_string(first + i);
      agreeMismatches(checkLlDispatch(out[i], p[i], llReference(p[i]), tag.c_str()),
                      (tag + ": dispatch output").c_str());
    }
    for (int i = 0; i < n && ok; i++)
      ok = runLlCombine(ep, out[i], expert[i]->get(), comb[i]->get(), split);
    ok = CUDA_OK(cudaStreamSynchronize(stream())) && ok;
    if (!allRanksOk(ok, (what + ": combines").c_str())) return done;
    for (int i = 0; i < n; i++) {
      const std::string tag = what + " op " + std::to_string(first + i);
      agreeMismatches(checkCombine(comb[i]->get(), llBlockConstantCombine(p[i], weighted(i)),
                                   p[i].tokens(me), s.hidden, tag.c_str()),
                      (tag + ": combine output").c_str());
    }
    done += n;
  }
  allRanksOk(MOE_OK(ncclMoeCheckErrors(ep.comm)), "soak LL ncclMoeCheckErrors");
  return done;
}

// Runs `soak` (returns the operations checked) between two readings of the device memory in
// use, after a warm-up create / destroy of `Context` (NCCL's lazy allocations of a window
// registration and a device communicator happen there).
template <class Context, class ShapeT>
void soakWithMemoryCheck(const char* mode, const ShapeT& shape, long (*soak)(int)) {
  const int iters = soakIterations();
  {
    Context warmUp(shape);
    if (!warmUp.create()) return;
  }
  sideStream();  // the split runners' stream and scratch, made once per process
  // A window's memory is returned to the device only when every rank has unmapped it: each
  // reading waits until every rank has finished its destroy (a peer still holding the warm-up's
  // or the soak's window would move this rank's reading).
  allRanksOk(true, "warm-up context destroyed on every rank");
  const size_t before = deviceBytesInUse();
  const long done = soak(iters);
  allRanksOk(true, "soak context destroyed on every rank");
  const size_t after = deviceBytesInUse();
  EXPECT_GE(done, iters) << "rank " << rank() << ": " << mode << " soak stopped early";
  EXPECT_EQ(after, before) << "rank " << rank() << ": device memory in use grew by "
                           << (long long)(after - before) << " bytes";
  if (rank() == 0) {
    printf("[   INFO   ] soak: %ld %s operations checked against the reference, %s; device memory "
           "in use before %zu, after %zu bytes\n",
           done, mode, ::testing::Test::HasFailure() ? "WITH FAILURES" : "0 mismatches", before, after);
    fflush(stdout);
  }
}

TEST_F(Soak, HighThroughputAgainstReference) { soakWithMemoryCheck<Ep>("HT", htShape(), soakHt); }

TEST_F(Soak, LowLatencyAllSlotsInFlightAgainstReference) {
  soakWithMemoryCheck<LlEp>("LL", llShape(), soakLl);
}

}  // namespace
}  // namespace moe_gpu
