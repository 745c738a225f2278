// Command-line options of the nccl-moe perf binaries (perf/*_perf.cc). Plain C++: no CUDA, NCCL
// or rank code, so the CPU unit tests (tests/unit/perf_options_test.cc) link it alone.
//
// Flag letters follow nccl-tests where the meaning is the same, with tokens per rank where
// nccl-tests has bytes: -b -e -i -f -n -w -c -d. Letters nccl-tests does not use stay for our
// own options (-s -H -k -E); everything else is long-only. Letters that nccl-tests uses for
// something we do not implement (-g -t -N -m -a -o -r -p -z -G -C -R -T -M) are rejected with a
// message that says what they mean there and, where one of our old flags used the letter, which
// long option replaced it. Every option has a long form (getopt_long: `--iters 20`, `--iters=20`).
#pragma once
#include <stdint.h>

#include <functional>
#include <string>
#include <vector>

namespace moe_perf {

// How the perf binaries draw each token's top-k experts (ht_perf takes all three, ll_perf the
// first two): uniform over all experts; skew: the first one among rank 0's experts; group: from
// the experts of groupNodes nodes of the EP context drawn at random per token (DeepSeek-V3's
// node-limited routing; on one node the same distribution as random).
enum class Routing { kRandom, kSkew, kGroup };

struct Options {
  long minTokens = 128;     // -b --min-tokens: first token count of the sweep (tokens per rank)
  long maxTokens = 4096;    // -e --max-tokens: last token count of the sweep
  long stepTokens = 0;      // -i --step-tokens: add this between sizes (0: multiply by -f)
  double stepFactor = 2;    // -f --stepfactor: multiply by this between sizes
  int iters = 20;           // -n --iters: timed iterations per size
  int warmup = 5;           // -w --warmup_iters: untimed iterations before them
  int check = 1;            // -c --check: verify results (1) or not (0)
  bool fp8 = false;         // -d --datatype bf16|fp8: dispatch dtype (combine is always BF16)
  int numSms = 24;          // -s --sms: CTAs per dispatch / combine kernel
  int hidden = 7168;        // -H --hidden: H in elements
  int topK = 8;             // -k --topk
  int numExperts = 256;     // -E --experts: experts in total
  int nRanks = 0;           // --ranks: ranks, one GPU each; 0 = all local GPUs (mpirun: world)
  long maxTokensPerRank = 0;  // --max-tokens-per-rank: the EP context's; 0 = maxTokens
  Routing routing = Routing::kRandom;  // --routing random|skew|group
  int groupNodes = 2;       // --group-nodes: nodes per token with --routing group (at most N)
  uint64_t seed = 0x5eed;   // --seed: seed of the generated routing and data
  std::string output;       // --output FILE: rows as CSV (*.csv) or JSON (*.json); "" = none
};

// An option that one binary adds to the common ones (e.g. ll_perf's --scales).
struct ExtraOption {
  const char* name;      // long name, without "--"
  char shortName;        // 0: long only; else a letter nccl-tests does not use
  const char* valueHint;  // e.g. "fp32|pow2|ue8m0", shown in the help
  const char* help;      // one line, the default included
  std::function<bool(const char* value)> set;  // stores the value; false = bad value
};

// Parses argv into *opt, whose values on entry are the defaults (shown by -h). Returns -1 to go
// on, else the exit code for main: 0 after -h/--help (usage on stdout), 1 after a bad flag or
// value (a message naming it on stderr). Re-entrant in the sense tests need: it resets getopt.
// After success maxTokensPerRank is set (maxTokens when not given).
int parseOptions(int argc, char** argv, const char* progName,
                 const std::vector<ExtraOption>& extras, Options* opt);

// Token counts of the sweep: minTokens, then + stepTokens (or * stepFactor, at least + 1), up to
// and including maxTokens.
std::vector<long> tokenSweep(const Options& opt);

// An ExtraOption value "0" or "1" into *out; false for anything else.
bool parse01(const char* v, bool* out);

const char* dtypeName(bool fp8);
const char* routingName(Routing r);

}  // namespace moe_perf
