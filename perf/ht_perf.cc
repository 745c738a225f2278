// ht_perf: high-throughput (HT) dispatch / combine performance, nccl-tests style.
//
// For each token count T of the sweep, every rank generates its routing and tokens on the host
// from (seed, rank, T) and times three operations on one stream:
//   layout    ncclMoeGetLayout on the routing;
//   dispatch  ncclMoeDispatch with the routing and weights (layout recomputed every call, as in
//             a forward pass; no host counts, so no host synchronisation);
//   combine   ncclMoeCombine, unweighted, of the identity expert: out->x for BF16, or
//             out->combineInput filled once with deterministic BF16 rows for FP8.
// With -c 1 each operation then runs once more on poisoned outputs and is compared with what
// the host expects. Every rank can regenerate every other rank's routing and tokens from the
// same seeds, so the expected receive set needs no communication.
//
// Bandwidth (also printed as a legend by printHeader):
//   algbw = bytes this rank receives, its own rows included / this rank's time; rows * row bytes,
//           row bytes = H*2 (BF16) or H + H/128*4 (FP8 data + FP32 scales), top-k ids and
//           weights not counted; combine counts the same rows, H*2 bytes each (BF16);
//           the table shows the minimum over ranks (the slowest rank);
//   busbw = the same with only the rows that come from (dispatch) / go back to (combine) other
//           ranks, i.e. the bytes that cross NVLink;
//   time  = max over ranks of each rank's average time per call.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

#include "common.h"
#include "../tests/common/reference.h"

using moe_perf::Options;
using moe_perf::Row;

namespace {

// Sizes of one run. Counts are elements unless the name says bytes.
struct Problem {
  int nRanks = 0, rank = 0;
  int numExperts = 0, expertsPerRank = 0, hidden = 0, topK = 0;
  ncclMoeDtype_t dtype = ncclMoeBf16;
  moe_perf::Routing routing = moe_perf::Routing::kRandom;
  uint64_t seed = 0;
  size_t rowDataBytes = 0;  // bytes of one token row of x in the dispatch dtype
  int scalesPerRow = 0;     // FP32 scales per row (H/128 for FP8, 0 for BF16)
  double bwRowBytes() const { return (double)rowDataBytes + 4.0 * scalesPerRow; }
};

struct HostRouting {
  std::vector<int64_t> idx;  // [T][K] expert ids, -1 = none
  std::vector<float> weights;  // [T][K]
};

// Routing of rank `src` for T tokens: topK distinct experts per token drawn uniformly (skew: the
// first one among rank 0's experts), then about 1 entry in 16 replaced by -1 (skew: never the
// first one, so every token reaches rank 0).
HostRouting makeRouting(const Problem& p, int src, long T) {
  moe_perf::Rng rng(moe_perf::mixSeed(p.seed, (uint64_t)src, (uint64_t)T, 1));
  HostRouting r;
  r.idx.resize((size_t)T * p.topK);
  r.weights.resize((size_t)T * p.topK);
  for (long t = 0; t < T; t++) {
    int64_t* row = &r.idx[(size_t)t * p.topK];
    for (int k = 0; k < p.topK; k++) {
      bool skewFirst = p.routing == moe_perf::Routing::kSkew && k == 0;
      int64_t e;
      bool duplicate;
      do {
        e = skewFirst ? (int64_t)rng.below((uint32_t)p.expertsPerRank)
                      : (int64_t)rng.below((uint32_t)p.numExperts);
        duplicate = false;
        for (int j = 0; j < k; j++) duplicate |= (row[j] == e || row[j] == -2 - e);
      } while (duplicate);
      // Dropped entries are stored as -2-e while drawing (so e stays excluded), -1 at the end.
      bool drop = !skewFirst && rng.below(16) == 0;
      row[k] = drop ? -2 - e : e;
      r.weights[(size_t)t * p.topK + k] = 0.05f + rng.uniform();
    }
    for (int k = 0; k < p.topK; k++)
      if (row[k] < 0) row[k] = -1;
  }
  return r;
}

// Tokens of rank `src`: x [T][rowDataBytes] and, for FP8, scales [T][H/128]. Values are finite
// (BF16 magnitudes in [2^-7, 2), FP8 bytes that are not NaN, positive scales).
void makeTokens(const Problem& p, int src, long T, std::vector<uint8_t>* x,
                std::vector<float>* scales) {
  moe_perf::Rng rng(moe_perf::mixSeed(p.seed, (uint64_t)src, (uint64_t)T, 2));
  x->resize((size_t)T * p.rowDataBytes);
  if (p.dtype == ncclMoeBf16) {
    uint16_t* v = reinterpret_cast<uint16_t*>(x->data());
    size_t n = (size_t)T * p.hidden;
    for (size_t i = 0; i < n; i += 4) {
      uint64_t bits = rng.next();
      for (size_t j = 0; j < 4 && i + j < n; j++) {
        uint16_t r = (uint16_t)(bits >> (16 * j));
        v[i + j] = (uint16_t)((r & 0x807f) | ((120 + ((r >> 7) & 7)) << 7));
      }
    }
    scales->clear();
  } else {
    uint8_t* v = x->data();
    size_t n = x->size();
    for (size_t i = 0; i < n; i += 8) {
      uint64_t bits = rng.next();
      for (size_t j = 0; j < 8 && i + j < n; j++) {
        uint8_t b = (uint8_t)(bits >> (8 * j));
        v[i + j] = (b & 0x7f) == 0x7f ? (uint8_t)(b & 0xfe) : b;  // 0x7f / 0xff are NaN in e4m3
      }
    }
    scales->resize((size_t)T * p.scalesPerRow);
    for (float& s : *scales) s = (float)(1 << rng.below(12)) / 64.0f * (1.0f + rng.uniform());
  }
}

// The BF16 value row (src, token) carries as FP8 combine input on every rank that received it.
uint16_t combineValue(int src, long token, int h) {
  long v = ((long)src * 7919 + token * 131 + (long)h * 17) % 61 - 30;
  return moe_ref::floatToBf16((float)v * 0.125f);
}

bool tokenOnRank(const Problem& p, const int64_t* idxRow, int dst) {
  for (int k = 0; k < p.topK; k++)
    if (idxRow[k] >= 0 && idxRow[k] / p.expertsPerRank == dst) return true;
  return false;
}

// What this rank receives for one T: per source rank, its tokens that have an expert here, in
// token order (rows arrive ordered by source rank, then token).
struct ReceivePlan {
  std::vector<HostRouting> routing;        // [R] every rank's routing
  std::vector<std::vector<long>> tokens;   // [R] tokens of each source received here
  long rows = 0, selfRows = 0;
};

ReceivePlan planReceive(const Problem& p, long T) {
  ReceivePlan plan;
  plan.routing.resize(p.nRanks);
  plan.tokens.resize(p.nRanks);
  for (int s = 0; s < p.nRanks; s++) {
    plan.routing[s] = makeRouting(p, s, T);
    for (long t = 0; t < T; t++)
      if (tokenOnRank(p, &plan.routing[s].idx[(size_t)t * p.topK], p.rank))
        plan.tokens[s].push_back(t);
    plan.rows += (long)plan.tokens[s].size();
  }
  plan.selfRows = (long)plan.tokens[p.rank].size();
  return plan;
}

// Device buffers owned by the benchmark, sized for the largest T.
struct DeviceBuffers {
  void* x = nullptr;                 // [maxT][rowDataBytes]
  float* scales = nullptr;           // [maxT][H/128], FP8 only
  int64_t* idx = nullptr;            // [maxT][K]
  float* weights = nullptr;          // [maxT][K]
  int* tokensPerRank = nullptr;      // [R]
  int* tokensPerExpert = nullptr;    // [E]
  uint8_t* isTokenInRank = nullptr;  // [maxT][R]
  void* combineOut = nullptr;        // [maxT][H] BF16
};

template <typename T>
void copyToHost(std::vector<T>* dst, const void* src, size_t count) {
  dst->resize(count);
  if (count) PERF_CUDA(cudaMemcpy(dst->data(), src, count * sizeof(T), cudaMemcpyDeviceToHost));
}

// Fills every output a check reads with values no correct run produces (NaN for floats, a huge
// negative number for integers) so that unwritten elements count as wrong.
void poisonOutputs(const Problem& p, const DeviceBuffers& d, const ncclMoeDispatchOutput_t& out,
                   long capacityRows, long maxT, cudaStream_t stream) {
  PERF_CUDA(cudaMemsetAsync(out.x, 0xFF, capacityRows * p.rowDataBytes, stream));
  if (out.xScales)
    PERF_CUDA(cudaMemsetAsync(out.xScales, 0xFF, capacityRows * p.scalesPerRow * 4, stream));
  PERF_CUDA(cudaMemsetAsync(out.topkIdx, 0xAB, capacityRows * p.topK * 8, stream));
  PERF_CUDA(cudaMemsetAsync(out.topkWeights, 0xFF, capacityRows * p.topK * 4, stream));
  PERF_CUDA(cudaMemsetAsync(out.numRecvTokens, 0xAB, sizeof(int), stream));
  PERF_CUDA(cudaMemsetAsync(out.expertCounts, 0xAB, p.expertsPerRank * sizeof(int), stream));
  PERF_CUDA(cudaMemsetAsync(d.tokensPerRank, 0xAB, p.nRanks * sizeof(int), stream));
  PERF_CUDA(cudaMemsetAsync(d.tokensPerExpert, 0xAB, p.numExperts * sizeof(int), stream));
  PERF_CUDA(cudaMemsetAsync(d.isTokenInRank, 0xAB, maxT * p.nRanks, stream));
  PERF_CUDA(cudaMemsetAsync(d.combineOut, 0xFF, maxT * p.hidden * 2, stream));
}

// Wrong elements of the layout outputs (this rank's routing).
long long checkLayout(const Problem& p, const HostRouting& own, long T, const DeviceBuffers& d) {
  std::vector<int> perRank(p.nRanks, 0), perExpert(p.numExperts, 0);
  std::vector<uint8_t> inRank((size_t)T * p.nRanks, 0);
  for (long t = 0; t < T; t++) {
    const int64_t* row = &own.idx[(size_t)t * p.topK];
    for (int k = 0; k < p.topK; k++)
      if (row[k] >= 0) perExpert[row[k]]++;
    for (int r = 0; r < p.nRanks; r++) {
      bool in = tokenOnRank(p, row, r);
      inRank[(size_t)t * p.nRanks + r] = in;
      perRank[r] += in;
    }
  }
  std::vector<int> gotRank, gotExpert;
  std::vector<uint8_t> gotIn;
  copyToHost(&gotRank, d.tokensPerRank, p.nRanks);
  copyToHost(&gotExpert, d.tokensPerExpert, p.numExperts);
  copyToHost(&gotIn, d.isTokenInRank, inRank.size());
  long long wrong = 0;
  for (int r = 0; r < p.nRanks; r++) wrong += gotRank[r] != perRank[r];
  for (int e = 0; e < p.numExperts; e++) wrong += gotExpert[e] != perExpert[e];
  for (size_t i = 0; i < inRank.size(); i++) wrong += gotIn[i] != inRank[i];
  return wrong;
}

// Wrong elements of the dispatch outputs on this rank: row data (elements), scales, local top-k
// ids, weights, per-expert counts and the row count.
long long checkDispatch(const Problem& p, const ReceivePlan& plan, long T,
                        const std::vector<uint8_t>& ownX, const std::vector<float>& ownScales,
                        const ncclMoeDispatchOutput_t& out) {
  long long wrong = 0;
  int numRecv = 0;
  PERF_CUDA(cudaMemcpy(&numRecv, out.numRecvTokens, sizeof(int), cudaMemcpyDeviceToHost));
  wrong += numRecv != plan.rows;
  std::vector<int> counts, expectCounts(p.expertsPerRank, 0);
  copyToHost(&counts, out.expertCounts, p.expertsPerRank);

  const int K = p.topK, firstExpert = p.rank * p.expertsPerRank;
  std::vector<uint8_t> srcX, gotX;
  std::vector<float> srcScales, gotScales, gotW;
  std::vector<int64_t> gotIdx;
  long rowBase = 0;
  for (int s = 0; s < p.nRanks; s++) {
    const std::vector<long>& toks = plan.tokens[s];
    const size_t n = toks.size();
    if (n == 0) continue;
    if (s != p.rank) makeTokens(p, s, T, &srcX, &srcScales);
    const std::vector<uint8_t>& sx = s == p.rank ? ownX : srcX;
    const std::vector<float>& ss = s == p.rank ? ownScales : srcScales;
    copyToHost(&gotX, (const uint8_t*)out.x + rowBase * p.rowDataBytes, n * p.rowDataBytes);
    copyToHost(&gotIdx, out.topkIdx + rowBase * K, n * K);
    copyToHost(&gotW, out.topkWeights + rowBase * K, n * K);
    if (p.scalesPerRow) copyToHost(&gotScales, out.xScales + rowBase * p.scalesPerRow, n * p.scalesPerRow);
    for (size_t i = 0; i < n; i++) {
      const long t = toks[i];
      // Row data, compared bitwise element by element (2-byte BF16 or 1-byte FP8 elements).
      const uint8_t* want = &sx[(size_t)t * p.rowDataBytes];
      const uint8_t* got = &gotX[i * p.rowDataBytes];
      if (memcmp(want, got, p.rowDataBytes) != 0) {
        if (p.dtype == ncclMoeBf16) {
          for (int h = 0; h < p.hidden; h++)
            wrong += memcmp(want + 2 * h, got + 2 * h, 2) != 0;
        } else {
          for (size_t b = 0; b < p.rowDataBytes; b++) wrong += want[b] != got[b];
        }
      }
      for (int j = 0; j < p.scalesPerRow; j++)
        wrong += memcmp(&ss[(size_t)t * p.scalesPerRow + j], &gotScales[i * p.scalesPerRow + j], 4) != 0;
      // Top-k: local id where the expert lives here, else -1 with weight 0.
      const int64_t* srcIdx = &plan.routing[s].idx[(size_t)t * K];
      const float* srcW = &plan.routing[s].weights[(size_t)t * K];
      for (int k = 0; k < K; k++) {
        bool here = srcIdx[k] >= 0 && srcIdx[k] / p.expertsPerRank == p.rank;
        int64_t wantIdx = here ? srcIdx[k] - firstExpert : -1;
        float wantW = here ? srcW[k] : 0.0f;
        if (here) expectCounts[wantIdx]++;
        wrong += gotIdx[i * K + k] != wantIdx;
        wrong += !(gotW[i * K + k] == wantW);  // NaN poison counts as wrong
      }
    }
    rowBase += (long)n;
  }
  for (int e = 0; e < p.expertsPerRank; e++) wrong += counts[e] != expectCounts[e];
  return wrong;
}

// FP8 runs: BF16 rows this rank's expert "outputs", in receive order (see combineValue).
std::vector<uint16_t> makeCombineInput(const Problem& p, const ReceivePlan& plan) {
  std::vector<uint16_t> rows((size_t)plan.rows * p.hidden);
  size_t i = 0;
  for (int s = 0; s < p.nRanks; s++)
    for (long t : plan.tokens[s]) {
      for (int h = 0; h < p.hidden; h++) rows[i * p.hidden + h] = combineValue(s, t, h);
      i++;
    }
  return rows;
}

// Wrong BF16 elements of the combine output on this (source) rank: each token sums the same
// row once per rank it visited, in FP32, rounded once; tokens that went nowhere give 0.
long long checkCombine(const Problem& p, const HostRouting& own, long T,
                       const std::vector<uint8_t>& ownX, const DeviceBuffers& d) {
  std::vector<uint16_t> got;
  copyToHost(&got, d.combineOut, (size_t)T * p.hidden);
  const uint16_t* x = reinterpret_cast<const uint16_t*>(ownX.data());
  long long wrong = 0;
  for (long t = 0; t < T; t++) {
    int visited = 0;
    for (int r = 0; r < p.nRanks; r++) visited += tokenOnRank(p, &own.idx[(size_t)t * p.topK], r);
    for (int h = 0; h < p.hidden; h++) {
      uint16_t v = p.dtype == ncclMoeBf16 ? x[(size_t)t * p.hidden + h] : combineValue(p.rank, t, h);
      float acc = 0.0f;
      for (int r = 0; r < visited; r++) acc += moe_ref::bf16ToFloat(v);
      wrong += got[(size_t)t * p.hidden + h] != (visited ? moe_ref::floatToBf16(acc) : 0);
    }
  }
  return wrong;
}

// Waits for this rank's stream, reports kernel-detected errors, then for all ranks.
void quiesce(ncclMoeComm_t moe, cudaStream_t stream) {
  PERF_CUDA(cudaStreamSynchronize(stream));
  PERF_MOE(ncclMoeCheckErrors(moe));
  moe_ranks::barrier();
}

}  // namespace

int main(int argc, char** argv) {
  const char* prog = "ht_perf";
  Options opt;
  int rc = moe_perf::parseOptions(argc, argv, prog, &opt);
  if (rc >= 0) return rc;
  moe_ranks::RankEnv env;
  if (!moe_ranks::start(opt.nRanks, &env)) return 1;
  if (env.nRanks == 0) return moe_ranks::finish(0);  // start() printed "skipping: no GPU"
  if (opt.numExperts % env.nRanks != 0) {
    if (env.rank == 0)
      fprintf(stderr, "%s: -E %d experts is not a multiple of %d ranks\n", prog, opt.numExperts,
              env.nRanks);
    return moe_ranks::finish(1);
  }

  ncclComm_t comm = nullptr;
  PERF_NCCL(moe_ranks::initComm(env, &comm));
  moe_perf::printHeader(prog, opt, env);
  cudaStream_t stream;
  PERF_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

  Problem p;
  p.nRanks = env.nRanks;
  p.rank = env.rank;
  p.numExperts = opt.numExperts;
  p.expertsPerRank = opt.numExperts / env.nRanks;
  p.hidden = opt.hidden;
  p.topK = opt.topK;
  p.dtype = opt.dtype;
  p.routing = opt.routing;
  p.seed = opt.seed;
  p.rowDataBytes = (size_t)opt.hidden * (opt.dtype == ncclMoeFp8E4m3 ? 1 : 2);
  p.scalesPerRow = opt.dtype == ncclMoeFp8E4m3 ? opt.hidden / 128 : 0;

  ncclMoeConfig_t cfg = NCCL_MOE_CONFIG_INITIALIZER;
  cfg.mode = ncclMoeHighThroughput;
  cfg.numExperts = opt.numExperts;
  cfg.hidden = opt.hidden;
  cfg.topK = opt.topK;
  cfg.maxTokensPerRank = (int)opt.maxTokensPerRank;
  cfg.dispatchDtype = opt.dtype;
  cfg.numSms = opt.numSms;
  cfg.outputCapacity = 0;  // R * maxTokensPerRank rows: never overflows
  ncclMoeComm_t moe = nullptr;
  PERF_MOE(ncclMoeCommCreate(comm, &cfg, &moe));
  const long capacityRows = (long)env.nRanks * opt.maxTokensPerRank;

  const long maxT = opt.maxTokens;
  DeviceBuffers d;
  PERF_CUDA(cudaMalloc(&d.x, maxT * p.rowDataBytes));
  if (p.scalesPerRow) PERF_CUDA(cudaMalloc(&d.scales, maxT * p.scalesPerRow * sizeof(float)));
  PERF_CUDA(cudaMalloc(&d.idx, maxT * p.topK * sizeof(int64_t)));
  PERF_CUDA(cudaMalloc(&d.weights, maxT * p.topK * sizeof(float)));
  PERF_CUDA(cudaMalloc(&d.tokensPerRank, p.nRanks * sizeof(int)));
  PERF_CUDA(cudaMalloc(&d.tokensPerExpert, p.numExperts * sizeof(int)));
  PERF_CUDA(cudaMalloc(&d.isTokenInRank, maxT * p.nRanks));
  PERF_CUDA(cudaMalloc(&d.combineOut, maxT * p.hidden * 2));

  std::vector<Row> layoutRows, dispatchRows, combineRows;
  const bool check = opt.check != 0;
  for (long T : moe_perf::tokenSweep(opt)) {
    // Inputs of this rank, then what it will receive.
    HostRouting own = makeRouting(p, p.rank, T);
    std::vector<uint8_t> ownX;
    std::vector<float> ownScales;
    makeTokens(p, p.rank, T, &ownX, &ownScales);
    PERF_CUDA(cudaMemcpy(d.x, ownX.data(), ownX.size(), cudaMemcpyHostToDevice));
    if (p.scalesPerRow)
      PERF_CUDA(cudaMemcpy(d.scales, ownScales.data(), ownScales.size() * 4, cudaMemcpyHostToDevice));
    PERF_CUDA(cudaMemcpy(d.idx, own.idx.data(), own.idx.size() * 8, cudaMemcpyHostToDevice));
    PERF_CUDA(cudaMemcpy(d.weights, own.weights.data(), own.weights.size() * 4, cudaMemcpyHostToDevice));
    ReceivePlan plan = planReceive(p, T);
    std::vector<uint16_t> combineIn;
    if (p.dtype == ncclMoeFp8E4m3) combineIn = makeCombineInput(p, plan);

    ncclMoeHandle_t handle = nullptr;
    ncclMoeDispatchOutput_t out;
    memset(&out, 0, sizeof(out));
    auto layoutOp = [&] {
      PERF_MOE(ncclMoeGetLayout(moe, d.idx, (int)T, d.tokensPerRank, d.tokensPerExpert,
                                d.isTokenInRank, stream));
    };
    auto dispatchOp = [&] {
      PERF_MOE(ncclMoeDispatch(moe, d.x, d.scales, d.idx, d.weights, (int)T, 0, &handle, &out,
                               stream));
    };
    auto combineOp = [&] {
      const void* expertOut = p.dtype == ncclMoeBf16 ? out.x : out.combineInput;
      PERF_MOE(ncclMoeCombine(moe, handle, expertOut, nullptr, d.combineOut, stream));
    };
    // FP8: the identity expert's outputs go into the window's combine input after a dispatch.
    auto fillCombineInput = [&] {
      if (p.dtype == ncclMoeBf16 || plan.rows == 0) return;
      PERF_CUDA(cudaMemcpyAsync(out.combineInput, combineIn.data(), combineIn.size() * 2,
                                cudaMemcpyHostToDevice, stream));
    };

    dispatchOp();  // creates the handle and tells where the outputs are
    quiesce(moe, stream);
    poisonOutputs(p, d, out, capacityRows, maxT, stream);
    quiesce(moe, stream);

    double layoutUs = moe_perf::timeUs(stream, opt.warmup, opt.iters, layoutOp);
    quiesce(moe, stream);
    double dispatchUs = moe_perf::timeUs(stream, opt.warmup, opt.iters, dispatchOp);
    quiesce(moe, stream);
    fillCombineInput();
    quiesce(moe, stream);
    double combineUs = moe_perf::timeUs(stream, opt.warmup, opt.iters, combineOp);
    quiesce(moe, stream);

    long long layoutWrong = 0, dispatchWrong = 0, combineWrong = 0;
    if (check) {  // one more run of each on poisoned outputs
      poisonOutputs(p, d, out, capacityRows, maxT, stream);
      quiesce(moe, stream);
      layoutOp();
      dispatchOp();
      quiesce(moe, stream);
      layoutWrong = checkLayout(p, own, T, d);
      dispatchWrong = checkDispatch(p, plan, T, ownX, ownScales, out);
      fillCombineInput();
      quiesce(moe, stream);
      combineOp();
      quiesce(moe, stream);
      combineWrong = checkCombine(p, own, T, ownX, d);
    }

    const double dispatchBytes = plan.rows * p.bwRowBytes();
    const double dispatchRemote = (plan.rows - plan.selfRows) * p.bwRowBytes();
    const double combineBytes = plan.rows * 2.0 * p.hidden;
    const double combineRemote = (plan.rows - plan.selfRows) * 2.0 * p.hidden;
    layoutRows.push_back(moe_perf::reduceRow(T, layoutUs, false, 0, 0, check, layoutWrong));
    dispatchRows.push_back(moe_perf::reduceRow(T, dispatchUs, true, dispatchBytes, dispatchRemote,
                                               check, dispatchWrong));
    combineRows.push_back(moe_perf::reduceRow(T, combineUs, true, combineBytes, combineRemote,
                                              check, combineWrong));
    PERF_MOE(ncclMoeHandleDestroy(handle));
  }

  moe_perf::printTable("layout", layoutRows);
  moe_perf::printTable(opt.dtype == ncclMoeFp8E4m3 ? "dispatch (fp8)" : "dispatch (bf16)",
                       dispatchRows);
  moe_perf::printTable("combine (bf16)", combineRows);
  long long totalWrong = 0;
  for (const std::vector<Row>* rows : {&layoutRows, &dispatchRows, &combineRows})
    for (const Row& r : *rows) totalWrong += r.wrong;
  if (!layoutRows.empty()) {
    cudaDeviceProp prop;
    PERF_CUDA(cudaGetDeviceProperties(&prop, env.localRank));
    const Row &l = layoutRows.back(), &dr = dispatchRows.back(), &c = combineRows.back();
    moe_perf::printNote("%s", "");
    moe_perf::printNote(
        "summary %s ranks=%d T=%ld H=%d K=%d E=%d sms=%d %s: layout %.1f us | dispatch %.1f us "
        "algbw %.1f busbw %.1f GB/s | combine %.1f us algbw %.1f busbw %.1f GB/s | #wrong %s",
        prop.name, env.nRanks, l.tokens, opt.hidden, opt.topK, opt.numExperts, opt.numSms,
        opt.dtype == ncclMoeFp8E4m3 ? "fp8" : "bf16", l.timeUs, dr.timeUs, dr.algbw, dr.busbw,
        c.timeUs, c.algbw, c.busbw, check ? std::to_string(totalWrong).c_str() : "N/A");
  }

  PERF_MOE(ncclMoeCommDestroy(moe));
  PERF_CUDA(cudaFree(d.x));
  if (d.scales) PERF_CUDA(cudaFree(d.scales));
  PERF_CUDA(cudaFree(d.idx));
  PERF_CUDA(cudaFree(d.weights));
  PERF_CUDA(cudaFree(d.tokensPerRank));
  PERF_CUDA(cudaFree(d.tokensPerExpert));
  PERF_CUDA(cudaFree(d.isTokenInRank));
  PERF_CUDA(cudaFree(d.combineOut));
  PERF_CUDA(cudaStreamDestroy(stream));
  PERF_NCCL(ncclCommDestroy(comm));
  if (totalWrong > 0) moe_perf::printNote("FAILED: %lld wrong elements", totalWrong);
  return moe_ranks::finish(totalWrong > 0 ? 1 : 0);
}
