// ll_perf: low-latency (LL) dispatch / combine performance, nccl-tests style.
//
// For each token count T of the sweep (tokens per rank), every rank generates its routing (K
// distinct experts per token, uniform over E; --routing skew: the first one among rank 0's
// experts) and its BF16 tokens on the host from (seed, rank, T). The harness (common.h) times
// each call alone, the ranks meeting on the host before it; with --hold-stream 1 (default) a
// kernel holds the stream while the call and its events are enqueued, so the time is the GPU's
// (as a profiler's kernel times), with 0 it includes the host's call and launch. Operations:
//   dispatch            one-shot ncclMoeLowLatencyDispatch (given the weights unless -W 0, so
//                       that its combine is weighted); a combine follows, untimed;
//   combine             one-shot ncclMoeLowLatencyCombine of the identity expert
//                       (out.combineInput) after an untimed dispatch;
//   dispatch_send       send-only dispatch; dispatch_complete its completion once every peer
//                       has sent (the ranks meet in between): the cost left with perfect overlap;
//   combine_send, combine_complete   the same for the combine;
//   pair_in_stream      kPairsInStream one-shot dispatches, each followed by its combine, all
//                       enqueued behind the hold with no event between them (a decode step's
//                       stream: each kernel starts ≈ 1.4 µs after the previous one ends, where an
//                       event in between adds ≈ 3 µs); time per (dispatch + combine) pair, not
//                       checked (the same calls as the dispatch and combine rows).
// Check (-c 1): one more one-shot dispatch on a poisoned slot and a combine, compared with
// moe_ref (testing/reference_ll.h): counts, every (expert, source) block as a set keyed by
// srcToken (row and scale bytes), the combine of the identity expert.
// Bytes (README: Bandwidth definitions):
//   dispatch algbw: one row per (token, expert) pair this rank receives (a token with two
//             experts here counts twice) * (H*2 BF16, or H + scale bytes FP8); busbw: one row
//             per (token, rank) pair from another rank, what crosses NVLink;
//   combine algbw: one BF16 row of H*2 bytes per valid (token, k) pair of this rank's own
//             tokens (DeepEP's definition); busbw: one per (token, other rank) pair.
// Several nodes (MOE_FAKE_NODES, or real ones): before each size, rank 0 prints the network term
// of testing/ll_net_model.h for the plugin's shaping (NCCL_MOELOOP_GBPS / _LATENCY_US), the busiest
// rank's NIC, to compare with the measured times.
// Own options: -F/--scales, -l/--slots, -W/--weighted, --hold-stream (see -h). Defaults here:
// -b 128 -e 128 -E 288 -d fp8 -n 100 -w 20.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <string>
#include <vector>

#include <nccl_device.h>

#include "common.h"
#include "../testing/ll_net_model.h"
#include "../testing/reference_ll.h"

namespace {

const char* fmtName(ncclMoeScaleFormat_t f) {
  return f == ncclMoeScaleUe8m0 ? "ue8m0" : f == ncclMoeScaleFp32Pow2 ? "pow2" : "fp32";
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

// Everything one run holds: options, buffers and the inputs of the current T.
struct Bench {
  ncclMoeScaleFormat_t fmt = ncclMoeScaleFp32;  // -F
  int slots = 2;                                // -l
  bool weighted = true;                         // -W
  moe_perf::Context ctx;
  Ctx c;
  size_t windowBytes = 0;
  void *dx = nullptr, *didx = nullptr, *dw = nullptr, *dout = nullptr;
  long T = 0;
  std::vector<moe_ref::Routing> rt;  // every rank's routing at T
  double dispatchBytes = 0, dispatchRemote = 0, combineBytes = 0, combineRemote = 0;
  ncclMoeLowLatencyOutput_t out;
  std::vector<ncclMoeLowLatencyOutput_t> seen;  // each slot's outputs, once known

  void dispatch(unsigned flags) {
    PERF_MOE(ncclMoeLowLatencyDispatch(ctx.moe, dx, (const int64_t*)didx,
                                       weighted ? (const float*)dw : nullptr, (int)T, flags, &out,
                                       ctx.stream));
    seen[out.slot] = out;
  }
  void dispatchComplete() { PERF_MOE(ncclMoeLowLatencyDispatchComplete(ctx.moe, &out, ctx.stream)); }
  void combine(unsigned flags) {
    PERF_MOE(ncclMoeLowLatencyCombine(ctx.moe, &out, out.combineInput, dout, flags, ctx.stream));
  }
  void combineComplete() { PERF_MOE(ncclMoeLowLatencyCombineComplete(ctx.moe, &out, dout, ctx.stream)); }

  void configure(ncclMoeConfig_t* cfg) {
    cfg->numBufferSlots = slots;
    cfg->fp8Scales = cfg->dispatchDtype == ncclMoeFp8E4m3 ? fmt : ncclMoeScaleFp32;
  }

  void setup(const moe_perf::Context& context, const ncclMoeConfig_t& cfg) {
    ctx = context;
    const moe_perf::Options& opt = *ctx.opt;
    c.R = ctx.env.nRanks;
    c.me = ctx.env.rank;
    c.E = opt.numExperts;
    c.L = c.E / c.R;
    c.H = opt.hidden;
    c.K = opt.topK;
    c.M = (int)opt.maxTokensPerRank;
    c.fp8 = opt.fp8;
    c.skew = opt.routing == moe_perf::Routing::kSkew;
    c.fmt = cfg.fp8Scales;
    c.seed = opt.seed;
    gStream = ctx.stream;
    PERF_MOE(ncclMoeGetWindowSize(&cfg, c.R, &windowBytes));
    PERF_CUDA(cudaMalloc(&dx, (size_t)c.M * c.H * 2));
    PERF_CUDA(cudaMalloc(&didx, (size_t)c.M * c.K * 8));
    PERF_CUDA(cudaMalloc(&dw, (size_t)c.M * c.K * 4));
    PERF_CUDA(cudaMalloc(&dout, (size_t)c.M * c.H * 2));
    seen.resize(slots);
    for (ncclMoeLowLatencyOutput_t& o : seen) memset(&o, 0, sizeof(o));
    memset(&out, 0, sizeof(out));
  }

  void prepare(long tokens) {
    T = tokens;
    rt.assign(c.R, moe_ref::Routing());
    for (int s = 0; s < c.R; s++) rt[s] = makeRouting(c, s, T);
    const moe_ref::Routing& own = rt[c.me];
    const std::vector<uint16_t> x = makeTokens(c, c.me, T);
    copy(dx, x.data(), x.size() * 2, cudaMemcpyHostToDevice);
    copy(didx, own.topkIdx.data(), own.topkIdx.size() * 8, cudaMemcpyHostToDevice);
    copy(dw, own.topkWeights.data(), own.topkWeights.size() * 4, cudaMemcpyHostToDevice);
    // Rows per (token, expert) pair received / sent, and per (token, other rank) pair.
    const double rowIn = rowBytes(c) + scaleBytes(c), rowOut = 2.0 * c.H;
    long remoteIn = 0, remoteOut = 0, pairsOut = 0;
    for (int s = 0; s < c.R; s++)
      for (long t = 0; t < T; t++) {
        std::vector<bool> ranks(c.R, false);
        for (int k = 0; k < c.K; k++) {
          const int64_t e = rt[s].topkIdx[(size_t)t * c.K + k];
          if (e >= 0) ranks[e / c.L] = true;
          if (s == c.me) pairsOut += e >= 0;
        }
        if (s != c.me) remoteIn += ranks[c.me];
        if (s == c.me)
          for (int r = 0; r < c.R; r++) remoteOut += r != c.me && ranks[r];
      }
    dispatchBytes = (double)moe_ref::llDispatch(c.me, rt, c.E).totalRows() * rowIn;
    dispatchRemote = (double)remoteIn * rowIn;
    combineBytes = (double)pairsOut * rowOut;
    combineRemote = (double)remoteOut * rowOut;
    if (c.me == 0) printNetModel();
  }

  // The network model of this size (testing/ll_net_model.h), when the ranks span several nodes.
  void printNetModel() const {
    const int G = ncclTeamLsa(ctx.comm).nRanks;
    if (G <= 0 || G >= c.R) return;
    moe_net::LlNetShape s;
    s.nRanks = c.R;
    s.gpusPerNode = G;
    s.numExperts = c.E;
    s.hidden = c.H;
    s.topK = c.K;
    s.fp8 = c.fp8;
    s.scaleBytes = scaleBytes(c);
    const moe_net::NicShape nic = moe_net::nicShapeFromEnv();
    double dispatchUs = 0, combineUs = 0, dispatchMb = 0, combineMb = 0;
    for (int r = 0; r < c.R; r++) {
      const moe_net::LlNetTraffic t = moe_net::llNetTraffic(s, rt, r);
      dispatchUs = std::max(dispatchUs, moe_net::llNetModelUs(nic, t.dispatchOut, t.dispatchIn));
      combineUs = std::max(combineUs, moe_net::llNetModelUs(nic, t.combineOut, t.combineIn));
      dispatchMb = std::max(dispatchMb, std::max(t.dispatchOut, t.dispatchIn) / 1e6);
      combineMb = std::max(combineMb, std::max(t.combineOut, t.combineIn) / 1e6);
    }
    printf("# net model, %ld tokens (%d nodes x %d GPUs, NIC %g GB/s + %g us per message): dispatch +%.2f us "
           "(busiest NIC %.3f MB), combine +%.2f us (%.3f MB)\n",
           T, c.R / G, G, nic.gbps, nic.latencyUs, dispatchUs, dispatchMb, combineUs, combineMb);
    fflush(stdout);
  }

  // One checked one-shot dispatch into a poisoned slot; the received rows' identity expert
  // output is left in out.combineInput. Returns the dispatch's wrong elements.
  long long checkedDispatch() {
    const ncclMoeLowLatencyOutput_t& nx = seen[(out.slot + 1) % slots];  // the next slot
    if (nx.x) {
      fill(nx.x, slotRows(c) * rowBytes(c));
      fill(nx.xScales, slotRows(c) * scaleBytes(c));
      fill(nx.srcToken, slotRows(c) * sizeof(int));
      fill(nx.recvCountsPerSource, (size_t)c.L * c.R * sizeof(int));
      fill(nx.expertCounts, (size_t)c.L * sizeof(int));
    }
    moe_perf::quiesce(ctx);
    dispatch(0);
    moe_perf::quiesce(ctx);
    return checkDispatchAndFillExpert(c, T, out, rt);
  }

  std::vector<moe_perf::PerfOp> ops() {
    const unsigned kSend = NCCL_MOE_LL_SEND_ONLY;
    constexpr int kPairsInStream = 8;  // 16 calls: well inside the hold (kHoldUs) to enqueue
    std::vector<moe_perf::PerfOp> v(7);
    v[0].name = "dispatch";
    v[0].run = [this] { dispatch(0); };
    v[0].post = [this] { combine(0); };
    v[0].bytes = [this](long, double* alg, double* bus) { *alg = dispatchBytes; *bus = dispatchRemote; };
    v[0].check = [this](long) {
      const long long wrong = checkedDispatch();
      combine(0);
      return wrong;
    };
    v[1].name = "combine";
    v[1].pre = [this] { dispatch(0); };
    v[1].run = [this] { combine(0); };
    v[1].bytes = [this](long, double* alg, double* bus) { *alg = combineBytes; *bus = combineRemote; };
    v[1].check = [this](long) {
      checkedDispatch();  // its wrong elements are the dispatch row's
      fill(dout, (size_t)c.M * c.H * 2);
      combine(0);
      moe_perf::quiesce(ctx);
      return checkCombine(c, T, rt[c.me], weighted, dout);
    };
    v[2].name = "dispatch_send";
    v[2].run = [this, kSend] { dispatch(kSend); };
    v[2].post = [this] { dispatchComplete(); combine(0); };
    v[3].name = "dispatch_complete";
    v[3].pre = [this, kSend] { dispatch(kSend); };
    v[3].run = [this] { dispatchComplete(); };
    v[3].post = [this] { combine(0); };
    v[4].name = "combine_send";
    v[4].pre = [this] { dispatch(0); };
    v[4].run = [this, kSend] { combine(kSend); };
    v[4].post = [this] { combineComplete(); };
    v[5].name = "combine_complete";
    v[5].pre = [this, kSend] { dispatch(0); combine(kSend); };
    v[5].run = [this] { combineComplete(); };
    v[6].name = "pair_in_stream";
    v[6].run = [this] {
      for (int i = 0; i < kPairsInStream; ++i) {
        dispatch(0);
        combine(0);
      }
    };
    v[6].callsPerRun = kPairsInStream;
    return v;
  }

  void teardown() {
    for (void* p : {dx, didx, dw, dout}) PERF_CUDA(cudaFree(p));
  }
};

}  // namespace

int main(int argc, char** argv) {
  static Bench bench;
  static ncclMoeConfig_t config;
  moe_perf::PerfTest test;
  test.name = "ll_perf";
  test.mode = ncclMoeLowLatency;
  test.timing = moe_perf::Timing::kEachCallHeld;
  test.extraOptions = {
      {"scales", 'F', "fp32|pow2|ue8m0", "FP8 scale format (default fp32)",
       [](const char* v) {
         const ncclMoeScaleFormat_t all[] = {ncclMoeScaleFp32, ncclMoeScaleFp32Pow2, ncclMoeScaleUe8m0};
         for (ncclMoeScaleFormat_t f : all)
           if (!strcmp(v, fmtName(f))) return bench.fmt = f, true;
         return false;
       }},
      {"slots", 'l', "1..8", "numBufferSlots of the EP context (default 2)",
       [](const char* v) {
         char* end = nullptr;
         const long n = strtol(v, &end, 10);
         if (end == v || *end != '\0' || n < 1 || n > 8) return false;
         bench.slots = (int)n;
         return true;
       }},
      {"weighted", 'W', "0|1", "weights given to the dispatch: weighted combine (default 1)",
       [](const char* v) { return moe_perf::parse01(v, &bench.weighted); }},
      {"hold-stream", 0, "0|1",
       "1: GPU time, the stream held while a call is enqueued (default); 0: from the host call",
       [&test](const char* v) {
         bool hold = true;
         if (!moe_perf::parse01(v, &hold)) return false;
         test.timing = hold ? moe_perf::Timing::kEachCallHeld : moe_perf::Timing::kEachCall;
         return true;
       }},
  };
  test.validate = [](const moe_perf::Options& opt) -> std::string {
    if (opt.routing == moe_perf::Routing::kGroup) return "--routing group is ht_perf's (here: random|skew)";
    if (opt.fp8 && bench.fmt == ncclMoeScaleUe8m0 && opt.hidden % 512 != 0)
      return "--scales ue8m0 needs -H a multiple of 512";
    return "";
  };
  test.configure = [](ncclMoeConfig_t* cfg) {
    bench.configure(cfg);
    config = *cfg;
  };
  test.params = [] {
    char window[32];
    snprintf(window, sizeof(window), "%.1f", bench.windowBytes / 1048576.0);
    return moe_perf::Params{{"scales", bench.c.fp8 ? fmtName(bench.c.fmt) : "-"},
                            {"slots", std::to_string(bench.slots)},
                            {"weighted", bench.weighted ? "1" : "0"},
                            {"window_mib", window}};
  };
  test.setup = [](const moe_perf::Context& ctx) {
    bench.setup(ctx, config);
    return bench.ops();
  };
  test.prepare = [](long T) { bench.prepare(T); };
  test.teardown = [] { bench.teardown(); };
  moe_perf::Options opt;
  opt.minTokens = 128;
  opt.maxTokens = 128;
  opt.numExperts = 288;
  opt.fp8 = true;
  opt.iters = 100;
  opt.warmup = 20;
  return moe_perf::perfMain(argc, argv, opt, &test);
}
