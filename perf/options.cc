// Command-line options of the perf binaries; see options.h.
#include "options.h"

#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

namespace moe_perf {
namespace {

// getopt_long values of the long-only options (above every char).
enum LongOnly {
  kRanks = 256, kMaxTokensPerRank, kRouting, kGroupNodes, kSeed, kOutput, kFirstExtra = 512
};

struct CommonOption {
  const char* name;
  int val;         // the short letter, or a LongOnly value
  bool hasValue;
};

// Letters nccl-tests gives a meaning we do not implement, and what replaced our old use of some.
struct Reserved {
  char letter;
  const char* ncclTestsMeaning;  // nullptr: not an nccl-tests flag
  const char* replacedBy;        // nullptr: we never used the letter
};
constexpr Reserved kReserved[] = {
    {'g', "GPUs per thread", "--ranks (total ranks)"},
    {'t', "threads per process", nullptr},
    {'N', "run cycles", "--ranks (total ranks)"},
    {'m', "aggregated iterations", "--max-tokens-per-rank"},
    {'a', "how times are averaged over ranks", nullptr},
    {'o', "reduction operation", nullptr},
    {'r', "root rank", "--routing"},
    {'p', "parallel init", nullptr},
    {'z', "blocking collectives", nullptr},
    {'G', "CUDA graph launches", "--hold-stream (ll_perf)"},
    {'C', "report CPU time", nullptr},
    {'R', "local buffer registration", nullptr},
    {'T', "timeout", nullptr},
    {'M', "memory report", nullptr},
    {'S', nullptr, "--seed"},
};

bool parseLong(const char* s, long minValue, long* out) {
  char* end = nullptr;
  errno = 0;
  long v = strtol(s, &end, 0);
  if (errno != 0 || end == s || *end != '\0' || v < minValue) return false;
  *out = v;
  return true;
}

bool parseInt(const char* s, long minValue, long maxValue, int* out) {
  long v = 0;
  if (!parseLong(s, minValue, &v) || v > maxValue) return false;
  *out = (int)v;
  return true;
}

void printUsage(const char* prog, const Options& d, const std::vector<ExtraOption>& extras) {
  printf("Usage: %s [options]   (token counts are tokens per rank)\n", prog);
  auto line = [](char letter, const char* name, const char* hint, const char* help) {
    char flags[64];
    snprintf(flags, sizeof(flags), "%c%c%s--%s %s", letter ? '-' : ' ', letter ? letter : ' ',
             letter ? ", " : "  ", name, hint ? hint : "");
    printf("  %-38s %s\n", flags, help);
  };
  char h[160];
  snprintf(h, sizeof(h), "first token count of the sweep (default %ld)", d.minTokens);
  line('b', "min-tokens", "<T>", h);
  snprintf(h, sizeof(h), "last token count of the sweep (default %ld)", d.maxTokens);
  line('e', "max-tokens", "<T>", h);
  line('i', "step-tokens", "<T>", "add this between token counts instead of -f");
  snprintf(h, sizeof(h), "multiply the token count by this between sizes (default %g)",
           d.stepFactor);
  line('f', "stepfactor", "<f>", h);
  snprintf(h, sizeof(h), "timed iterations per size (default %d)", d.iters);
  line('n', "iters", "<n>", h);
  snprintf(h, sizeof(h), "warm-up iterations per size (default %d)", d.warmup);
  line('w', "warmup_iters", "<n>", h);
  snprintf(h, sizeof(h), "check results: wrong elements counted in #wrong (default %d)", d.check);
  line('c', "check", "0|1", h);
  snprintf(h, sizeof(h), "dispatch dtype (default %s; combine is always bf16)", dtypeName(d.fp8));
  line('d', "datatype", "bf16|fp8", h);
  snprintf(h, sizeof(h), "CTAs of each dispatch / combine kernel (default %d)", d.numSms);
  line('s', "sms", "<n>", h);
  snprintf(h, sizeof(h), "hidden size H in elements (default %d)", d.hidden);
  line('H', "hidden", "<H>", h);
  snprintf(h, sizeof(h), "experts per token (default %d)", d.topK);
  line('k', "topk", "<k>", h);
  snprintf(h, sizeof(h), "experts in total (default %d)", d.numExperts);
  line('E', "experts", "<E>", h);
  line(0, "ranks", "<n>", "ranks, one GPU each (default: all local GPUs; mpirun: the world)");
  line(0, "max-tokens-per-rank", "<T>", "maxTokensPerRank of the EP context (default: -e)");
  snprintf(h, sizeof(h), "uniform top-k; skew: first expert on rank 0; group: experts of "
           "--group-nodes random nodes per token (default %s)", routingName(d.routing));
  line(0, "routing", "random|skew|group", h);
  snprintf(h, sizeof(h), "nodes each token's experts come from with --routing group (default %d)",
           d.groupNodes);
  line(0, "group-nodes", "<g>", h);
  snprintf(h, sizeof(h), "seed of the generated routing and data (default 0x%llx)",
           (unsigned long long)d.seed);
  line(0, "seed", "<n>", h);
  line(0, "output", "FILE", "also write the rows and the run's parameters to FILE.csv|.json");
  for (const ExtraOption& x : extras) line(x.shortName, x.name, x.valueHint, x.help);
  line('h', "help", nullptr, "this help");
  printf("Environment: NCCL_NVLS_ENABLE defaults to 0; MOE_RANKS_GRACE_S (default 10) is how long\n"
         "the other ranks get once one failed before they are terminated.\n");
}

bool endsWith(const std::string& s, const char* tail) {
  const size_t n = strlen(tail);
  return s.size() > n && s.compare(s.size() - n, n, tail) == 0;
}

// Checks that involve several options. Returns false after printing why.
bool validate(const char* prog, bool maxPerRankGiven, Options* opt) {
  if (opt->maxTokens < opt->minTokens) {
    fprintf(stderr, "%s: -e %ld is below -b %ld\n", prog, opt->maxTokens, opt->minTokens);
    return false;
  }
  if (!maxPerRankGiven) opt->maxTokensPerRank = opt->maxTokens;
  if (opt->maxTokensPerRank < opt->maxTokens) {
    fprintf(stderr, "%s: --max-tokens-per-rank %ld is below the largest token count -e %ld\n",
            prog, opt->maxTokensPerRank, opt->maxTokens);
    return false;
  }
  if (opt->maxTokensPerRank > INT_MAX) {
    fprintf(stderr, "%s: --max-tokens-per-rank / -e %ld does not fit an int\n", prog,
            opt->maxTokensPerRank);
    return false;
  }
  if (opt->topK > opt->numExperts || opt->topK > 32) {
    fprintf(stderr, "%s: -k %d must be <= min(-E %d, 32)\n", prog, opt->topK, opt->numExperts);
    return false;
  }
  if (opt->hidden % 8 != 0 || (opt->fp8 && opt->hidden % 128 != 0)) {
    fprintf(stderr, "%s: -H %d must be a multiple of 8 (bf16) or 128 (fp8)\n", prog, opt->hidden);
    return false;
  }
  if (!opt->output.empty() && !endsWith(opt->output, ".csv") && !endsWith(opt->output, ".json")) {
    fprintf(stderr, "%s: --output %s: the name must end in .csv or .json\n", prog,
            opt->output.c_str());
    return false;
  }
  return true;
}

void reportUnknown(const char* prog, int letter, const char* arg) {
  for (const Reserved& r : kReserved) {
    if (r.letter != letter) continue;
    fprintf(stderr, "%s: -%c is not supported", prog, letter);
    if (r.ncclTestsMeaning) fprintf(stderr, " (in nccl-tests: %s)", r.ncclTestsMeaning);
    if (r.replacedBy) fprintf(stderr, "; our old -%c is now %s", letter, r.replacedBy);
    fprintf(stderr, " (-h for help)\n");
    return;
  }
  if (letter > 0 && letter < 256)
    fprintf(stderr, "%s: unknown flag -%c (-h for help)\n", prog, letter);
  else
    fprintf(stderr, "%s: unknown option '%s' (-h for help)\n", prog, arg);
}

}  // namespace

bool parse01(const char* v, bool* out) {
  if (strcmp(v, "0") != 0 && strcmp(v, "1") != 0) return false;
  *out = v[0] == '1';
  return true;
}

const char* dtypeName(bool fp8) { return fp8 ? "fp8" : "bf16"; }
const char* routingName(Routing r) {
  return r == Routing::kSkew ? "skew" : r == Routing::kGroup ? "group" : "random";
}

int parseOptions(int argc, char** argv, const char* progName,
                 const std::vector<ExtraOption>& extras, Options* opt) {
  static const CommonOption kCommon[] = {
      {"min-tokens", 'b', true},   {"max-tokens", 'e', true},  {"step-tokens", 'i', true},
      {"stepfactor", 'f', true},   {"iters", 'n', true},       {"warmup_iters", 'w', true},
      {"check", 'c', true},        {"datatype", 'd', true},    {"sms", 's', true},
      {"hidden", 'H', true},       {"topk", 'k', true},        {"experts", 'E', true},
      {"ranks", kRanks, true},     {"max-tokens-per-rank", kMaxTokensPerRank, true},
      {"routing", kRouting, true}, {"group-nodes", kGroupNodes, true},
      {"seed", kSeed, true},       {"output", kOutput, true},  {"help", 'h', false},
  };
  std::string shortOpts = ":";  // leading ':': a missing value returns ':' (not '?')
  std::vector<struct option> longOpts;
  for (const CommonOption& c : kCommon) {
    longOpts.push_back({c.name, c.hasValue ? required_argument : no_argument, nullptr, c.val});
    if (c.val < 256) shortOpts += std::string(1, (char)c.val) + (c.hasValue ? ":" : "");
  }
  for (size_t i = 0; i < extras.size(); i++) {
    const int val = extras[i].shortName ? extras[i].shortName : kFirstExtra + (int)i;
    longOpts.push_back({extras[i].name, required_argument, nullptr, val});
    if (extras[i].shortName) shortOpts += std::string(1, extras[i].shortName) + ":";
  }
  longOpts.push_back({nullptr, 0, nullptr, 0});

  const Options defaults = *opt;
  bool maxPerRankGiven = false;
  optind = 0;  // GNU: full re-initialisation, so that parseOptions can run more than once
  opterr = 0;  // we print our own messages
  for (;;) {
    const int c = getopt_long(argc, argv, shortOpts.c_str(), longOpts.data(), nullptr);
    if (c == -1) break;
    if (c == '?') {
      reportUnknown(progName, optopt, argv[optind - 1]);
      return 1;
    }
    if (c == ':') {
      fprintf(stderr, "%s: option '%s' needs a value (-h for help)\n", progName, argv[optind - 1]);
      return 1;
    }
    if (c == 'h') {
      printUsage(progName, defaults, extras);
      return 0;
    }
    const char* v = optarg;
    bool ok = true;
    switch (c) {
      case 'b': ok = parseLong(v, 1, &opt->minTokens); break;
      case 'e': ok = parseLong(v, 1, &opt->maxTokens); break;
      case 'i': ok = parseLong(v, 1, &opt->stepTokens); break;
      case 'f': {
        char* end = nullptr;
        opt->stepFactor = strtod(v, &end);
        ok = end != v && *end == '\0' && opt->stepFactor > 1.0;
        break;
      }
      case 'n': ok = parseInt(v, 1, INT_MAX, &opt->iters); break;
      case 'w': ok = parseInt(v, 0, INT_MAX, &opt->warmup); break;
      case 'c': ok = parseInt(v, 0, 1, &opt->check); break;
      case 'd':
        ok = !strcmp(v, "bf16") || !strcmp(v, "fp8");
        opt->fp8 = !strcmp(v, "fp8");
        break;
      case 's': ok = parseInt(v, 1, INT_MAX, &opt->numSms); break;
      case 'H': ok = parseInt(v, 1, INT_MAX, &opt->hidden); break;
      case 'k': ok = parseInt(v, 1, INT_MAX, &opt->topK); break;
      case 'E': ok = parseInt(v, 1, INT_MAX, &opt->numExperts); break;
      case kRanks: ok = parseInt(v, 0, INT_MAX, &opt->nRanks); break;
      case kMaxTokensPerRank:
        ok = parseLong(v, 1, &opt->maxTokensPerRank);
        maxPerRankGiven = true;
        break;
      case kRouting:
        ok = false;
        for (Routing r : {Routing::kRandom, Routing::kSkew, Routing::kGroup})
          if (!strcmp(v, routingName(r))) opt->routing = r, ok = true;
        break;
      case kGroupNodes: ok = parseInt(v, 1, INT_MAX, &opt->groupNodes); break;
      case kSeed: {
        char* end = nullptr;
        errno = 0;
        opt->seed = strtoull(v, &end, 0);
        ok = errno == 0 && end != v && *end == '\0' && v[0] != '-';
        break;
      }
      case kOutput: opt->output = v; ok = !opt->output.empty(); break;
      default: {
        const ExtraOption* x = nullptr;
        for (size_t i = 0; i < extras.size(); i++)
          if (c == (extras[i].shortName ? extras[i].shortName : kFirstExtra + (int)i)) x = &extras[i];
        ok = x && x->set(v);
      }
    }
    if (!ok) {
      const struct option* o = &longOpts[0];
      while (o->name && o->val != c) o++;
      fprintf(stderr, "%s: bad value '%s' for --%s (-h for help)\n", progName, v, o->name);
      return 1;
    }
  }
  if (optind < argc) {
    fprintf(stderr, "%s: unexpected argument '%s' (-h for help)\n", progName, argv[optind]);
    return 1;
  }
  return validate(progName, maxPerRankGiven, opt) ? -1 : 1;
}

std::vector<long> tokenSweep(const Options& opt) {
  std::vector<long> sizes;
  for (long t = opt.minTokens; t <= opt.maxTokens;) {
    sizes.push_back(t);
    long next = opt.stepTokens > 0 ? t + opt.stepTokens : (long)(t * opt.stepFactor);
    if (next <= t) next = t + 1;
    t = next;
  }
  return sizes;
}

}  // namespace moe_perf
