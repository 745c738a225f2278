// Harness of the low-latency multi-GPU tests (see ll_test_util.h).
#include "ll_test_util.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <algorithm>
#include <numeric>
#include <sstream>

namespace moe_gpu {

namespace {

// Mismatches of one field, reported as one failure with the first few.
struct Diff {
  Diff(const std::string& t, const char* f) : tag(t), field(f) {}
  std::string tag;
  const char* field;
  long count = 0;
  std::ostringstream first;
  void add(const std::string& where, const std::string& got, const std::string& expected) {
    if (count++ < 6) first << "\n    (rank " << rank() << ", " << where << "): got " << got
                           << ", expected " << expected;
  }
  long report() {
    if (count)
      ADD_FAILURE() << tag << ": rank " << rank() << ": " << field << ": " << count
                    << " mismatches; first:" << first.str();
    return count;
  }
};

std::string hex(uint64_t v, int digits) {
  char b[32];
  snprintf(b, sizeof(b), "0x%0*llx", digits, (unsigned long long)v);
  return b;
}

std::string blockName(int l, int s) {
  return "local expert " + std::to_string(l) + ", source " + std::to_string(s);
}

// Events and scratch memory of the split runners, created once per process.
struct SideState {
  cudaStream_t stream = nullptr;
  cudaEvent_t sent = nullptr, done = nullptr;
  void* scratch = nullptr;
  size_t scratchBytes = 64u << 20;
};

SideState& side() {
  static SideState st;
  if (!st.stream) {
    CUDA_OK(cudaStreamCreateWithFlags(&st.stream, cudaStreamNonBlocking));
    CUDA_OK(cudaEventCreateWithFlags(&st.sent, cudaEventDisableTiming));
    CUDA_OK(cudaEventCreateWithFlags(&st.done, cudaEventDisableTiming));
    if (!CUDA_OK(cudaMalloc(&st.scratch, st.scratchBytes))) st.scratch = nullptr;
  }
  return st;
}

// stream() -> host delay -> other work and `complete` on the side stream -> stream() waits.
// Works under stream capture too (event fork / join; the delay then only delays the capture).
template <class F>
bool completeElsewhere(F complete) {
  SideState& st = side();
  bool ok = CUDA_OK(cudaEventRecord(st.sent, stream()));
  usleep(1000 + 1500 * rank());
  ok = ok && CUDA_OK(cudaStreamWaitEvent(st.stream, st.sent, 0));
  if (ok && st.scratch)
    ok = CUDA_OK(cudaMemsetAsync(st.scratch, rank() + 1, st.scratchBytes, st.stream));
  ok = ok && complete();
  // Join even after a failure so that a capture can end.
  bool joined = CUDA_OK(cudaEventRecord(st.done, st.stream));
  joined = joined && CUDA_OK(cudaStreamWaitEvent(stream(), st.done, 0));
  return ok && joined;
}

}  // namespace

int LlShape::numExperts() const {
  int r = std::max(nRanks(), 1);
  return (experts + r - 1) / r * r;
}

const char* scaleFormatName(ncclMoeScaleFormat_t f) {
  switch (f) {
    case ncclMoeScaleFp32: return "fp32";
    case ncclMoeScaleFp32Pow2: return "pow2";
    case ncclMoeScaleUe8m0: return "ue8m0";
  }
  return "?";
}

std::string LlShape::str() const {
  std::ostringstream s;
  s << "LL H" << hidden << " K" << topK << " E" << numExperts() << " M" << maxTokens << " "
    << (fp8 ? std::string("fp8-") + scaleFormatName(fmt) : std::string("bf16")) << " sms"
    << numSms << " slots" << slots;
  return s.str();
}

ncclMoeConfig_t makeLlConfig(const LlShape& s) {
  ncclMoeConfig_t c = NCCL_MOE_CONFIG_INITIALIZER;
  c.mode = ncclMoeLowLatency;
  c.numExperts = s.numExperts();
  c.hidden = s.hidden;
  c.topK = s.topK;
  c.maxTokensPerRank = s.maxTokens;
  c.dispatchDtype = s.fp8 ? ncclMoeFp8E4m3 : ncclMoeBf16;
  c.numSms = s.numSms;
  c.timeoutMs = s.timeoutMs;
  c.numBufferSlots = s.slots;
  c.fp8Scales = s.fp8 ? s.fmt : ncclMoeScaleFp32;
  return c;
}

LlProblem makeLlProblem(const LlShape& s, const GenSpec& g) {
  Shape hs;
  hs.hidden = s.hidden;
  hs.topK = s.topK;
  hs.experts = s.experts;
  hs.maxTokens = s.maxTokens;
  hs.dtype = ncclMoeBf16;
  Problem base = makeProblem(hs, g);
  LlProblem p;
  p.shape = s;
  p.routing = std::move(base.routing);
  const int R = nRanks(), H = s.hidden, G = H / 128;
  p.x.resize(R);
  p.send.resize(R);
  for (int r = 0; r < R; r++) {
    const int T = p.routing[r].numTokens;
    std::vector<uint16_t>& x = p.x[r];
    x.resize((size_t)T * H);
    if (T) memcpy(x.data(), base.x[r].data(), x.size() * 2);
    for (int t = 0; t < T && G > 0; t++) {
      uint16_t* row = &x[(size_t)t * H];
      if (t % 5 == 1) {  // an all-zero group (amax clamped to 1e-4)
        const int grp = (t / 5 + r) % G;
        for (int c = 0; c < 128; c++) row[grp * 128 + c] = 0;
      }
      if (t % 7 == 3) {  // a group below the amax floor
        const int grp = (t / 7 + 2 * r + 1) % G;
        for (int c = 0; c < 128; c++) {
          float v = moe_ref::bf16ToFloat(row[grp * 128 + c]) * (1.0f / 1048576.0f);
          row[grp * 128 + c] = moe_ref::floatToBf16(v);
        }
      }
    }
    p.send[r] = moe_ref::llSendRows(x, T, H, s.fp8, s.fmt);
  }
  return p;
}

void resendRows(LlProblem& p, int r) {
  const LlShape& s = p.shape;
  p.send[r] = moe_ref::llSendRows(p.x[r], p.routing[r].numTokens, s.hidden, s.fp8, s.fmt);
}

void cutLlTokens(LlProblem& p, const std::vector<int>& tokens) {
  const LlShape& s = p.shape;
  for (int r = 0; r < (int)p.routing.size() && r < (int)tokens.size(); r++) {
    const int T = trimRouting(p.routing[r], tokens[r], s.topK);
    p.x[r].resize((size_t)T * s.hidden);
    resendRows(p, r);
  }
}

moe_ref::LlReceived llReference(const LlProblem& p) {
  return moe_ref::llDispatch(rank(), p.routing, p.shape.numExperts());
}

bool LlInputs::upload(const LlProblem& p) {
  const LlShape& s = p.shape;
  const moe_ref::Routing& r = p.routing[rank()];
  const size_t T = r.numTokens, maxT = s.maxTokens, K = s.topK;
  bool ok = x.alloc(maxT * s.hidden * 2) && topkIdx.alloc(maxT * K * sizeof(int64_t)) &&
            weights.alloc(maxT * K * sizeof(float));
  if (!ok) return false;
  ok = moe_gpu::upload(x.get(), p.x[rank()].data(), T * s.hidden * 2);
  ok = moe_gpu::upload(topkIdx.get(), r.topkIdx.data(), T * K * sizeof(int64_t)) && ok;
  ok = moe_gpu::upload(weights.get(), r.topkWeights.data(), T * K * sizeof(float)) && ok;
  return ok;
}

long checkLlDispatch(const ncclMoeLowLatencyOutput_t& out, const LlProblem& p,
                     const moe_ref::LlReceived& ref, const char* tag, bool countsOnly,
                     LlBlocks* got, const LlByteMask& mask) {
  const LlShape& s = p.shape;
  const int me = rank(), R = nRanks(), L = s.local(), M = s.maxTokens, H = s.hidden;
  const size_t B = s.blockRows();
  if (!out.x || !out.srcToken || !out.recvCountsPerSource || !out.expertCounts ||
      !out.combineInput || (s.fp8 && !out.xScales)) {
    ADD_FAILURE() << tag << ": rank " << me << ": NULL pointer in the LL dispatch output";
    return 1;
  }
  long bad = 0;
  if (out.numTokens != p.tokens(me)) {
    ADD_FAILURE() << tag << ": rank " << me << ": out.numTokens " << out.numTokens
                  << ", expected " << p.tokens(me);
    bad++;
  }
  LlBlocks b;
  b.counts.assign((size_t)L * R, -1);
  b.expertCounts.assign(L, -1);
  download(b.counts.data(), out.recvCountsPerSource, b.counts.size() * sizeof(int));
  download(b.expertCounts.data(), out.expertCounts, b.expertCounts.size() * sizeof(int));
  Diff dc(tag, "recvCountsPerSource");
  for (int l = 0; l < L; l++)
    for (int src = 0; src < R; src++)
      if (b.counts[(size_t)l * R + src] != ref.count(l, src))
        dc.add(blockName(l, src), std::to_string(b.counts[(size_t)l * R + src]),
               std::to_string(ref.count(l, src)));
  bad += dc.report();
  Diff de(tag, "expertCounts");
  for (int l = 0; l < L; l++)
    if (b.expertCounts[l] != ref.expertCounts[l])
      de.add("local expert " + std::to_string(l), std::to_string(b.expertCounts[l]),
             std::to_string(ref.expertCounts[l]));
  bad += de.report();
  if (countsOnly) {
    if (got) *got = std::move(b);
    return bad;
  }

  const int rowBytes = s.rowBytes(), scaleBytes = s.scaleBytes();
  b.srcToken.resize((size_t)L * R);
  b.rows.resize((size_t)L * R);
  b.scales.resize((size_t)L * R);
  Diff dt(tag, "srcToken set"), dx(tag, s.fp8 ? "x (fp8 bytes)" : "x (bf16)"), ds(tag, "xScales");
  for (int l = 0; l < L; l++)
    for (int src = 0; src < R; src++) {
      const size_t blk = (size_t)l * R + src;
      const std::vector<int>& want = ref.tokens(l, src);
      const int n = (int)want.size();
      if (n == 0) continue;
      const size_t row0 = (size_t)l * B + (size_t)src * M;
      std::vector<int>& tok = b.srcToken[blk];
      std::vector<uint8_t>& rows = b.rows[blk];
      std::vector<uint8_t>& sc = b.scales[blk];
      tok.resize(n);
      rows.resize((size_t)n * rowBytes);
      sc.resize((size_t)n * scaleBytes);
      download(tok.data(), out.srcToken + row0, n * sizeof(int));
      download(rows.data(), (const uint8_t*)out.x + row0 * rowBytes, rows.size());
      if (scaleBytes) download(sc.data(), (const uint8_t*)out.xScales + row0 * scaleBytes, sc.size());
      std::vector<int> order(n);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int a, int c) { return tok[a] < tok[c]; });
      const moe_ref::LlRows& sent = p.send[src];
      for (int i = 0; i < n; i++) {
        const int j = order[i], t = want[i];
        if (tok[j] != t) {
          dt.add(blockName(l, src) + ", sorted entry " + std::to_string(i),
                 std::to_string(tok[j]), std::to_string(t));
          continue;
        }
        const uint8_t* g = &rows[(size_t)j * rowBytes];
        const uint8_t* e = sent.row(t);
        if (mask && s.fp8) {
          for (int c = 0; c < H; c++) {
            const uint8_t m = mask(src, t, c);
            if ((g[c] & m) != (e[c] & m))
              dx.add(blockName(l, src) + ", token " + std::to_string(t) + ", col " + std::to_string(c) +
                         (m != 0xff ? " (mask " + hex(m, 2) + ")" : std::string()),
                     hex(g[c], 2), hex(e[c], 2));
          }
        } else if (memcmp(g, e, rowBytes) != 0) {
          const int eb = s.fp8 ? 1 : 2;
          for (int c = 0; c < H; c++)
            if (memcmp(g + c * eb, e + c * eb, eb) != 0) {
              uint32_t gv = 0, ev = 0;
              memcpy(&gv, g + c * eb, eb);
              memcpy(&ev, e + c * eb, eb);
              dx.add(blockName(l, src) + ", token " + std::to_string(t) + ", col " +
                         std::to_string(c), hex(gv, 2 * eb), hex(ev, 2 * eb));
            }
        }
        if (scaleBytes && memcmp(&sc[(size_t)j * scaleBytes], sent.scale(t), scaleBytes) != 0) {
          for (int c = 0; c < scaleBytes; c++)
            if (sc[(size_t)j * scaleBytes + c] != sent.scale(t)[c])
              ds.add(blockName(l, src) + ", token " + std::to_string(t) + ", scale byte " +
                         std::to_string(c), hex(sc[(size_t)j * scaleBytes + c], 2),
                     hex(sent.scale(t)[c], 2));
        }
      }
    }
  bad += dt.report() + dx.report() + ds.report();
  if (got) *got = std::move(b);
  return bad;
}

bool writeIdentityExpert(void* dst, const LlShape& s, const LlBlocks& got) {
  const int R = nRanks(), L = s.local(), M = s.maxTokens, H = s.hidden;
  const size_t B = s.blockRows();
  bool ok = poison(dst, s.slotRows() * H * 2);
  std::vector<uint16_t> rows;
  for (int l = 0; l < L && ok; l++)
    for (int src = 0; src < R; src++) {
      const size_t blk = (size_t)l * R + src;
      if (blk >= got.srcToken.size() || got.srcToken[blk].empty()) continue;
      const size_t n = got.srcToken[blk].size();
      rows.resize(n * H);
      for (size_t i = 0; i < n; i++) {
        if (s.fp8)
          moe_ref::llDequantRowToBf16(&got.rows[blk][i * H], &got.scales[blk][i * s.scaleBytes()],
                                      H, s.fmt, &rows[i * H]);
        else
          memcpy(&rows[i * H], &got.rows[blk][i * H * 2], (size_t)H * 2);
      }
      const size_t row0 = (size_t)l * B + (size_t)src * M;
      ok = upload((uint16_t*)dst + row0 * H, rows.data(), rows.size() * 2) && ok;
    }
  return ok;
}

uint16_t blockValue(int r, int l, int s, int h) {
  const int v = (r * 131 + l * 37 + s * 11 + h * 7) % 61 - 30;
  return moe_ref::floatToBf16((float)v * 0.125f);
}

bool writeBlockConstantExpert(void* dst, const LlShape& s) {
  const int R = nRanks(), L = s.local(), M = s.maxTokens, H = s.hidden, me = rank();
  std::vector<uint16_t> block((size_t)M * H);
  bool ok = true;
  for (int l = 0; l < L; l++)
    for (int src = 0; src < R; src++) {
      for (int h = 0; h < H; h++) block[h] = blockValue(me, l, src, h);
      for (int i = 1; i < M; i++) memcpy(&block[(size_t)i * H], block.data(), (size_t)H * 2);
      const size_t row0 = (size_t)l * s.blockRows() + (size_t)src * M;
      ok = upload((uint16_t*)dst + row0 * H, block.data(), block.size() * 2) && ok;
    }
  return ok;
}

std::vector<uint16_t> llIdentityCombine(const LlProblem& p, bool weighted) {
  const int me = rank(), H = p.shape.hidden;
  const moe_ref::LlRows& rows = p.send[me];
  return moe_ref::llCombine(p.routing[me], [&](int t, int) { return rows.identRow(t, H); }, H,
                            weighted, p.shape.numExperts(), nRanks());
}

std::vector<uint16_t> llBlockConstantCombine(const LlProblem& p, bool weighted) {
  const int me = rank(), H = p.shape.hidden, E = p.shape.numExperts(), L = p.shape.local();
  std::vector<std::vector<uint16_t>> perExpert(E, std::vector<uint16_t>(H));
  for (int e = 0; e < E; e++)
    for (int h = 0; h < H; h++) perExpert[e][h] = blockValue(e / L, e % L, me, h);
  const moe_ref::Routing& r = p.routing[me];
  return moe_ref::llCombine(
      r, [&](int t, int k) { return perExpert[r.topkIdx[(size_t)t * r.topK + k]].data(); }, H,
      weighted, E, nRanks());
}

cudaStream_t sideStream() { return side().stream; }


// --- LlEp ------------------------------------------------------------------------------------

LlEp::~LlEp() { destroy(); }

bool LlEp::create() {
  ncclMoeConfig_t cfg = makeLlConfig(shape);
  bool ok = MOE_OK(ncclMoeCommCreate(moe_gpu::comm(), &cfg, &comm));
  if (!ok) comm = nullptr;
  return allRanksOk(ok, ("ncclMoeCommCreate " + shape.str()).c_str());
}

bool LlEp::destroy() {
  if (!comm) return true;
  bool ok = CUDA_OK(cudaStreamSynchronize(stream()));
  ok = CUDA_OK(cudaStreamSynchronize(sideStream())) && ok;
  ok = MOE_OK(ncclMoeCommDestroy(comm)) && ok;
  comm = nullptr;
  return ok;
}

bool LlEp::poisonSlot(int slot) {
  if (slot < 0 || slot >= (int)haveSlot.size() || !haveSlot[slot]) return true;
  const ncclMoeLowLatencyOutput_t& o = known[slot];
  const size_t rows = shape.slotRows();
  bool ok = poison(o.x, rows * shape.rowBytes());
  if (shape.fp8) ok = poison(o.xScales, rows * shape.scaleBytes()) && ok;
  ok = poison(o.srcToken, rows * sizeof(int)) && ok;
  ok = poison(o.recvCountsPerSource, (size_t)shape.local() * nRanks() * sizeof(int)) && ok;
  return poison(o.expertCounts, (size_t)shape.local() * sizeof(int)) && ok;
}

bool LlEp::poisonNextSlot() { return poisonSlot(nextSlot); }

void LlEp::record(const ncclMoeLowLatencyOutput_t& out, const char* tag) {
  if (out.slot < 0 || out.slot >= shape.slots) {
    ADD_FAILURE() << tag << ": rank " << rank() << ": out.slot = " << out.slot << " outside 0.."
                  << shape.slots - 1;
    return;
  }
  EXPECT_EQ(out.slot, nextSlot) << tag << ": rank " << rank()
                                << ": slot is not dispatch count % numBufferSlots";
  if (haveSlot[out.slot]) {
    const ncclMoeLowLatencyOutput_t& k = known[out.slot];
    EXPECT_TRUE(k.x == out.x && k.xScales == out.xScales && k.srcToken == out.srcToken &&
                k.recvCountsPerSource == out.recvCountsPerSource &&
                k.expertCounts == out.expertCounts && k.combineInput == out.combineInput)
        << tag << ": rank " << rank() << ": the pointers of slot " << out.slot << " moved";
  }
  known[out.slot] = out;
  haveSlot[out.slot] = true;
  nextSlot = (out.slot + 1) % shape.slots;
}

// --- runners ---------------------------------------------------------------------------------

bool runLlDispatch(LlEp& ep, LlInputs& in, int numTokens, bool weighted, bool split,
                   ncclMoeLowLatencyOutput_t* out) {
  memset(out, 0, sizeof(*out));
  const int64_t* idx = in.topkIdx.as<int64_t>();
  const float* w = weighted ? in.weights.as<float>() : nullptr;
  if (!split)
    return MOE_OK(ncclMoeLowLatencyDispatch(ep.comm, in.x.get(), idx, w, numTokens, 0, out,
                                            stream()));
  if (!MOE_OK(ncclMoeLowLatencyDispatch(ep.comm, in.x.get(), idx, w, numTokens,
                                        NCCL_MOE_LL_SEND_ONLY, out, stream())))
    return false;
  return completeElsewhere(
      [&] { return MOE_OK(ncclMoeLowLatencyDispatchComplete(ep.comm, out, sideStream())); });
}

bool runLlCombine(LlEp& ep, const ncclMoeLowLatencyOutput_t& d, const void* expertOut, void* out,
                  bool split) {
  if (!split)
    return MOE_OK(ncclMoeLowLatencyCombine(ep.comm, &d, expertOut, out, 0, stream()));
  if (!MOE_OK(ncclMoeLowLatencyCombine(ep.comm, &d, expertOut, out, NCCL_MOE_LL_SEND_ONLY,
                                       stream())))
    return false;
  return completeElsewhere(
      [&] { return MOE_OK(ncclMoeLowLatencyCombineComplete(ep.comm, &d, out, sideStream())); });
}

bool llRunAndCheck(LlEp& ep, LlInputs& in, const LlProblem& p, const LlRunOpts& o,
                   const std::string& tag) {
  const LlShape& s = p.shape;
  const int me = rank(), T = p.tokens(me);
  bool ok = ep.poisonNextSlot();
  if (!allRanksOk(ok, (tag + ": poison").c_str())) return false;
  ncclMoeLowLatencyOutput_t out;
  ok = runLlDispatch(ep, in, T, o.weighted, o.split, &out);
  ok = CUDA_OK(cudaStreamSynchronize(stream())) && ok;
  if (!allRanksOk(ok, (tag + ": LL dispatch").c_str())) return false;
  ep.record(out, tag.c_str());
  const moe_ref::LlReceived ref = llReference(p);
  LlBlocks blocks;
  agreeMismatches(checkLlDispatch(out, p, ref, tag.c_str(), false, &blocks),
                  (tag + ": dispatch output").c_str());
  if (o.combine) {
    DevMem separate, combOut((size_t)s.maxTokens * s.hidden * 2);
    void* dst = out.combineInput;
    if (o.src == LlExpertSrc::Separate) {
      ok = separate.alloc(s.slotRows() * s.hidden * 2);
      dst = separate.get();
    }
    ok = ok && dst && combOut.get() && writeIdentityExpert(dst, s, blocks);
    ok = ok && poison(combOut.get(), combOut.bytes());
    if (!allRanksOk(ok, (tag + ": expert output").c_str())) return false;
    ok = runLlCombine(ep, out, dst, combOut.get(), o.split);
    ok = CUDA_OK(cudaStreamSynchronize(stream())) && ok;
    if (!allRanksOk(ok, (tag + ": LL combine").c_str())) return false;
    std::vector<uint16_t> expected = llIdentityCombine(p, o.weighted);
    agreeMismatches(checkCombine(combOut.get(), expected, T, s.hidden, tag.c_str(),
                                 o.combineResult),
                    (tag + ": combine output").c_str());
  }
  if (o.blocks) *o.blocks = std::move(blocks);
  return allRanksOk(MOE_OK(ncclMoeCheckErrors(ep.comm)), (tag + ": ncclMoeCheckErrors").c_str());
}

void llScenario(const LlShape& s, const GenSpec& g, const LlRunOpts& o, int rounds) {
  LlEp ep(s);
  if (!ep.create()) return;
  LlInputs in;
  for (int round = 0; round < rounds; round++) {
    GenSpec gr = g;
    gr.seed = g.seed + 1000003ull * round;
    LlProblem p = makeLlProblem(s, gr);
    if (!allRanksOk(in.upload(p), "upload inputs")) return;
    LlRunOpts ro = o;
    ro.src = round % 2 == 0 ? LlExpertSrc::CombineInput : LlExpertSrc::Separate;
    ro.weighted = round % 4 < 2;
    const std::string tag = s.str() + (o.split ? " split" : " one-shot") + " [round " +
                            std::to_string(round + 1) + ", " +
                            (ro.src == LlExpertSrc::CombineInput ? "combineInput" : "separate") +
                            (ro.weighted ? ", weighted]" : ", unweighted]");
    if (!llRunAndCheck(ep, in, p, ro, tag)) return;
  }
}

}  // namespace moe_gpu
