// Fault injection (issue 10): a rank that exits in the middle of an operation. Runs only when
// MOE_FAULT_TEST=1, alone, because the process that exits leaves no peer for later collectives:
//   MOE_FAULT_TEST=1 gpu_tests --ngpus=2 --gtest_filter=Fault.*
// The last rank enqueues a dispatch, lets its kernel publish its counts and wait for the peers,
// then exits (_exit(0)). The survivors dispatch 0.5 s later: they find its counts, send, and
// wait for its completion signals that never come. Expected on every survivor: the dispatch ends
// with ncclSystemError "timeout" within timeoutMs (measured from the call), and
// ncclMoeCommDestroy returns (a watchdog fails the rank if it has not after 30 s). The
// survivors then end their process directly (the NCCL communicator of the harness cannot be
// finalised without the lost rank) with status 0 on success; gtest's summary is not printed.
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <string>
#include <thread>

#include "gpu_env.h"

namespace moe_gpu {
namespace {

class Fault : public GpuTest {};

TEST_F(Fault, RankExitsDuringDispatch) {
  if (!getenv("MOE_FAULT_TEST"))
    GTEST_SKIP() << "set MOE_FAULT_TEST=1 and run Fault.* alone (a rank exits)";
  using Clock = std::chrono::steady_clock;
  Shape s;
  s.hidden = 2048;
  s.maxTokens = 128;
  s.timeoutMs = 3000;
  const int me = rank(), quitter = nRanks() - 1;
  Ep ep(s);
  if (!ep.create()) return;
  Problem p = makeProblem(s, spec(1601));
  Reference ref = makeReference(p);
  DeviceInputs in;
  MOE_AGREE_OR_RETURN(in.upload(p), "upload inputs");
  if (!runAndCheck(ep, in, p, ref, RunOpts(), "fault test [healthy operation first]")) return;
  moe_ranks::barrier();  // the last collective step with every rank

  ncclMoeDispatchOutput_t out;
  if (me == quitter) {
    MOE_OK(ncclMoeDispatch(ep.comm, in.x.get(), nullptr, in.topkIdx.as<int64_t>(), nullptr,
                           p.tokens(me), 0, &ep.handle, &out, stream()));
    usleep(200 * 1000);
    printf("[  FAULT   ] rank %d exits in the middle of a dispatch\n", me);
    fflush(stdout);
    _exit(0);
  }
  usleep(500 * 1000);
  const Clock::time_point t0 = Clock::now();
  MOE_OK(ncclMoeDispatch(ep.comm, in.x.get(), nullptr, in.topkIdx.as<int64_t>(), nullptr,
                         p.tokens(me), 0, &ep.handle, &out, stream()));
  CUDA_OK(cudaStreamSynchronize(stream()));
  const double took = std::chrono::duration<double>(Clock::now() - t0).count();
  const ncclResult_t r = ncclMoeCheckErrors(ep.comm);
  const std::string msg = ncclMoeGetLastError();
  EXPECT_EQ(r, ncclSystemError) << "rank " << me << ": " << msg;
  EXPECT_NE(msg.find("timeout"), std::string::npos) << "rank " << me << ": " << msg;
  EXPECT_LT(took, s.timeoutMs / 1000.0 + 1.5) << "rank " << me << ": no timeout within timeoutMs";

  std::atomic<bool> destroyed(false);
  std::thread watchdog([&] {
    for (int i = 0; i < 300 && !destroyed.load(); i++) usleep(100 * 1000);
    if (destroyed.load()) return;
    fprintf(stderr, "[  FAULT   ] rank %d: FAILED: ncclMoeCommDestroy did not return within 30 s\n", me);
    _exit(1);
  });
  ep.destroyHandle();
  const bool ok = MOE_OK(ncclMoeCommDestroy(ep.comm));
  ep.comm = nullptr;
  destroyed = true;
  watchdog.join();
  const bool failed = ::testing::Test::HasFailure() || !ok;
  printf("[  FAULT   ] rank %d: dispatch ended after %.2f s with %d \"%s\"; destroy %s; %s\n", me,
         took, int(r), msg.c_str(), ok ? "returned" : "failed", failed ? "FAILED" : "PASSED");
  fflush(stdout);
  fflush(stderr);
  _exit(failed ? 1 : 0);
}

}  // namespace
}  // namespace moe_gpu
