// ll_perf: low-latency (LL) dispatch / combine performance, nccl-tests style.
//
// For each token count T of the sweep (tokens per rank), every rank generates its routing (K
// distinct experts per token, uniform over E; -r skew: the first one among rank 0's experts)
// and its BF16 tokens on the host from (seed, rank, T), then:
//  - one-shot loop: per iteration the ranks meet (host barrier after a stream sync), then
//    dispatch (given the weights unless -W 0, so that its combine is weighted) and combine
//    (expert output = out.combineInput) are timed with CUDA events around each call;
//    with -G 1 (default) a kernel spinning kHoldUs holds the stream first, so that the calls
//    and events are all enqueued before the GPU reaches them: the events time the GPU's work
//    (as a profiler's kernel times do), not the host's argument checks and launch latency;
//    -G 0 times from the host's call (each timed call then includes its launch, ~5-8 us);
//  - split loop: send-only dispatch | dispatch complete | send-only combine | combine complete,
//    each timed alone, with a stream sync and a host barrier between them: "complete" is then
//    the cost of completing once every peer has sent (perfect overlap);
//  - with -c 1: one more one-shot dispatch (on a poisoned slot) + combine, checked against
//    moe_ref (tests/common/reference_ll.h): counts, every (expert, source) block as a set keyed
//    by srcToken (row and scale bytes), and the combine of the identity expert (written into
//    out.combineInput).
// Per rank the median over the -n iterations (after -w warm-up ones) is taken; the tables show
// the median and the p99 over ranks (nearest rank: the maximum with up to 100 ranks) of these
// medians, and the median over ranks of each rank's bandwidth = bytes / its median time:
//   dispatch: bytes delivered into this rank's expert rows: one row per (token, expert) pair it
//             receives (a token with two experts here counts twice, although it crosses NVLink
//             once) * (H*2 BF16, or H + scale bytes for FP8); weights and routing not counted;
//   combine:  likewise logical bytes: one BF16 row of H*2 bytes per valid (token, k) pair of
//             this rank's own tokens (DeepEP's definition), although the library moves one
//             partial per (token, destination rank) pair.
// Flags besides perf/common's: -F fp32|pow2|ue8m0 (FP8 scale format, default fp32), -l slots
// (numBufferSlots, default 2), -W 0|1 (weights given to the dispatch, i.e. a weighted combine,
// default 1), -G 0|1 (hold the stream before each timed call, default 1). Defaults here: -b 128 -e 128 -E 288 -d fp8 -n 100 -w 20.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <algorithm>
#include <string>
#include <vector>

#include "common.h"
#include "../tests/common/reference_ll.h"

using moe_perf::Options;

namespace {

struct LlOpts {
  ncclMoeScaleFormat_t fmt = ncclMoeScaleFp32;
  int slots = 2;
  int weighted = 1;
  int hold = 1;
};

constexpr double kHoldUs = 200;  // longer than the host needs to enqueue one timed step

const char* fmtName(ncclMoeScaleFormat_t f) {
  return f == ncclMoeScaleUe8m0 ? "ue8m0" : f == ncclMoeScaleFp32Pow2 ? "pow2" : "fp32";
}

// Removes -F/-l/-W (and their values) from argv into *lo. Returns false on a bad value.
bool takeLlFlags(int* argc, char** argv, LlOpts* lo) {
  int out = 1;
  for (int i = 1; i < *argc; i++) {
    const char* f = argv[i];
    const bool mine = !strcmp(f, "-F") || !strcmp(f, "-l") || !strcmp(f, "-W") || !strcmp(f, "-G");
    if (!mine || i + 1 >= *argc) {
      argv[out++] = argv[i];
      continue;
    }
    const char* v = argv[++i];
    if (!strcmp(f, "-F")) {
      if (!strcmp(v, "fp32")) lo->fmt = ncclMoeScaleFp32;
      else if (!strcmp(v, "pow2")) lo->fmt = ncclMoeScaleFp32Pow2;
      else if (!strcmp(v, "ue8m0")) lo->fmt = ncclMoeScaleUe8m0;
      else return false;
    } else if (!strcmp(f, "-l")) {
      lo->slots = atoi(v);
      if (lo->slots < 1 || lo->slots > 8) return false;
    } else {
      int* flag = !strcmp(f, "-W") ? &lo->weighted : &lo->hold;
      *flag = atoi(v);
      if (*flag != 0 && *flag != 1) return false;
    }
  }
  *argc = out;
  argv[out] = nullptr;
  return true;
}

struct Ctx {
  int R = 0, me = 0, E = 0, L = 0, H = 0, K = 0, M = 0;
  bool fp8 = false, skew = false;
  ncclMoeScaleFormat_t fmt = ncclMoeScaleFp32;
  uint64_t seed = 0;
};

moe_ref::Routing makeRouting(const Ctx& c, int src, long T) {
  moe_perf::Rng rng(moe_perf::mixSeed(c.seed, (uint64_t)src, (uint64_t)T, 11));
  moe_ref::Routing r;
  r.numTokens = (int)T;
  r.topK = c.K;
  r.topkIdx.resize((size_t)T * c.K);
  r.topkWeights.resize((size_t)T * c.K);
  for (long t = 0; t < T; t++) {
    int64_t* row = &r.topkIdx[(size_t)t * c.K];
    for (int k = 0; k < c.K; k++) {
      int64_t e;
      do {
        e = (c.skew && k == 0) ? rng.below((uint32_t)c.L) : rng.below((uint32_t)c.E);
      } while (std::find(row, row + k, e) != row + k);
      row[k] = e;
      r.topkWeights[(size_t)t * c.K + k] = (float)(1 + rng.below(16)) / 16.0f;  // exact products
    }
  }
  return r;
}

// BF16 tokens: per 128-channel group a magnitude 2^-4..2^4, values uniform in (-mag, mag).
std::vector<uint16_t> makeTokens(const Ctx& c, int src, long T) {
  moe_perf::Rng rng(moe_perf::mixSeed(c.seed, (uint64_t)src, (uint64_t)T, 12));
  std::vector<uint16_t> x((size_t)T * c.H);
  float mag = 1.0f;
  for (size_t i = 0; i < x.size(); i++) {
    if (i % 128 == 0) mag = ldexpf(1.0f, (int)rng.below(9) - 4);
    x[i] = moe_ref::floatToBf16((2.0f * rng.uniform() - 1.0f) * mag);
  }
  return x;
}

size_t slotRows(const Ctx& c) { return (size_t)c.L * c.R * c.M; }
int rowBytes(const Ctx& c) { return c.fp8 ? c.H : 2 * c.H; }
int scaleBytes(const Ctx& c) { return c.fp8 ? moe_ref::llScaleBytesPerRow(c.H, c.fmt) : 0; }

// Copies and fills on the benchmark's (non-blocking) stream, synchronised: the legacy-stream
// cudaMemcpy / cudaMemset would not be ordered with it.
cudaStream_t gStream = nullptr;
void copy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  if (bytes == 0) return;
  PERF_CUDA(cudaMemcpyAsync(dst, src, bytes, kind, gStream));
  PERF_CUDA(cudaStreamSynchronize(gStream));
}
void fill(void* dst, size_t bytes) {
  if (bytes == 0 || dst == nullptr) return;
  PERF_CUDA(cudaMemsetAsync(dst, 0xFF, bytes, gStream));
  PERF_CUDA(cudaStreamSynchronize(gStream));
}

template <class T>
void toHost(std::vector<T>* dst, const void* src, size_t n) {
  dst->resize(n);
  copy(dst->data(), src, n * sizeof(T), cudaMemcpyDeviceToHost);
}

// Checks one completed one-shot dispatch (wrong elements: counts, srcTokens, row elements, scale
// bytes), writes the identity expert output of every received row into out.combineInput, and
// returns the wrong count. Every rank's rows are regenerated from the seeds.
long long checkDispatchAndFillExpert(const Ctx& c, long T, const ncclMoeLowLatencyOutput_t& out,
                                     const std::vector<moe_ref::Routing>& rt) {
  std::vector<moe_ref::LlRows> send(c.R);
  for (int s = 0; s < c.R; s++) send[s] = moe_ref::llSendRows(makeTokens(c, s, T), (int)T, c.H, c.fp8, c.fmt);
  const moe_ref::LlReceived ref = moe_ref::llDispatch(c.me, rt, c.E);
  std::vector<int> counts, ecounts;
  toHost(&counts, out.recvCountsPerSource, (size_t)c.L * c.R);
  toHost(&ecounts, out.expertCounts, c.L);
  long long wrong = 0;
  for (size_t i = 0; i < counts.size(); i++) wrong += counts[i] != ref.countsPerSource[i];
  for (int l = 0; l < c.L; l++) wrong += ecounts[l] != ref.expertCounts[l];
  fill(out.combineInput, slotRows(c) * c.H * 2);
  const int rb = rowBytes(c), sb = scaleBytes(c);
  std::vector<int> tok;
  std::vector<uint8_t> rows, sc;
  std::vector<uint16_t> ident;
  for (int l = 0; l < c.L; l++)
    for (int s = 0; s < c.R; s++) {
      const std::vector<int>& want = ref.tokens(l, s);
      const size_t n = want.size(), row0 = ((size_t)l * c.R + s) * c.M;
      if (n == 0) continue;
      toHost(&tok, out.srcToken + row0, n);
      toHost(&rows, (const uint8_t*)out.x + row0 * rb, n * rb);
      if (sb) toHost(&sc, (const uint8_t*)out.xScales + row0 * sb, n * sb);
      std::vector<size_t> order(n);
      for (size_t i = 0; i < n; i++) order[i] = i;
      std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return tok[a] < tok[b]; });
      for (size_t i = 0; i < n; i++) {
        const size_t j = order[i];
        const int t = want[i];
        if (tok[j] != t) { wrong += c.H; continue; }
        const uint8_t* g = &rows[j * rb];
        const uint8_t* e = send[s].row(t);
        if (memcmp(g, e, rb) != 0) {
          const int eb = c.fp8 ? 1 : 2;
          for (int h = 0; h < c.H; h++) wrong += memcmp(g + h * eb, e + h * eb, eb) != 0;
        }
        for (int b = 0; b < sb; b++) wrong += sc[j * sb + b] != send[s].scale(t)[b];
      }
      ident.resize(n * c.H);  // identity expert of the received rows, at their positions
      for (size_t j = 0; j < n; j++) {
        if (c.fp8) moe_ref::llDequantRowToBf16(&rows[j * rb], &sc[j * sb], c.H, c.fmt, &ident[j * c.H]);
        else memcpy(&ident[j * c.H], &rows[j * rb], (size_t)rb);
      }
      copy((uint16_t*)out.combineInput + row0 * c.H, ident.data(), n * c.H * 2,
           cudaMemcpyHostToDevice);
    }
  return wrong;
}

long long checkCombine(const Ctx& c, long T, const moe_ref::Routing& own, bool weighted,
                       const void* devOut) {
  const moe_ref::LlRows mine = moe_ref::llSendRows(makeTokens(c, c.me, T), (int)T, c.H, c.fp8, c.fmt);
  const std::vector<uint16_t> want = moe_ref::llCombine(
      own, [&](int t, int) { return mine.identRow(t, c.H); }, c.H, weighted, c.E, c.R);
  std::vector<uint16_t> got;
  toHost(&got, devOut, want.size());
  long long wrong = 0;
  for (size_t i = 0; i < want.size(); i++) wrong += got[i] != want[i];
  return wrong;
}

// Collective: every rank's value, in rank order.
std::vector<double> gather(double v, int R, int me) {
  std::vector<double> all(R);
  for (int r = 0; r < R; r++) all[r] = moe_ranks::sumOverRanks(r == me ? v : 0.0);
  return all;
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double p99(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  size_t i = (size_t)ceil(0.99 * v.size());
  return v[i > 0 ? i - 1 : 0];
}

struct OpRow {
  long tokens = 0;
  double medUs = 0, p99Us = 0, gbps = 0;
  bool hasBw = false;
  long long wrong = -1;  // -1: not checked
};

// Collective: one table row from this rank's per-iteration times.
OpRow reduceOp(long T, const std::vector<double>& timesUs, double bytes, long long wrong,
               int R, int me) {
  OpRow row;
  row.tokens = T;
  const double mine = median(timesUs);
  std::vector<double> all = gather(mine, R, me);
  row.medUs = median(all);
  row.p99Us = p99(all);
  row.hasBw = bytes >= 0;
  if (row.hasBw) row.gbps = median(gather(mine > 0 ? bytes / (mine * 1e3) : 0.0, R, me));
  row.wrong = wrong < 0 ? -1 : (long long)moe_ranks::sumOverRanks((double)wrong);
  return row;
}

void printOps(int me, const char* name, const std::vector<OpRow>& rows) {
  if (me != 0) return;
  printf("#\n# %s\n# %10s %12s %12s %12s %8s\n", name, "tokens", "median(us)", "p99(us)",
         "GB/s", "#wrong");
  for (const OpRow& r : rows) {
    char bw[32] = "-", wr[32] = "N/A";
    if (r.hasBw) snprintf(bw, sizeof(bw), "%.2f", r.gbps);
    if (r.wrong >= 0) snprintf(wr, sizeof(wr), "%lld", r.wrong);
    printf("  %10ld %12.2f %12.2f %12s %8s\n", r.tokens, r.medUs, r.p99Us, bw, wr);
  }
  fflush(stdout);
}

float elapsedUs(cudaEvent_t a, cudaEvent_t b) {
  float ms = 0;
  PERF_CUDA(cudaEventElapsedTime(&ms, a, b));
  return ms * 1000.0f;
}

}  // namespace

int main(int argc, char** argv) {
  const char* prog = "ll_perf";
  LlOpts lo;
  if (!takeLlFlags(&argc, argv, &lo)) {
    fprintf(stderr, "%s: bad value for -F (fp32|pow2|ue8m0), -l (1..8), -W (0|1) or -G (0|1)\n", prog);
    return 1;
  }
  Options opt;
  opt.minTokens = 128;
  opt.maxTokens = 128;
  opt.numExperts = 288;
  opt.dtype = ncclMoeFp8E4m3;
  opt.iters = 100;
  opt.warmup = 20;
  int rc = moe_perf::parseOptions(argc, argv, prog, &opt);
  if (rc >= 0) {
    if (rc == 0)
      printf("ll_perf also takes: -F fp32|pow2|ue8m0 (default fp32)  -l <slots> (default 2)  "
             "-W 0|1 weights to the dispatch (default 1)  -G 0|1 hold the stream (default 1)\n"
             "ll_perf defaults: -b 128 -e 128 -E 288 "
             "-d fp8 -n 100 -w 20\n");
    return rc;
  }
  moe_ranks::RankEnv env;
  if (!moe_ranks::start(opt.nRanks, &env)) return 1;
  if (env.nRanks == 0) return moe_ranks::finish(0);
  if (opt.numExperts % env.nRanks != 0) {
    if (env.rank == 0)
      fprintf(stderr, "%s: -E %d is not a multiple of %d ranks\n", prog, opt.numExperts, env.nRanks);
    return moe_ranks::finish(1);
  }
  if (opt.dtype == ncclMoeFp8E4m3 && lo.fmt == ncclMoeScaleUe8m0 && opt.hidden % 512 != 0) {
    if (env.rank == 0) fprintf(stderr, "%s: -F ue8m0 needs -H a multiple of 512\n", prog);
    return moe_ranks::finish(1);
  }
  ncclComm_t comm = nullptr;
  PERF_NCCL(moe_ranks::initComm(env, &comm));
  moe_perf::printHeader(prog, opt, env);
  moe_perf::printNote("LL: scales %s  slots %d  combine %s  times %s; the tables below: per "
                      "rank the median over iterations,", fmtName(lo.fmt), lo.slots,
                      lo.weighted ? "weighted" : "unweighted",
                      lo.hold ? "GPU-only (stream held, -G 1)" : "from the host call (-G 0)");
  moe_perf::printNote("then median / p99 over ranks (us); GB/s = median over ranks of bytes / "
                      "median time, bytes: rows per (token, expert) pair, "
                      "dispatched / combined (see ll_perf.cc)");

  Ctx c;
  c.R = env.nRanks;
  c.me = env.rank;
  c.E = opt.numExperts;
  c.L = c.E / c.R;
  c.H = opt.hidden;
  c.K = opt.topK;
  c.M = (int)opt.maxTokensPerRank;
  c.fp8 = opt.dtype == ncclMoeFp8E4m3;
  c.skew = opt.routing == moe_perf::Routing::kSkew;
  c.fmt = c.fp8 ? lo.fmt : ncclMoeScaleFp32;
  c.seed = opt.seed;

  ncclMoeConfig_t cfg = NCCL_MOE_CONFIG_INITIALIZER;
  cfg.mode = ncclMoeLowLatency;
  cfg.numExperts = c.E;
  cfg.hidden = c.H;
  cfg.topK = c.K;
  cfg.maxTokensPerRank = c.M;
  cfg.dispatchDtype = opt.dtype;
  cfg.numSms = opt.numSms;
  cfg.numBufferSlots = lo.slots;
  cfg.fp8Scales = c.fmt;
  size_t winBytes = 0;
  PERF_MOE(ncclMoeGetWindowSize(&cfg, c.R, &winBytes));
  moe_perf::printNote("EP window: %.1f MiB per rank", winBytes / 1048576.0);
  ncclMoeComm_t moe = nullptr;
  PERF_MOE(ncclMoeCommCreate(comm, &cfg, &moe));
  cudaStream_t stream;
  PERF_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  gStream = stream;
  void *dx = nullptr, *didx = nullptr, *dw = nullptr, *dout = nullptr;
  PERF_CUDA(cudaMalloc(&dx, (size_t)c.M * c.H * 2));
  PERF_CUDA(cudaMalloc(&didx, (size_t)c.M * c.K * 8));
  PERF_CUDA(cudaMalloc(&dw, (size_t)c.M * c.K * 4));
  PERF_CUDA(cudaMalloc(&dout, (size_t)c.M * c.H * 2));
  cudaEvent_t ev[3];
  for (cudaEvent_t& e : ev) PERF_CUDA(cudaEventCreate(&e));
  const bool check = opt.check != 0;
  const char* names[6] = {"dispatch one-shot", "combine one-shot", "dispatch send-only",
                          "dispatch complete", "combine send-only", "combine complete"};
  std::vector<OpRow> table[6];
  long long totalWrong = 0;

  for (long T : moe_perf::tokenSweep(opt)) {
    std::vector<moe_ref::Routing> rt(c.R);
    for (int s = 0; s < c.R; s++) rt[s] = makeRouting(c, s, T);
    const moe_ref::Routing& own = rt[c.me];
    const std::vector<uint16_t> x = makeTokens(c, c.me, T);
    copy(dx, x.data(), x.size() * 2, cudaMemcpyHostToDevice);
    copy(didx, own.topkIdx.data(), own.topkIdx.size() * 8, cudaMemcpyHostToDevice);
    copy(dw, own.topkWeights.data(), own.topkWeights.size() * 4, cudaMemcpyHostToDevice);
    const int64_t* idx = (const int64_t*)didx;
    const float* w = lo.weighted ? (const float*)dw : nullptr;
    const long recvRows = moe_ref::llDispatch(c.me, rt, c.E).totalRows();
    long pairs = 0;
    for (int64_t e : own.topkIdx) pairs += e >= 0;
    const double dBytes = (double)recvRows * (rowBytes(c) + scaleBytes(c));
    const double cBytes = (double)pairs * c.H * 2;
    ncclMoeLowLatencyOutput_t out;
    std::vector<ncclMoeLowLatencyOutput_t> seen(lo.slots);  // each slot's outputs, once known
    for (ncclMoeLowLatencyOutput_t& o : seen) memset(&o, 0, sizeof(o));
    auto sync = [&] {
      PERF_CUDA(cudaStreamSynchronize(stream));
      PERF_MOE(ncclMoeCheckErrors(moe));
      moe_ranks::barrier();
    };
    // Before a timed step: the ranks meet, then (-G 1) the stream is held while the host enqueues.
    auto startStep = [&] {
      sync();
      if (lo.hold) moe_perf::holdStream(stream, kHoldUs);
    };

    std::vector<double> times[6];
    for (int i = 0; i < opt.warmup + opt.iters; i++) {  // one-shot
      startStep();
      PERF_CUDA(cudaEventRecord(ev[0], stream));
      PERF_MOE(ncclMoeLowLatencyDispatch(moe, dx, idx, w, (int)T, 0, &out, stream));
      PERF_CUDA(cudaEventRecord(ev[1], stream));
      PERF_MOE(ncclMoeLowLatencyCombine(moe, &out, out.combineInput, dout, 0, stream));
      PERF_CUDA(cudaEventRecord(ev[2], stream));
      PERF_CUDA(cudaEventSynchronize(ev[2]));
      seen[out.slot] = out;
      if (i < opt.warmup) continue;
      times[0].push_back(elapsedUs(ev[0], ev[1]));
      times[1].push_back(elapsedUs(ev[1], ev[2]));
    }
    // Split: each call timed alone, the ranks meeting between calls.
    auto timed = [&](std::vector<double>* t, bool keep, auto&& call) {
      startStep();
      PERF_CUDA(cudaEventRecord(ev[0], stream));
      call();
      PERF_CUDA(cudaEventRecord(ev[1], stream));
      PERF_CUDA(cudaEventSynchronize(ev[1]));
      if (keep) t->push_back(elapsedUs(ev[0], ev[1]));
    };
    for (int i = 0; i < opt.warmup + opt.iters; i++) {
      const bool keep = i >= opt.warmup;
      timed(&times[2], keep, [&] {
        PERF_MOE(ncclMoeLowLatencyDispatch(moe, dx, idx, w, (int)T, NCCL_MOE_LL_SEND_ONLY, &out, stream));
      });
      timed(&times[3], keep, [&] { PERF_MOE(ncclMoeLowLatencyDispatchComplete(moe, &out, stream)); });
      timed(&times[4], keep, [&] {
        PERF_MOE(ncclMoeLowLatencyCombine(moe, &out, out.combineInput, dout, NCCL_MOE_LL_SEND_ONLY,
                                          stream));
      });
      timed(&times[5], keep, [&] {
        PERF_MOE(ncclMoeLowLatencyCombineComplete(moe, &out, dout, stream));
      });
    }
    long long dWrong = -1, cWrong = -1;
    if (check) {  // one more one-shot run on a poisoned slot, checked
      const ncclMoeLowLatencyOutput_t& nx = seen[(out.slot + 1) % lo.slots];
      if (nx.x) {
        fill(nx.x, slotRows(c) * rowBytes(c));
        fill(nx.xScales, slotRows(c) * scaleBytes(c));
        fill(nx.srcToken, slotRows(c) * sizeof(int));
        fill(nx.recvCountsPerSource, (size_t)c.L * c.R * sizeof(int));
        fill(nx.expertCounts, (size_t)c.L * sizeof(int));
      }
      sync();
      PERF_MOE(ncclMoeLowLatencyDispatch(moe, dx, idx, w, (int)T, 0, &out, stream));
      sync();
      dWrong = checkDispatchAndFillExpert(c, T, out, rt);
      fill(dout, (size_t)c.M * c.H * 2);
      sync();
      PERF_MOE(ncclMoeLowLatencyCombine(moe, &out, out.combineInput, dout, 0, stream));
      sync();
      cWrong = checkCombine(c, T, own, lo.weighted, dout);
    }
    sync();
    const double bytes[6] = {dBytes, cBytes, -1, dBytes, -1, cBytes};
    const long long wrong[6] = {dWrong, cWrong, -1, -1, -1, -1};
    for (int op = 0; op < 6; op++) {
      table[op].push_back(reduceOp(T, times[op], bytes[op], wrong[op], c.R, c.me));
      if (table[op].back().wrong > 0) totalWrong += table[op].back().wrong;
    }
  }

  for (int op = 0; op < 6; op++) printOps(c.me, names[op], table[op]);
  if (!table[0].empty()) {
    cudaDeviceProp prop;
    PERF_CUDA(cudaGetDeviceProperties(&prop, env.localRank));
    const OpRow &d = table[0].back(), &cb = table[1].back();
    char wr[32] = "N/A";
    if (check) snprintf(wr, sizeof(wr), "%lld", totalWrong);
    moe_perf::printNote("%s", "");
    moe_perf::printNote(
        "summary %s ranks=%d T=%ld H=%d K=%d E=%d sms=%d %s%s%s: dispatch %.1f us (p99 %.1f) "
        "%.1f GB/s | combine %.1f us (p99 %.1f) %.1f GB/s | send-only %.1f + complete %.1f us "
        "| combine send-only %.1f + complete %.1f us | #wrong %s",
        prop.name, c.R, d.tokens, c.H, c.K, c.E, opt.numSms, c.fp8 ? "fp8-" : "bf16",
        c.fp8 ? fmtName(c.fmt) : "", lo.weighted ? "" : " unweighted", d.medUs, d.p99Us, d.gbps,
        cb.medUs, cb.p99Us, cb.gbps, table[2].back().medUs, table[3].back().medUs,
        table[4].back().medUs, table[5].back().medUs, wr);
  }
  PERF_MOE(ncclMoeCommDestroy(moe));
  for (cudaEvent_t& e : ev) PERF_CUDA(cudaEventDestroy(e));
  PERF_CUDA(cudaFree(dx));
  PERF_CUDA(cudaFree(didx));
  PERF_CUDA(cudaFree(dw));
  PERF_CUDA(cudaFree(dout));
  PERF_CUDA(cudaStreamDestroy(stream));
  PERF_NCCL(ncclCommDestroy(comm));
  if (totalWrong > 0) moe_perf::printNote("FAILED: %lld wrong elements", totalWrong);
  return moe_ranks::finish(totalWrong > 0 ? 1 : 0);
}
