// Shared harness of the nccl-moe perf binaries; see common.h.
#include "common.h"
#include "plugin_hops.h"

#include <chrono>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

namespace moe_perf {
namespace {

std::string versionString(int code) {
  // NCCL >= 2.9 encodes X*10000 + Y*100 + Z, older X*1000 + Y*100 + Z.
  char buf[32];
  if (code >= 10000)
    snprintf(buf, sizeof(buf), "%d.%d.%d", code / 10000, (code % 10000) / 100, code % 100);
  else
    snprintf(buf, sizeof(buf), "%d.%d.%d", code / 1000, (code % 1000) / 100, code % 100);
  return buf;
}

const char* timingName(Timing t) {
  return t == Timing::kBackToBack ? "back-to-back" : t == Timing::kEachCall ? "each-call"
                                                                            : "each-call-held";
}

// The run's parameters: where, what shape, how timed; then the binary's own.
Params runParams(const PerfTest& test, const Options& opt, const Context& ctx) {
  const moe_ranks::RankEnv& env = ctx.env;
  int ncclVersion = 0, moeVersion = 0;
  cudaDeviceProp prop;
  PERF_CUDA(cudaGetDeviceProperties(&prop, env.localRank));
  char date[32];
  const time_t now = time(nullptr);
  strftime(date, sizeof(date), "%Y-%m-%dT%H:%M:%SZ", gmtime(&now));
  const char* nvls = getenv("NCCL_NVLS_ENABLE");
  char seed[32];
  snprintf(seed, sizeof(seed), "0x%llx", (unsigned long long)opt.seed);
  Params p = {
      {"impl", "nccl-moe"},
      {"binary", test.name},
      {"card", prop.name},
      {"ranks", std::to_string(env.nRanks)},
      {"nodes", std::to_string(ctx.nNodes)},
      {"nccl", ncclGetVersion(&ncclVersion) == ncclSuccess ? versionString(ncclVersion) : "?"},
      {"nccl_moe", ncclMoeGetVersion(&moeVersion) == ncclSuccess ? versionString(moeVersion) : "?"},
      {"launch", moe_ranks::isMpiMode() ? "mpirun" : "fork"},
      {"nvls", nvls ? nvls : "unset"},
      {"hidden", std::to_string(opt.hidden)},
      {"topk", std::to_string(opt.topK)},
      {"experts", std::to_string(opt.numExperts)},
      {"sms", std::to_string(opt.numSms)},
      {"dtype", dtypeName(opt.fp8)},
      {"routing", routingName(opt.routing)},
      {"max_tokens_per_rank", std::to_string(opt.maxTokensPerRank)},
      {"timing", timingName(test.timing)},
      {"iters", std::to_string(opt.iters)},
      {"warmup", std::to_string(opt.warmup)},
      {"check", std::to_string(opt.check)},
      {"seed", seed},
      {"date", date},
  };
  if (ctx.nNodes > 1) {  // the loopback plugin's shaping (plugin/README.md)
    const char* gbps = getenv("NCCL_MOELOOP_GBPS");            // GB/s per direction
    const char* latency = getenv("NCCL_MOELOOP_LATENCY_US");   // us per message
    p.push_back({"moeloop_gbps", gbps && *gbps ? gbps : "unset"});
    p.push_back({"moeloop_latency_us", latency && *latency ? latency : "unset"});
  }
  if (test.params)
    for (auto& kv : test.params()) p.push_back(kv);
  return p;
}

// Collective. Rank 0 prints the parameters, then every rank its line (in rank order), then the
// legend and the column names.
void printHeader(const PerfTest& test, const Params& params, const moe_ranks::RankEnv& env,
                 bool net) {
  if (env.rank == 0) {
    std::string line = "#";
    for (size_t i = 0; i < params.size(); i++) {
      line += " " + params[i].first + " " + params[i].second + " ";
      if (line.size() > 80 || i + 1 == params.size()) {
        printf("%s\n", line.c_str());
        line = "#";
      }
    }
    printf("#\n# Using devices\n");
    fflush(stdout);
  }
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
  if (env.rank != 0) return;
  printf("#\n# time: per call, the slowest rank's; %s\n",
         test.timing == Timing::kBackToBack
             ? "each rank's average over -n calls enqueued back to back (p99: -)"
             : test.timing == Timing::kEachCall
                   ? "each rank's median over -n calls timed alone from the host call; p99 alike"
                   : "each rank's median over -n calls timed alone on the GPU (stream held); p99 alike");
  printf("# algbw: bytes a rank receives, its own share included / its time; busbw: bytes that "
         "crossed NVLink / its time;\n#        both the slowest rank's (min), GB/s = 1e9 B/s "
         "(README: Bandwidth definitions)\n"
         "# #wrong: wrong elements summed over ranks (N/A: not checked, -c 0 or no check)\n");
  if (net)
    printf("# rdmabw: bytes a rank's NIC sends / its time; nvlbw: bytes it moves over NVLink in the\n"
           "#        internode path / its time; both the busiest rank's (max), from the binary's\n"
           "#        network model (ht_perf: testing/ht_net_model.h)\n");
  printf("#\n%s", tableHeader(net).c_str());
  fflush(stdout);
}

// Warms up for `warmup` calls and then for at least 50 ms more (an idle GPU runs at a low clock;
// the layout's few µs would otherwise be timed before it ramps up), then times `iters` calls
// back to back. Returns this rank's average per call (µs). Collective.
double timeBackToBack(const Context& ctx, const PerfOp& op) {
  const Options& opt = *ctx.opt;
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < opt.warmup; i++) op.run();
  PERF_CUDA(cudaStreamSynchronize(ctx.stream));
  const double perCallUs =
      std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count() /
      (opt.warmup > 0 ? opt.warmup : 1);
  // The ops are collective: every rank runs the same number of calls (agreed on the host).
  const long more = (long)moe_ranks::maxOverRanks(50000.0 / (perCallUs > 1.0 ? perCallUs : 1.0));
  for (long i = 0; i < more; i++) op.run();
  quiesce(ctx);
  cudaEvent_t begin, end;
  PERF_CUDA(cudaEventCreate(&begin));
  PERF_CUDA(cudaEventCreate(&end));
  PERF_CUDA(cudaEventRecord(begin, ctx.stream));
  for (int i = 0; i < opt.iters; i++) op.run();
  PERF_CUDA(cudaEventRecord(end, ctx.stream));
  PERF_CUDA(cudaEventSynchronize(end));
  float ms = 0;
  PERF_CUDA(cudaEventElapsedTime(&ms, begin, end));
  PERF_CUDA(cudaEventDestroy(begin));
  PERF_CUDA(cudaEventDestroy(end));
  return ms * 1000.0 / opt.iters;
}

// Times `warmup` + `iters` calls one by one (pre, ranks meet, [hold], timed run, post). Returns
// this rank's times of the last `iters` calls (µs). Collective.
std::vector<double> timeEachCall(const Context& ctx, const PerfOp& op, bool hold) {
  const Options& opt = *ctx.opt;
  cudaEvent_t begin, end;
  PERF_CUDA(cudaEventCreate(&begin));
  PERF_CUDA(cudaEventCreate(&end));
  std::vector<double> times;
  for (int i = 0; i < opt.warmup + opt.iters; i++) {
    if (op.pre) op.pre();
    quiesce(ctx);
    if (hold) holdStream(ctx.stream, kHoldUs);
    PERF_CUDA(cudaEventRecord(begin, ctx.stream));
    op.run();
    PERF_CUDA(cudaEventRecord(end, ctx.stream));
    if (op.post) op.post();
    PERF_CUDA(cudaEventSynchronize(end));
    float ms = 0;
    PERF_CUDA(cudaEventElapsedTime(&ms, begin, end));
    if (i >= opt.warmup) times.push_back(ms * 1000.0);
  }
  quiesce(ctx);
  PERF_CUDA(cudaEventDestroy(begin));
  PERF_CUDA(cudaEventDestroy(end));
  return times;
}

// Collective: times, checks and reduces one operation at size T into a row.
Row measure(const Context& ctx, Timing timing, const PerfOp& op, long T, bool net) {
  if (op.init) op.init(T);
  quiesce(ctx);
  Row row;
  row.tokens = T;
  row.op = op.name;
  double localUs = 0, localP99 = -1;
  if (timing == Timing::kBackToBack) {
    localUs = timeBackToBack(ctx, op);
  } else {
    const std::vector<double> times = timeEachCall(ctx, op, timing == Timing::kEachCallHeld);
    localUs = median(times);
    localP99 = percentile(times, 99);
  }
  localUs /= op.callsPerRun;
  if (localP99 >= 0) localP99 /= op.callsPerRun;
  quiesce(ctx);
  row.timeUs = moe_ranks::maxOverRanks(localUs);
  if (localP99 >= 0) row.p99Us = moe_ranks::maxOverRanks(localP99);
  if (op.bytes) {
    double algBytes = 0, busBytes = 0;
    op.bytes(T, &algBytes, &busBytes);
    const double ns = localUs > 0 ? localUs * 1e3 : 1e-30;  // bytes per ns = GB/s
    row.hasBw = true;
    row.algbw = moe_ranks::minOverRanks(algBytes / ns);
    row.busbw = moe_ranks::minOverRanks(busBytes / ns);
  }
  if (net && op.netBytes) {
    double rdmaBytes = 0, nvlinkBytes = 0;
    op.netBytes(T, &rdmaBytes, &nvlinkBytes);
    const double ns = localUs > 0 ? localUs * 1e3 : 1e-30;
    row.hasNet = true;
    row.rdmabw = moe_ranks::maxOverRanks(rdmaBytes / ns);
    row.nvlinkbw = moe_ranks::maxOverRanks(nvlinkBytes / ns);
  }
  if (op.check && ctx.opt->check) {
    const long long wrong = op.check(T);
    quiesce(ctx);
    row.checked = true;
    row.wrong = (long long)moe_ranks::sumOverRanks((double)wrong);
  }
  return row;
}

}  // namespace

int perfMain(int argc, char** argv, Options opt, PerfTest* test) {
  const char* prog = test->name;
  int rc = parseOptions(argc, argv, prog, test->extraOptions, &opt);
  if (rc >= 0) return rc;
  if (test->validate) {
    const std::string why = test->validate(opt);
    if (!why.empty()) {
      fprintf(stderr, "%s: %s\n", prog, why.c_str());
      return 1;
    }
  }
  if (!opt.output.empty()) {
    // Checked before the ranks start, so that a bad path costs no GPU time; rank 0 creates it.
    const size_t slash = opt.output.rfind('/');
    const std::string dir = slash == std::string::npos ? "." : opt.output.substr(0, slash + 1);
    if (access(dir.c_str(), W_OK) != 0) {
      fprintf(stderr, "%s: cannot write --output %s: %s: %s\n", prog, opt.output.c_str(),
              dir.c_str(), strerror(errno));
      return 1;
    }
  }
  moe_ranks::RankEnv env;
  if (!moe_ranks::start(opt.nRanks, &env)) return 1;
  if (env.nRanks == 0) return moe_ranks::finish(0);  // start() printed "skipping: no GPU"
  if (opt.numExperts % env.nRanks != 0) {
    if (env.rank == 0)
      fprintf(stderr, "%s: -E %d experts is not a multiple of %d ranks\n", prog, opt.numExperts,
              env.nRanks);
    return moe_ranks::finish(1);
  }

  Context ctx;
  ctx.env = env;
  ctx.opt = &opt;
  PERF_NCCL(moe_ranks::initComm(env, &ctx.comm));
  PERF_CUDA(cudaStreamCreateWithFlags(&ctx.stream, cudaStreamNonBlocking));
  ncclMoeConfig_t cfg = NCCL_MOE_CONFIG_INITIALIZER;
  cfg.mode = test->mode;
  cfg.numExperts = opt.numExperts;
  cfg.hidden = opt.hidden;
  cfg.topK = opt.topK;
  cfg.maxTokensPerRank = (int)opt.maxTokensPerRank;
  cfg.dispatchDtype = opt.fp8 ? ncclMoeFp8E4m3 : ncclMoeBf16;
  cfg.numSms = opt.numSms;
  if (test->configure) test->configure(&cfg);
  PERF_MOE(ncclMoeCommCreate(ctx.comm, &cfg, &ctx.moe));
  PERF_MOE(ncclMoeCommNodeCount(ctx.moe, &ctx.nNodes));

  std::vector<PerfOp> ops = test->setup(ctx);
  bool net = false;  // the network columns: several nodes and an operation that models them
  for (const PerfOp& op : ops) net = net || (ctx.nNodes > 1 && op.netBytes);
  const Params params = runParams(*test, opt, ctx);
  ResultFile file;
  if (env.rank == 0 && !opt.output.empty() && !file.open(opt.output, params, net))
    fail(__FILE__, __LINE__, "fopen(--output)", strerror(errno));
  printHeader(*test, params, env, net);

  std::vector<Row> rows;
  bool fileOk = true;
  for (long T : tokenSweep(opt)) {
    test->prepare(T);
    quiesce(ctx);
    for (const PerfOp& op : ops) {
      moeloopStats_t before{}, after{};
      const bool hops = env.rank == 0 && readPluginStats(&before);
      rows.push_back(measure(ctx, test->timing, op, T, net));
      if (env.rank != 0) continue;
      printf("%s", tableLine(rows.back(), net).c_str());
      if (hops && readPluginStats(&after)) printf("%s", pluginHopLine(before, after).c_str());
      fflush(stdout);
      if (!opt.output.empty()) fileOk = file.add(rows.back()) && fileOk;
    }
  }
  if (env.rank == 0) {
    if (!opt.output.empty() && !(file.close() && fileOk))
      fprintf(stderr, "%s: writing --output %s failed\n", prog, opt.output.c_str());
    printf("%s", summaryLines(rows).c_str());
    fflush(stdout);
  }

  if (test->teardown) test->teardown();
  PERF_MOE(ncclMoeCommDestroy(ctx.moe));
  PERF_CUDA(cudaStreamDestroy(ctx.stream));
  PERF_NCCL(ncclCommDestroy(ctx.comm));
  return moe_ranks::finish(totalWrong(rows) > 0 || !fileOk ? 1 : 0);
}

void quiesce(const Context& ctx) {
  PERF_CUDA(cudaStreamSynchronize(ctx.stream));
  PERF_MOE(ncclMoeCheckErrors(ctx.moe));
  moe_ranks::barrier();
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

uint64_t mixSeed(uint64_t a, uint64_t b, uint64_t c, uint64_t d) {
  Rng rng(a);
  uint64_t h = rng.next();
  h = Rng(h ^ (b * 0x9e3779b97f4a7c15ull)).next();
  h = Rng(h ^ (c * 0xc2b2ae3d27d4eb4full)).next();
  h = Rng(h ^ (d * 0x165667b19e3779f9ull)).next();
  return h;
}

}  // namespace moe_perf
