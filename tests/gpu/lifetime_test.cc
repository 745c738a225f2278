// Issue 10 items 5 and 9 on GPUs: stale handles and LL outputs, destroyed objects, pointer
// arguments the device cannot read, in-window expert outputs outside the documented regions,
// and creation / destruction without memory growth. Every rank makes the same calls (rejected
// calls are local and enqueue nothing, so the collectives stay aligned).
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <string>
#include <vector>

#include "gpu_env.h"
#include "ll_test_util.h"

namespace moe_gpu {
namespace {

class GpuLifetime : public GpuTest {};

// Expects `res` == `code` and a message containing `word`; returns whether it held.
bool expectRejected(ncclResult_t res, ncclResult_t code, const char* word, const char* what) {
  const std::string msg = ncclMoeGetLastError();
  EXPECT_EQ(res, code) << what << ": " << msg;
  EXPECT_NE(msg.find(word), std::string::npos) << what << ": \"" << msg << "\" lacks " << word;
  return res == code;
}

// combine(h1) after dispatch(h2) on the same context is refused; h2 still combines correctly.
TEST_F(GpuLifetime, CombineOfOlderHandleRejected) {
  const Shape s = smallShape();
  Ep ep(s);
  if (!ep.create()) return;
  Problem p = makeProblem(s, spec(801));
  Reference ref = makeReference(p);
  DeviceInputs in;
  MOE_AGREE_OR_RETURN(in.upload(p), "upload");
  const int T = p.tokens(rank());
  ncclMoeHandle_t h1 = nullptr, h2 = nullptr;
  ncclMoeDispatchOutput_t out1, out2;
  bool ok = MOE_OK(ncclMoeDispatch(ep.comm, in.x.get(), nullptr, in.topkIdx.as<int64_t>(), nullptr, T, 0, &h1,
                                   &out1, stream()));
  ok = ok && MOE_OK(ncclMoeDispatch(ep.comm, in.x.get(), nullptr, in.topkIdx.as<int64_t>(), nullptr, T, 0, &h2,
                                    &out2, stream()));
  DevMem combined((size_t)s.maxTokens * s.hidden * 2);
  if (ok) {
    ok = expectRejected(ncclMoeCombine(ep.comm, h1, out1.x, nullptr, combined.get(), stream()), ncclInvalidUsage,
                        "dispatch", "combine(h1) after dispatch(h2)");
    ok = MOE_OK(ncclMoeCombine(ep.comm, h2, out2.x, nullptr, combined.get(), stream())) && ok;
  }
  ok = CUDA_OK(cudaStreamSynchronize(stream())) && ok;
  if (h1) ok = MOE_OK(ncclMoeHandleDestroy(h1)) && ok;
  if (h2) ok = MOE_OK(ncclMoeHandleDestroy(h2)) && ok;
  allRanksOk(ok, "stale handle");
}

// Double destroy and use after destroy, of a handle and of a context: ncclInvalidArgument.
TEST_F(GpuLifetime, DestroyedHandleAndContextRejected) {
  const Shape s = smallShape();
  ncclMoeConfig_t cfg = makeConfig(s);
  ncclMoeComm_t c = nullptr;
  MOE_AGREE_OR_RETURN(MOE_OK(ncclMoeCommCreate(comm(), &cfg, &c)), "create");
  Problem p = makeProblem(s, spec(802));
  DeviceInputs in;
  bool ok = in.upload(p);
  ncclMoeHandle_t h = nullptr;
  ncclMoeDispatchOutput_t out;
  ok = ok && MOE_OK(ncclMoeDispatch(c, in.x.get(), nullptr, in.topkIdx.as<int64_t>(), nullptr, p.tokens(rank()), 0,
                                    &h, &out, stream()));
  ok = CUDA_OK(cudaStreamSynchronize(stream())) && ok;
  if (h) {
    ok = MOE_OK(ncclMoeHandleDestroy(h)) && ok;
    ok = expectRejected(ncclMoeHandleDestroy(h), ncclInvalidArgument, "handle", "double handle destroy") && ok;
    ok = expectRejected(ncclMoeCombine(c, h, out.x, nullptr, in.x.get(), stream()), ncclInvalidArgument, "handle",
                        "combine with a destroyed handle") && ok;
  }
  ok = MOE_OK(ncclMoeCommDestroy(c)) && ok;
  ok = expectRejected(ncclMoeCommDestroy(c), ncclInvalidArgument, "moeComm", "double context destroy") && ok;
  ok = expectRejected(ncclMoeCheckErrors(c), ncclInvalidArgument, "moeComm", "check after destroy") && ok;
  ncclMoeHandle_t fresh = nullptr;
  ok = expectRejected(ncclMoeDispatch(c, in.x.get(), nullptr, in.topkIdx.as<int64_t>(), nullptr, 0, 0, &fresh, &out,
                                      stream()), ncclInvalidArgument, "moeComm", "dispatch after destroy") && ok;
  EXPECT_EQ(fresh, nullptr);
  allRanksOk(ok, "destroyed objects");
}

// An LL combine given a zeroed output struct, or the output of a dispatch whose slot was used
// again since, is refused; the current output still combines.
TEST_F(GpuLifetime, LowLatencyZeroedOrReusedOutputRejected) {
  LlShape s;
  s.hidden = 1024;
  s.maxTokens = 32;
  s.slots = 2;
  LlEp ep(s);
  if (!ep.create()) return;
  LlProblem p = makeLlProblem(s, spec(803));
  LlInputs in;
  MOE_AGREE_OR_RETURN(in.upload(p), "upload");
  const int T = p.tokens(rank());
  DevMem expert(s.slotRows() * s.hidden * 2), combined((size_t)s.maxTokens * s.hidden * 2);
  std::vector<ncclMoeLowLatencyOutput_t> outs(s.slots + 1);
  bool ok = true;
  for (size_t i = 0; i < outs.size() && ok; ++i) {  // slot 0, 1, then slot 0 again
    ok = MOE_OK(ncclMoeLowLatencyDispatch(ep.comm, in.x.get(), in.topkIdx.as<int64_t>(), nullptr, T, 0, &outs[i],
                                          stream()));
    if (ok && i < outs.size() - 1)
      ok = MOE_OK(ncclMoeLowLatencyCombine(ep.comm, &outs[i], expert.get(), combined.get(), 0, stream()));
  }
  if (ok) {
    ncclMoeLowLatencyOutput_t zero;
    memset(&zero, 0, sizeof(zero));
    ok = expectRejected(ncclMoeLowLatencyCombine(ep.comm, &zero, expert.get(), combined.get(), 0, stream()),
                        ncclInvalidArgument, "sequence", "zeroed output") && ok;
    ok = expectRejected(ncclMoeLowLatencyCombine(ep.comm, &outs[0], expert.get(), combined.get(), 0, stream()),
                        ncclInvalidUsage, "stale", "output of a reused slot") && ok;
    ok = MOE_OK(ncclMoeLowLatencyCombine(ep.comm, &outs.back(), expert.get(), combined.get(), 0, stream())) && ok;
  }
  ok = CUDA_OK(cudaStreamSynchronize(stream())) && ok;
  ok = MOE_OK(ncclMoeCheckErrors(ep.comm)) && ok;
  allRanksOk(ok, "LL output generations");
}

// Host (pageable) memory as topkIdx, a misaligned topkIdx, and an in-window expertOut that is
// neither combineInput nor x: rejected before any kernel runs; the context still works.
TEST_F(GpuLifetime, BadPointerArgumentsRejectedContextStillWorks) {
  const Shape s = smallShape();
  Ep ep(s);
  if (!ep.create()) return;
  Problem p = makeProblem(s, spec(804));
  Reference ref = makeReference(p);
  DeviceInputs in;
  MOE_AGREE_OR_RETURN(in.upload(p), "upload");
  const int T = p.tokens(rank());
  int pageable = 0;
  int dev = 0;
  bool ok = CUDA_OK(cudaGetDevice(&dev)) &&
            CUDA_OK(cudaDeviceGetAttribute(&pageable, cudaDevAttrPageableMemoryAccess, dev));
  std::vector<int64_t> hostIdx((size_t)s.maxTokens * s.topK, 0);
  ncclMoeDispatchOutput_t out;
  if (ok && !pageable) {
    ok = expectRejected(ncclMoeDispatch(ep.comm, in.x.get(), nullptr, hostIdx.data(), nullptr, T, 0, &ep.handle,
                                        &out, stream()), ncclInvalidArgument, "topkIdx", "host topkIdx");
    EXPECT_EQ(ep.handle, nullptr);
  }
  ok = expectRejected(ncclMoeDispatch(ep.comm, in.x.get(), nullptr, (const int64_t*)(in.topkIdx.as<char>() + 4),
                                      nullptr, T, 0, &ep.handle, &out, stream()),
                      ncclInvalidArgument, "topkIdx", "misaligned topkIdx") && ok;
  MOE_AGREE_OR_RETURN(ok, "rejected dispatches");
  RunOpts o;
  o.combine = false;
  if (!runAndCheck(ep, in, p, ref, o, "dispatch after rejected pointers")) return;
  DevMem combined((size_t)s.maxTokens * s.hidden * 2);
  const char* inside = (const char*)ep.lastOut.combineInput + 16 * s.hidden * 2;  // 16 rows in
  ok = expectRejected(ncclMoeCombine(ep.comm, ep.handle, inside, nullptr, combined.get(), stream()),
                      ncclInvalidArgument, "combineInput", "in-window expertOut at another offset");
  ok = MOE_OK(ncclMoeCombine(ep.comm, ep.handle, ep.lastOut.combineInput, nullptr, combined.get(), stream())) && ok;
  ok = CUDA_OK(cudaStreamSynchronize(stream())) && MOE_OK(ncclMoeCheckErrors(ep.comm)) && ok;
  allRanksOk(ok, "pointer checks");
}

// Resident set size of this process in bytes (/proc/self/statm).
size_t residentBytes() {
  FILE* f = fopen("/proc/self/statm", "r");
  long pages = 0, resident = 0;
  if (f) {
    if (fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = 0;
    fclose(f);
  }
  return (size_t)resident * 4096;
}

// 200 collective creations and destructions (with one dispatch each, so the handle path is
// exercised too) leave device and host memory where they were after a warm-up.
TEST_F(GpuLifetime, CreateDestroy200TimesNoMemoryGrowth) {
  const Shape s = smallShape();
  ncclMoeConfig_t cfg = makeConfig(s);
  auto cycle = [&](int n) {
    bool ok = true;
    for (int i = 0; i < n && ok; ++i) {
      ncclMoeComm_t c = nullptr;
      ok = MOE_OK(ncclMoeCommCreate(comm(), &cfg, &c));
      if (ok) ok = MOE_OK(ncclMoeCommDestroy(c));
    }
    return allRanksOk(ok, "create/destroy cycle");
  };
  if (!cycle(5)) return;  // warm-up: NCCL's own lazily created resources
  size_t freeBefore = 0, freeAfter = 0, total = 0;
  MOE_AGREE_OR_RETURN(CUDA_OK(cudaMemGetInfo(&freeBefore, &total)), "memory before");
  const size_t rssBefore = residentBytes();
  if (!cycle(200)) return;
  MOE_AGREE_OR_RETURN(CUDA_OK(cudaMemGetInfo(&freeAfter, &total)), "memory after");
  const size_t rssAfter = residentBytes();
  const long long deviceGrowth = (long long)freeBefore - (long long)freeAfter;
  const long long hostGrowth = (long long)rssAfter - (long long)rssBefore;
  if (rank() == 0)
    printf("[   INFO   ] 200 create/destroy: device memory %+lld bytes, host RSS %+lld bytes\n", deviceGrowth,
           hostGrowth);
  // One leaked window is ~1 MiB here: 200 of them would be far above these bounds.
  EXPECT_LE(deviceGrowth, 8ll << 20) << "device memory grew";
  EXPECT_LE(hostGrowth, 16ll << 20) << "host memory grew";
}

}  // namespace
}  // namespace moe_gpu
