// Shared harness of the nccl-moe perf binaries (perf/*_perf.cc), in the style of nccl-tests:
// flag parsing, the header, timing with CUDA events, reductions of per-rank results and the
// result tables. Ranks are started by tests/common/ranks.h (fork mode or mpirun).
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
#include "../tests/common/ranks.h"
#include "../tests/common/rng.h"

namespace moe_perf {

enum class Routing { kRandom, kSkew };

struct Options {
  long minTokens = 128;     // -b: first token count of the sweep (tokens per rank)
  long maxTokens = 4096;    // -e: last token count of the sweep
  double stepFactor = 2;    // -f: multiply by this between sizes (when stepTokens == 0)
  long stepTokens = 0;      // -i: add this between sizes instead (0 = use -f)
  int hidden = 7168;        // -H: H in elements
  int topK = 8;             // -k
  int numExperts = 256;     // -E: experts in total
  int numSms = 24;          // -s: CTAs per dispatch / combine kernel
  ncclMoeDtype_t dtype = ncclMoeBf16;  // -d bf16|fp8: dispatch dtype (combine is always BF16)
  int iters = 20;           // -n: timed iterations per size
  int warmup = 5;           // -w: untimed iterations before them
  int check = 1;            // -c: verify results (1) or not (0)
  int nRanks = 0;           // -g / -N: ranks (one GPU each); 0 = all local GPUs
  Routing routing = Routing::kRandom;  // -r random|skew
  long maxTokensPerRank = 0;  // -m: config.maxTokensPerRank; 0 = maxTokens (-e)
  uint64_t seed = 0x5eed;   // -S: seed of the generated routing and data
};

// Parses argv. Returns -1 to go on, else the exit code for main (help printed: 0; bad flag: 1).
// Touches no CUDA (it runs in the fork-mode parent).
int parseOptions(int argc, char** argv, const char* progName, Options* opt);

// Token counts of the sweep, minTokens..maxTokens.
std::vector<long> tokenSweep(const Options& opt);

// Collective. Prints (rank 0 only, rank lines in rank order) the program name, NCCL and
// nccl-moe versions, the options and one line per rank with its host, pid, device and card name.
// The device must already be set (after moe_ranks::initComm).
void printHeader(const char* progName, const Options& opt, const moe_ranks::RankEnv& env);

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

// --- timing ------------------------------------------------------------------------------------
// Runs `op` warmup times, synchronises `stream`, waits for all ranks (host barrier), then times
// `iters` runs of `op` on `stream` with CUDA events. Returns this rank's average time per run in
// microseconds. Collective (the barrier).
double timeUs(cudaStream_t stream, int warmup, int iters, const std::function<void()>& op);

// Enqueues a one-thread kernel that spins for `us` microseconds on `stream` (perf/hold_stream.cu):
// calls enqueued behind it start back to back on the GPU, without the host's launch gaps.
void holdStream(cudaStream_t stream, double us);

// --- result rows -----------------------------------------------------------------------------
struct Row {
  long tokens = 0;
  double timeUs = 0;   // max over ranks of the per-rank average time
  double algbw = 0;    // GB/s, min over ranks of (bytes incl. local / time)
  double busbw = 0;    // GB/s, min over ranks of (bytes from other ranks / time)
  bool hasBw = false;  // false: layout (time only)
  bool checked = false;
  long long wrong = 0; // wrong elements summed over ranks (when checked)
};

// Collective: reduces this rank's numbers into one row. localBytes / remoteBytes: bytes this rank
// counts for algbw / busbw (ignored when !hasBw); localWrong: this rank's wrong elements.
Row reduceRow(long tokens, double localTimeUs, bool hasBw, double localBytes, double remoteBytes,
              bool checked, long long localWrong);

// Rank 0 prints one table: a title line, the column names and one line per row.
void printTable(const char* opName, const std::vector<Row>& rows);

// Rank 0 prints a line of free text prefixed with "# ".
void printNote(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// --- host helpers for generating and checking data -------------------------------------------

using moe_rng::Rng;  // tests/common/rng.h

// A seed from several integers (e.g. base seed, rank, token count, stream id).
uint64_t mixSeed(uint64_t a, uint64_t b, uint64_t c, uint64_t d);

}  // namespace moe_perf
