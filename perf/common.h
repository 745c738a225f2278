// Shared harness of the nccl-moe perf binaries (perf/*_perf.cc), in the style of nccl-tests: a
// binary declares a PerfTest (its EP mode, how its calls are timed, its own options) whose setup
// returns its operations (PerfOp: run, bytes, check), and perfMain does the rest: options
// (options.h), ranks (testing/ranks.h: fork mode or mpirun), the EP context, the header,
// the sweep over token counts, timing with CUDA events, reductions over ranks, one table line
// per (size, operation) as soon as it is measured, the --output file (report.h), nccl-tests'
// summary lines and the exit code (non-zero when any checked value was wrong). Across nodes the
// table and the file get the rdmabw / nvlbw columns (PerfOp::netBytes) and, with the loopback
// plugin loaded, a line per operation with its puts' hop times (plugin_hops.h).
//
// Conventions: token counts are tokens per rank (T); sizes in bytes unless a name says
// elements; times in microseconds; bandwidths in GB/s with 1 GB = 1e9 bytes.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include <functional>
#include <string>
#include <vector>

#include <cuda_runtime.h>
#include <nccl.h>

#include "nccl_moe.h"
#include "options.h"
#include "report.h"
#include "../testing/ranks.h"
#include "../testing/rng.h"

namespace moe_perf {

// How the harness times each operation of a binary.
enum class Timing {
  // `iters` calls back to back between two events (nccl-tests): time = average per call; the
  // host's launches overlap the GPU's work. PerfOp::pre / post must be empty.
  kBackToBack,
  // Each call alone between two events, after PerfOp::pre and a meeting of the ranks on the host:
  // time = median per call, p99 reported; the time includes the host's launch of the call.
  kEachCall,
  // As kEachCall, but a kernel spinning kHoldUs holds the stream while the call and its events
  // are enqueued, so the events time the GPU's work only (as a profiler's kernel times).
  kEachCallHeld,
};
constexpr double kHoldUs = 200;  // longer than the host needs to enqueue one timed call

// One operation of a perf binary (nccl-tests' testColl). Every function is called on every rank
// and may be collective; those marked optional may be left empty.
struct PerfOp {
  std::string name;                  // table / file column "op"; no spaces
  std::function<void(long T)> init;  // optional: untimed, once per size before the timing
  std::function<void()> pre;         // optional (kEachCall*): enqueued before each timed call;
                                     // the ranks meet after it, before the timed call
  std::function<void()> run;         // enqueues one call on the stream: the timed part
  int callsPerRun = 1;               // operations run() enqueues: times (and p99) are per operation
  std::function<void()> post;        // optional (kEachCall*): enqueued after each timed call
  // Optional: bytes this rank counts at size T for algbw (received, its own share included) and
  // busbw (bytes that crossed NVLink). Empty: the row has a time only.
  std::function<void(long T, double* algBytes, double* busBytes)> bytes;
  // Optional, used only when the EP context spans several nodes: bytes this rank's NIC sends
  // (rdmabw) and bytes it moves over NVLink in the internode path (nvlbw) at size T.
  std::function<void(long T, double* rdmaBytes, double* nvlinkBytes)> netBytes;
  // Optional: runs the operation once more on poisoned outputs, compares with what the host
  // expects and returns this rank's wrong elements. Empty: #wrong is N/A.
  std::function<long long(long T)> check;
};

// What perfMain hands a binary once the EP context exists.
struct Context {
  moe_ranks::RankEnv env;
  const Options* opt = nullptr;
  ncclComm_t comm = nullptr;
  ncclMoeComm_t moe = nullptr;
  int nNodes = 1;                 // nodes the EP context spans (ncclMoeCommNodeCount)
  cudaStream_t stream = nullptr;  // non-blocking; every operation runs on it
};

// One perf binary (nccl-tests' testEngine).
struct PerfTest {
  const char* name = nullptr;  // program name (ht_perf, ll_perf)
  ncclMoeMode_t mode = ncclMoeHighThroughput;
  Timing timing = Timing::kBackToBack;  // an extra option may change it before setup
  std::vector<ExtraOption> extraOptions;
  // Optional, CPU only, before any rank starts: "" or why these options cannot run.
  std::function<std::string(const Options&)> validate;
  // Optional: config fields beyond the common options (mode, E, H, K, maxTokensPerRank, dtype,
  // numSms are set from Options).
  std::function<void(ncclMoeConfig_t*)> configure;
  // Optional: the binary's own run parameters for the header and the --output file (called
  // after setup).
  std::function<Params()> params;
  // Once: allocates, returns the operations in the order they run at each size.
  std::function<std::vector<PerfOp>(const Context&)> setup;
  // Each size, before its operations: generates and uploads the inputs.
  std::function<void(long T)> prepare;
  // Optional: frees what setup allocated (the EP context and stream are perfMain's).
  std::function<void()> teardown;
};

// Runs a perf binary; main() returns its result. `opt` holds the binary's defaults.
int perfMain(int argc, char** argv, Options opt, PerfTest* test);

// Waits for the stream, reports errors the kernels detected (ncclMoeCheckErrors), then waits
// for all ranks (host barrier). Collective.
void quiesce(const Context& ctx);

// --- error handling: print where and why, then end this rank with exit code 1 (fork mode: the
// parent stops the other ranks; MPI: MPI_Abort) ----------------------------------------------
[[noreturn]] void fail(const char* file, int line, const char* call, const char* why);
void checkCuda(cudaError_t err, const char* file, int line, const char* call);
void checkNccl(ncclResult_t res, const char* file, int line, const char* call);
void checkMoe(ncclResult_t res, const char* file, int line, const char* call);

#define PERF_CUDA(call) ::moe_perf::checkCuda((call), __FILE__, __LINE__, #call)
#define PERF_NCCL(call) ::moe_perf::checkNccl((call), __FILE__, __LINE__, #call)
// nccl-moe calls: on failure prints ncclMoeGetLastError(); on success also checks
// cudaGetLastError() so that a failed kernel launch inside the call is caught here.
#define PERF_MOE(call) ::moe_perf::checkMoe((call), __FILE__, __LINE__, #call)

// Enqueues a one-thread kernel that spins for `us` microseconds on `stream` (perf/hold_stream.cu):
// calls enqueued behind it start back to back on the GPU, without the host's launch gaps.
void holdStream(cudaStream_t stream, double us);

// --- host helpers for generating data ---------------------------------------------------------
using moe_rng::Rng;  // testing/rng.h

// A seed from several integers (e.g. base seed, rank, token count, stream id).
uint64_t mixSeed(uint64_t a, uint64_t b, uint64_t c, uint64_t d);

}  // namespace moe_perf
