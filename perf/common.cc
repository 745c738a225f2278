// Shared harness of the nccl-moe perf binaries; see common.h.
#include "common.h"

#include <chrono>

#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

namespace moe_perf {
namespace {

void printUsage(const char* prog) {
  printf(
      "Usage: %s [flags]\n"
      "  -b <tokens>   first token count per rank of the sweep (default 128)\n"
      "  -e <tokens>   last token count per rank (default 4096)\n"
      "  -f <factor>   multiply the token count by this between sizes (default 2)\n"
      "  -i <tokens>   add this between sizes instead of -f\n"
      "  -H <elems>    hidden size H in elements (default 7168)\n"
      "  -k <k>        top-k experts per token (default 8)\n"
      "  -E <experts>  experts in total (default 256)\n"
      "  -s <sms>      CTAs of each dispatch / combine kernel (default 24)\n"
      "  -d bf16|fp8   dispatch dtype (default bf16; combine is always bf16)\n"
      "  -n <iters>    timed iterations per size (default 20)\n"
      "  -w <iters>    warm-up iterations per size (default 5)\n"
      "  -c 0|1        check results (default 1)\n"
      "  -g/-N <ranks> ranks, one GPU each (default: all local GPUs; mpirun: world size)\n"
      "  -r random|skew  routing: uniform top-k, or every token's first expert on rank 0\n"
      "  -m <tokens>   maxTokensPerRank of the EP context (default: the -e value)\n"
      "  -S <seed>     seed of the generated routing and data (default 0x5eed)\n"
      "  -h            this help\n"
      "Environment: NCCL_NVLS_ENABLE defaults to 0; MOE_RANKS_GRACE_S (default 10) is how long\n"
      "the other ranks get once one failed before they are terminated.\n",
      prog);
}

bool parseLong(const char* s, long minValue, long* out) {
  char* end = nullptr;
  errno = 0;
  long v = strtol(s, &end, 0);
  if (errno != 0 || end == s || *end != '\0' || v < minValue) return false;
  *out = v;
  return true;
}

bool parseInt(const char* s, long minValue, int* out) {
  long v = 0;
  if (!parseLong(s, minValue, &v) || v > INT_MAX) return false;
  *out = (int)v;
  return true;
}

const char* dtypeName(ncclMoeDtype_t d) { return d == ncclMoeFp8E4m3 ? "fp8" : "bf16"; }

void versionString(int code, char* buf, size_t len) {
  // NCCL >= 2.9 encodes X*10000 + Y*100 + Z, older X*1000 + Y*100 + Z.
  if (code >= 10000)
    snprintf(buf, len, "%d.%d.%d", code / 10000, (code % 10000) / 100, code % 100);
  else
    snprintf(buf, len, "%d.%d.%d", code / 1000, (code % 1000) / 100, code % 100);
}

}  // namespace

int parseOptions(int argc, char** argv, const char* progName, Options* opt) {
  bool maxGiven = false;
  for (int i = 1; i < argc; i++) {
    const char* flag = argv[i];
    if (strcmp(flag, "-h") == 0 || strcmp(flag, "--help") == 0) {
      printUsage(progName);
      return 0;
    }
    if (flag[0] != '-' || flag[1] == '\0' || flag[2] != '\0' || i + 1 >= argc) {
      fprintf(stderr, "%s: bad or incomplete flag '%s' (-h for help)\n", progName, flag);
      return 1;
    }
    const char* v = argv[++i];
    bool ok = true;
    switch (flag[1]) {
      case 'b': ok = parseLong(v, 1, &opt->minTokens); break;
      case 'e': ok = parseLong(v, 1, &opt->maxTokens); break;
      case 'f': {
        char* end = nullptr;
        opt->stepFactor = strtod(v, &end);
        ok = end != v && *end == '\0' && opt->stepFactor > 1.0;
        break;
      }
      case 'i': ok = parseLong(v, 1, &opt->stepTokens); break;
      case 'H': ok = parseInt(v, 1, &opt->hidden); break;
      case 'k': ok = parseInt(v, 1, &opt->topK); break;
      case 'E': ok = parseInt(v, 1, &opt->numExperts); break;
      case 's': ok = parseInt(v, 1, &opt->numSms); break;
      case 'd':
        if (strcmp(v, "bf16") == 0) opt->dtype = ncclMoeBf16;
        else if (strcmp(v, "fp8") == 0) opt->dtype = ncclMoeFp8E4m3;
        else ok = false;
        break;
      case 'n': ok = parseInt(v, 1, &opt->iters); break;
      case 'w': ok = parseInt(v, 0, &opt->warmup); break;
      case 'c': ok = parseInt(v, 0, &opt->check) && opt->check <= 1; break;
      case 'g':
      case 'N': ok = parseInt(v, 0, &opt->nRanks); break;
      case 'r':
        if (strcmp(v, "random") == 0) opt->routing = Routing::kRandom;
        else if (strcmp(v, "skew") == 0) opt->routing = Routing::kSkew;
        else ok = false;
        break;
      case 'm': ok = parseLong(v, 1, &opt->maxTokensPerRank); maxGiven = true; break;
      case 'S': {
        char* end = nullptr;
        opt->seed = strtoull(v, &end, 0);
        ok = end != v && *end == '\0';
        break;
      }
      default:
        fprintf(stderr, "%s: unknown flag '%s' (-h for help)\n", progName, flag);
        return 1;
    }
    if (!ok) {
      fprintf(stderr, "%s: bad value '%s' for %s (-h for help)\n", progName, v, flag);
      return 1;
    }
  }
  if (opt->maxTokens < opt->minTokens) {
    fprintf(stderr, "%s: -e %ld is below -b %ld\n", progName, opt->maxTokens, opt->minTokens);
    return 1;
  }
  if (!maxGiven) opt->maxTokensPerRank = opt->maxTokens;
  if (opt->maxTokensPerRank < opt->maxTokens) {
    fprintf(stderr, "%s: -m %ld is below the largest token count -e %ld\n", progName,
            opt->maxTokensPerRank, opt->maxTokens);
    return 1;
  }
  if (opt->maxTokensPerRank > INT_MAX) {
    fprintf(stderr, "%s: -m/-e %ld does not fit an int\n", progName, opt->maxTokensPerRank);
    return 1;
  }
  if (opt->topK > opt->numExperts || opt->topK > 32) {
    fprintf(stderr, "%s: -k %d must be <= min(-E %d, 32)\n", progName, opt->topK, opt->numExperts);
    return 1;
  }
  if (opt->hidden % 8 != 0 || (opt->dtype == ncclMoeFp8E4m3 && opt->hidden % 128 != 0)) {
    fprintf(stderr, "%s: -H %d must be a multiple of 8 (bf16) or 128 (fp8)\n", progName,
            opt->hidden);
    return 1;
  }
  return -1;
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

void printHeader(const char* progName, const Options& opt, const moe_ranks::RankEnv& env) {
  if (env.rank == 0) {
    int ncclVersion = 0, moeVersion = 0;
    char ncclStr[32] = "?", moeStr[32] = "?";
    if (ncclGetVersion(&ncclVersion) == ncclSuccess) versionString(ncclVersion, ncclStr, sizeof(ncclStr));
    if (ncclMoeGetVersion(&moeVersion) == ncclSuccess) versionString(moeVersion, moeStr, sizeof(moeStr));
    const char* nvls = getenv("NCCL_NVLS_ENABLE");
    printf("# %s  nccl-moe %s  NCCL %s  launch %s  NCCL_NVLS_ENABLE=%s\n", progName, moeStr,
           ncclStr, moe_ranks::isMpiMode() ? "mpirun" : "fork", nvls ? nvls : "(unset)");
    printf("# ranks %d  tokens/rank %ld..%ld  hidden %d  topk %d  experts %d  sms %d  dtype %s"
           "  routing %s  maxTokensPerRank %ld\n",
           env.nRanks, opt.minTokens, opt.maxTokens, opt.hidden, opt.topK, opt.numExperts,
           opt.numSms, dtypeName(opt.dtype), opt.routing == Routing::kSkew ? "skew" : "random",
           opt.maxTokensPerRank);
    printf("# iters %d  warmup %d  check %d  seed 0x%llx\n", opt.iters, opt.warmup, opt.check,
           (unsigned long long)opt.seed);
    printf("#\n# Using devices\n");
    fflush(stdout);
  }
  // One line per rank, printed in rank order (each rank flushes before the next one starts).
  cudaDeviceProp prop;
  PERF_CUDA(cudaGetDeviceProperties(&prop, env.localRank));
  char host[64] = "?";
  gethostname(host, sizeof(host) - 1);
  for (int r = 0; r < env.nRanks; r++) {
    if (r == env.rank) {
      printf("#  Rank %2d Pid %6d on %10s device %2d [%04x:%02x:%02x.0] %s, %d SMs, %.0f GiB\n",
             env.rank, (int)getpid(), host, env.localRank, prop.pciDomainID, prop.pciBusID,
             prop.pciDeviceID, prop.name, prop.multiProcessorCount,
             prop.totalGlobalMem / (1024.0 * 1024.0 * 1024.0));
      fflush(stdout);
    }
    moe_ranks::barrier();
  }
  if (env.rank == 0) {
    printf("#\n# time: max over ranks of each rank's average time per call (us)\n"
           "# algbw: bytes this rank receives incl. from itself (rows * row bytes; row = H*2 for "
           "bf16,\n#        H + H/128*4 for fp8 data+scales; combine: the same rows, H*2 bf16 "
           "each) / its time,\n#        minimum over ranks (GB/s = 1e9 bytes/s); busbw: the "
           "same with rows from other ranks only\n"
           "# #wrong: wrong elements summed over ranks (N/A without -c 1); layout rows give "
           "time only\n");
    fflush(stdout);
  }
}

// --- errors ----------------------------------------------------------------------------------

void fail(const char* file, int line, const char* call, const char* why) {
  const moe_ranks::RankEnv& env = moe_ranks::currentEnv();
  fprintf(stderr, "[rank %d] %s:%d: %s failed: %s\n", env.rank, file, line, call, why);
  fflush(stderr);
  fflush(stdout);
  exit(moe_ranks::finish(1));
}

void checkCuda(cudaError_t err, const char* file, int line, const char* call) {
  if (err == cudaSuccess) return;
  char why[256];
  snprintf(why, sizeof(why), "%s (%s)", cudaGetErrorString(err), cudaGetErrorName(err));
  fail(file, line, call, why);
}

void checkNccl(ncclResult_t res, const char* file, int line, const char* call) {
  if (res == ncclSuccess) return;
  char why[512];
  snprintf(why, sizeof(why), "%s: %s", ncclGetErrorString(res), ncclGetLastError(nullptr));
  fail(file, line, call, why);
}

void checkMoe(ncclResult_t res, const char* file, int line, const char* call) {
  if (res != ncclSuccess) {
    char why[1024];
    snprintf(why, sizeof(why), "%s: %s", ncclGetErrorString(res), ncclMoeGetLastError());
    fail(file, line, call, why);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    char why[256];
    snprintf(why, sizeof(why), "returned success but cudaGetLastError() says %s (%s)",
             cudaGetErrorString(err), cudaGetErrorName(err));
    fail(file, line, call, why);
  }
}

// --- timing ----------------------------------------------------------------------------------

double timeUs(cudaStream_t stream, int warmup, int iters, const std::function<void()>& op) {
  // Warm up for `warmup` calls, then for at least 50 ms more: an idle GPU runs at a low clock
  // and short kernels (the layout: a few µs) would otherwise be timed before it has ramped up.
  // The ops are collective, so every rank runs the same number of calls (agreed on the host).
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < warmup; i++) op();
  PERF_CUDA(cudaStreamSynchronize(stream));
  const double perCallUs =
      std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count() /
      (warmup > 0 ? warmup : 1);
  const long more = (long)moe_ranks::maxOverRanks(50000.0 / (perCallUs > 1.0 ? perCallUs : 1.0));
  for (long i = 0; i < more; i++) op();
  PERF_CUDA(cudaStreamSynchronize(stream));
  moe_ranks::barrier();
  cudaEvent_t begin, end;
  PERF_CUDA(cudaEventCreate(&begin));
  PERF_CUDA(cudaEventCreate(&end));
  PERF_CUDA(cudaEventRecord(begin, stream));
  for (int i = 0; i < iters; i++) op();
  PERF_CUDA(cudaEventRecord(end, stream));
  PERF_CUDA(cudaEventSynchronize(end));
  float ms = 0;
  PERF_CUDA(cudaEventElapsedTime(&ms, begin, end));
  PERF_CUDA(cudaEventDestroy(begin));
  PERF_CUDA(cudaEventDestroy(end));
  return ms * 1000.0 / iters;
}

// --- rows and tables -------------------------------------------------------------------------

Row reduceRow(long tokens, double localTimeUs, bool hasBw, double localBytes, double remoteBytes,
              bool checked, long long localWrong) {
  Row row;
  row.tokens = tokens;
  row.hasBw = hasBw;
  row.checked = checked;
  row.timeUs = moe_ranks::maxOverRanks(localTimeUs);
  if (hasBw) {
    // bytes / (us * 1e3) = bytes per ns = GB/s.
    double t = localTimeUs > 0 ? localTimeUs * 1e3 : 1e-30;
    row.algbw = moe_ranks::minOverRanks(localBytes / t);
    row.busbw = moe_ranks::minOverRanks(remoteBytes / t);
  }
  if (checked) row.wrong = (long long)moe_ranks::sumOverRanks((double)localWrong);
  return row;
}

void printTable(const char* opName, const std::vector<Row>& rows) {
  if (moe_ranks::currentEnv().rank != 0) return;
  printf("#\n# %s\n", opName);
  printf("# %10s %12s %12s %12s %8s\n", "tokens", "time(us)", "algbw(GB/s)", "busbw(GB/s)",
         "#wrong");
  for (const Row& r : rows) {
    char algbw[32] = "-", busbw[32] = "-", wrong[32] = "N/A";
    if (r.hasBw) {
      snprintf(algbw, sizeof(algbw), "%.2f", r.algbw);
      snprintf(busbw, sizeof(busbw), "%.2f", r.busbw);
    }
    if (r.checked) snprintf(wrong, sizeof(wrong), "%lld", r.wrong);
    printf("  %10ld %12.2f %12s %12s %8s\n", r.tokens, r.timeUs, algbw, busbw, wrong);
  }
  fflush(stdout);
}

void printNote(const char* fmt, ...) {
  if (moe_ranks::currentEnv().rank != 0) return;
  char text[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(text, sizeof(text), fmt, ap);
  va_end(ap);
  printf(text[0] ? "# %s\n" : "#%s\n", text);
  fflush(stdout);
}

// --- number formats and seeds ----------------------------------------------------------------


uint64_t mixSeed(uint64_t a, uint64_t b, uint64_t c, uint64_t d) {
  Rng rng(a);
  uint64_t h = rng.next();
  h = Rng(h ^ (b * 0x9e3779b97f4a7c15ull)).next();
  h = Rng(h ^ (c * 0xc2b2ae3d27d4eb4full)).next();
  h = Rng(h ^ (d * 0x165667b19e3779f9ull)).next();
  return h;
}

}  // namespace moe_perf
