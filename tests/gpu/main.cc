// main() of the multi-GPU tests: one process per GPU (testing/ranks.h starts them), each
// running the whole suite on its own device with one NCCL communicator over all ranks.
//   gpu_tests [--ngpus=N] [gtest flags]      N = 0 (default): all local GPUs
// Only rank 0 prints gtest's output; other ranks print their own failures, prefixed with their
// rank, and exit with their own status (the launcher combines them). Without at least two GPUs
// the suite is reported as skipped and the program exits 0.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <string>

#include "gpu_env.h"

namespace {

// Creates the communicator and the stream all tests use, once.
class CommEnvironment : public ::testing::Environment {
 public:
  explicit CommEnvironment(const moe_ranks::RankEnv& env) : env_(env) {}

  void SetUp() override {
    moe_gpu::setGlobal(env_.rank, env_.nRanks, nullptr, nullptr);
    bool ok = MOE_OK(moe_ranks::initComm(env_, &comm_));
    if (!ok) comm_ = nullptr;
    ok = CUDA_OK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking)) && ok;
    if (!moe_gpu::allRanksOk(ok, "communicator setup")) {
      FAIL() << "rank " << env_.rank << ": cannot set up the communicator; no test runs";
    }
    moe_gpu::setGlobal(env_.rank, env_.nRanks, comm_, stream_);
    if (env_.rank == 0) {
      int version = 0, dev = -1;
      cudaDeviceProp prop;
      memset(&prop, 0, sizeof(prop));
      MOE_OK(ncclMoeGetVersion(&version));
      CUDA_OK(cudaGetDevice(&dev));
      CUDA_OK(cudaGetDeviceProperties(&prop, dev));
      printf("nccl-moe GPU tests: %d ranks, %s (%d SMs), nccl-moe %d\n", env_.nRanks, prop.name,
             prop.multiProcessorCount, version);
      fflush(stdout);
    }
  }

  void TearDown() override {
    if (stream_) {
      CUDA_OK(cudaStreamSynchronize(stream_));
      CUDA_OK(cudaStreamDestroy(stream_));
    }
    if (comm_) {
      MOE_OK(ncclCommFinalize(comm_));
      MOE_OK(ncclCommDestroy(comm_));
    }
    stream_ = nullptr;
    comm_ = nullptr;
    moe_gpu::setGlobal(env_.rank, env_.nRanks, nullptr, nullptr);
  }

 private:
  moe_ranks::RankEnv env_;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
};

// Output of ranks other than 0: their failures only, prefixed with the rank and the test.
// The test's name is kept from OnTestStart: gtest calls OnTestPartResult with UnitTest's mutex
// held, and current_test_info() takes it again (a self-deadlock that silenced a failing rank
// forever while its peers waited for it in the next collective).
class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  void OnTestStart(const ::testing::TestInfo& t) override {
    test_ = std::string(t.test_suite_name()) + "." + t.name();
  }
  void OnTestEnd(const ::testing::TestInfo&) override { test_ = "(environment)"; }
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (!r.failed()) return;
    fprintf(stderr, "[rank %d] %s %s:%d: Failure\n%s\n", rank_, test_.c_str(),
            r.file_name() ? r.file_name() : "?", r.line_number(), r.message());
    fflush(stderr);
  }

 private:
  int rank_;
  std::string test_ = "(environment)";
};

// Removes --ngpus=N (or --ngpus N) from argv; returns N (0 when absent).
int takeNgpus(int* argc, char** argv) {
  int n = 0, out = 1;
  for (int i = 1; i < *argc; i++) {
    const char* a = argv[i];
    if (strncmp(a, "--ngpus=", 8) == 0) {
      n = atoi(a + 8);
    } else if (strcmp(a, "--ngpus") == 0 && i + 1 < *argc) {
      n = atoi(argv[++i]);
    } else {
      argv[out++] = argv[i];
    }
  }
  *argc = out;
  argv[out] = nullptr;
  return n;
}

// Why this rank cannot run the tests ("" when it can). `failure` is set when the launcher
// could not start the ranks although enough GPUs exist (an error, not a skip).
std::string whySkip(const moe_ranks::RankEnv& env, bool started, bool* failure) {
  *failure = false;
  int count = 0;
  if (!started) {  // no rank was forked: this process may use CUDA now
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) return std::string("no usable GPU: ") + cudaGetErrorString(err);
    if (count < 2) return "need at least 2 GPUs, " + std::to_string(count) + " visible";
    *failure = true;
    return "the launcher could not start the ranks (" + std::to_string(count) +
           " GPUs visible; see its message above)";
  }
  if (env.nRanks <= 0) return "no CUDA device found";
  if (env.nRanks < 2)
    return "need at least 2 GPUs, the launcher started " + std::to_string(env.nRanks) + " rank";
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess)
    return std::string("cudaGetDeviceCount failed: ") + cudaGetErrorString(err);
  if (env.localRank >= count)
    return "rank " + std::to_string(env.rank) + " needs device " +
           std::to_string(env.localRank) + " but only " + std::to_string(count) +
           " are visible";
  return "";
}

}  // namespace

int main(int argc, char** argv) {
  const int ngpus = takeNgpus(&argc, argv);
  moe_ranks::RankEnv env;
  const bool started = moe_ranks::start(ngpus, &env);  // before any CUDA call
  ::testing::InitGoogleTest(&argc, argv);

  bool failure = false;
  const std::string reason = whySkip(env, started, &failure);
  if (failure) {
    fprintf(stderr, "nccl-moe GPU tests: FAILED: %s\n", reason.c_str());
    return moe_ranks::finish(1);
  }
  if (env.rank != 0) {
    ::testing::TestEventListeners& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new RankFailurePrinter(env.rank));
  }
  if (!reason.empty()) {
    if (env.rank == 0) {
      printf("nccl-moe GPU tests: SKIPPED: %s\n", reason.c_str());
      fflush(stdout);
    }
    moe_gpu::setSkipReason(reason);  // every test reports skipped
  } else {
    ::testing::AddGlobalTestEnvironment(new CommEnvironment(env));
  }
  return moe_ranks::finish(RUN_ALL_TESTS());
}
