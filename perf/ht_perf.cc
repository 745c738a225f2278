// ht_perf: high-throughput (HT) dispatch / combine performance, nccl-tests style.
//
// For each token count T of the sweep, every rank generates its routing and tokens on the host
// from (seed, rank, T) and the harness (common.h) times three operations on one stream, each
// with -n calls back to back between two events:
//   layout    ncclMoeGetLayout on the routing;
//   dispatch  ncclMoeDispatch with the routing and weights (layout recomputed every call, as in
//             a forward pass; no host counts, so no host synchronisation);
//   combine   ncclMoeCombine of the identity expert: out->x for BF16, or out->combineInput
//             filled once with deterministic BF16 rows for FP8; unweighted (the rows' plain sum,
//             as DeepEP's and NCCL EP's combines), or with --weighted 1 weighted by the
//             dispatch's top-k weights (w(t, r) * row, summed in rank order).
// With -c 1 each operation then runs once more on poisoned outputs and is compared with what
// the host expects. Every rank can regenerate every other rank's routing and tokens from the
// same seeds, so the expected receive set needs no communication.
//
// Bandwidth (README: Bandwidth definitions):
//   algbw = bytes this rank receives, its own rows included / this rank's time; rows * row bytes,
//           row bytes = H*2 (BF16) or H + H/128*4 (FP8 data + FP32 scales), top-k ids and
//           weights not counted; combine counts the same rows, H*2 bytes each (BF16);
//           the row shows the minimum over ranks (the slowest rank);
//   busbw = the same with only the rows that come from (dispatch) / go back to (combine) other
//           ranks, i.e. the bytes that cross NVLink;
//   time  = max over ranks of each rank's average time per call.
// Across nodes (the EP context spans N > 1 nodes of G = R/N GPUs: MOE_FAKE_NODES or real ones),
// from testing/ht_net_model.h's htNetTraffic for every rank's routing, two more columns:
//   rdmabw = max over ranks of (bytes this rank's NIC sends / this rank's time): dispatch, one
//            record per (own token, remote node it needs) plus one counts row per remote node;
//            combine, one BF16 partial (H*2 bytes) per record this rank received. DeepEP's RDMA
//            bandwidth, per NIC: compare with the line rate (NCCL_MOELOOP_GBPS, GB/s);
//   nvlbw  = max over ranks of (NVLink bytes of the internode path / this rank's time): dispatch,
//            rows placed on the other ranks of its node (own tokens and forwarded records);
//            combine, BF16 rows summed from them. 0 with one GPU per node;
// and before each size rank 0 prints the model: the bytes of the busiest fake NIC and, shaped,
// its time at line rate (one message latency + the busier direction's bytes / GB/s), a lower
// bound to read the measured times against. busbw keeps its definition (rows from / to other
// ranks, whichever path they take).
// Routing (--routing): random, skew (first expert on rank 0), or group: each token's experts
// drawn from --group-nodes nodes picked at random per token (DeepSeek-V3's node-limited routing).
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <string>
#include <vector>

#include "common.h"
#include "../testing/ht_net_model.h"
#include "../testing/ll_net_model.h"
#include "../testing/reference.h"


namespace {

// Sizes of one run. Counts are elements unless the name says bytes.
struct Problem {
  int nRanks = 0, rank = 0;
  int nNodes = 1, groupNodes = 1;  // nodes of the EP context; --routing group: nodes per token
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
// first one among rank 0's experts; group: among the experts of p.groupNodes distinct nodes
// drawn for the token), then about 1 entry in 16 replaced by -1 (skew: never the first one, so
// every token reaches rank 0).
HostRouting makeRouting(const Problem& p, int src, long T) {
  moe_perf::Rng rng(moe_perf::mixSeed(p.seed, (uint64_t)src, (uint64_t)T, 1));
  HostRouting r;
  r.idx.resize((size_t)T * p.topK);
  r.weights.resize((size_t)T * p.topK);
  const bool group = p.routing == moe_perf::Routing::kGroup;
  const int expertsPerNode = p.numExperts / p.nNodes;
  std::vector<int> nodes;  // group: the token's nodes
  for (long t = 0; t < T; t++) {
    int64_t* row = &r.idx[(size_t)t * p.topK];
    nodes.clear();
    while (group && (int)nodes.size() < p.groupNodes) {
      const int n = rng.below(p.nNodes);
      if (std::find(nodes.begin(), nodes.end(), n) == nodes.end()) nodes.push_back(n);
    }
    for (int k = 0; k < p.topK; k++) {
      bool skewFirst = p.routing == moe_perf::Routing::kSkew && k == 0;
      int64_t e;
      bool duplicate;
      do {
        if (group)
          e = (int64_t)nodes[rng.below((int)nodes.size())] * expertsPerNode +
              rng.below(expertsPerNode);
        else
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
// row once per rank r it visited, in rank order, in FP32 (weighted: w(t, r) * row, w(t, r) the
// sum in k order of t's weights on r), rounded once; tokens that went nowhere give 0.
long long checkCombine(const Problem& p, const HostRouting& own, long T, const std::vector<uint8_t>& ownX,
                       const DeviceBuffers& d, bool weighted) {
  std::vector<uint16_t> got;
  copyToHost(&got, d.combineOut, (size_t)T * p.hidden);
  const uint16_t* x = reinterpret_cast<const uint16_t*>(ownX.data());
  long long wrong = 0;
  std::vector<float> w;  // w(t, r) of the ranks t visited, in rank order (1: unweighted)
  for (long t = 0; t < T; t++) {
    const size_t e0 = (size_t)t * p.topK;
    w.clear();
    for (int r = 0; r < p.nRanks; r++)
      if (tokenOnRank(p, &own.idx[e0], r))
        w.push_back(weighted ? moe_ref::rankWeight(&own.idx[e0], &own.weights[e0], p.topK, r, p.numExperts, p.nRanks)
                             : 1.0f);
    for (int h = 0; h < p.hidden; h++) {
      uint16_t v = p.dtype == ncclMoeBf16 ? x[(size_t)t * p.hidden + h] : combineValue(p.rank, t, h);
      float acc = 0.0f;  // 1 * x is exact: the unweighted sum is the same expression
      for (float wr : w) acc += moe_ref::roundedProduct(wr, moe_ref::bf16ToFloat(v));
      wrong += got[(size_t)t * p.hidden + h] != (w.empty() ? 0 : moe_ref::floatToBf16(acc));
    }
  }
  return wrong;
}

// Everything one run holds: sizes, device buffers (sized for the largest T) and the inputs of
// the current T.
struct Bench {
  moe_perf::Context ctx;
  Problem p;
  DeviceBuffers d;
  long maxT = 0, capacityRows = 0;  // capacity: R * maxTokensPerRank rows (outputCapacity 0)
  long T = 0;
  bool weighted = false;            // --weighted: the combine weighted by the top-k weights
  HostRouting own;                  // this rank's routing at T
  std::vector<uint8_t> ownX;
  std::vector<float> ownScales;
  ReceivePlan plan;
  std::vector<uint16_t> combineIn;  // FP8: the identity expert's BF16 rows (makeCombineInput)
  moe_net::HtNetTraffic traffic;    // this rank's network / NVLink bytes at T (several nodes)
  ncclMoeHandle_t handle = nullptr;
  ncclMoeDispatchOutput_t out;

  void layout() {
    PERF_MOE(ncclMoeGetLayout(ctx.moe, d.idx, (int)T, d.tokensPerRank, d.tokensPerExpert,
                              d.isTokenInRank, ctx.stream));
  }
  // Layout recomputed every call, as in a forward pass; no host counts, no host sync.
  void dispatch() {
    PERF_MOE(ncclMoeDispatch(ctx.moe, d.x, d.scales, d.idx, d.weights, (int)T, 0, &handle, &out,
                             ctx.stream));
  }
  void combine() {
    const void* expertOut = p.dtype == ncclMoeBf16 ? out.x : out.combineInput;
    PERF_MOE(ncclMoeCombine(ctx.moe, handle, expertOut, weighted ? d.weights : nullptr, d.combineOut,
                            ctx.stream));
  }
  // FP8: the identity expert's outputs go into the window's combine input after a dispatch.
  void fillCombineInput() {
    if (p.dtype == ncclMoeBf16 || plan.rows == 0) return;
    PERF_CUDA(cudaMemcpyAsync(out.combineInput, combineIn.data(), combineIn.size() * 2,
                              cudaMemcpyHostToDevice, ctx.stream));
  }
  void poison() {
    poisonOutputs(p, d, out, capacityRows, maxT, ctx.stream);
    moe_perf::quiesce(ctx);
  }

  void setup(const moe_perf::Context& c) {
    ctx = c;
    const moe_perf::Options& opt = *c.opt;
    p.nRanks = c.env.nRanks;
    p.rank = c.env.rank;
    p.numExperts = opt.numExperts;
    p.expertsPerRank = opt.numExperts / p.nRanks;
    p.hidden = opt.hidden;
    p.topK = opt.topK;
    p.dtype = opt.fp8 ? ncclMoeFp8E4m3 : ncclMoeBf16;
    p.nNodes = c.nNodes;
    p.groupNodes = std::min(opt.groupNodes, c.nNodes);
    p.routing = opt.routing;
    p.seed = opt.seed;
    if (p.routing == moe_perf::Routing::kGroup && p.groupNodes * (p.numExperts / p.nNodes) < p.topK)
      moe_perf::fail(__FILE__, __LINE__, "--routing group",
                     "fewer experts on --group-nodes nodes than -k");
    p.rowDataBytes = (size_t)opt.hidden * (opt.fp8 ? 1 : 2);
    p.scalesPerRow = opt.fp8 ? opt.hidden / 128 : 0;
    capacityRows = (long)p.nRanks * opt.maxTokensPerRank;
    maxT = opt.maxTokens;
    PERF_CUDA(cudaMalloc(&d.x, maxT * p.rowDataBytes));
    if (p.scalesPerRow) PERF_CUDA(cudaMalloc(&d.scales, maxT * p.scalesPerRow * sizeof(float)));
    PERF_CUDA(cudaMalloc(&d.idx, maxT * p.topK * sizeof(int64_t)));
    PERF_CUDA(cudaMalloc(&d.weights, maxT * p.topK * sizeof(float)));
    PERF_CUDA(cudaMalloc(&d.tokensPerRank, p.nRanks * sizeof(int)));
    PERF_CUDA(cudaMalloc(&d.tokensPerExpert, p.numExperts * sizeof(int)));
    PERF_CUDA(cudaMalloc(&d.isTokenInRank, maxT * p.nRanks));
    PERF_CUDA(cudaMalloc(&d.combineOut, maxT * p.hidden * 2));
  }

  void prepare(long tokens) {
    T = tokens;
    if (handle) PERF_MOE(ncclMoeHandleDestroy(handle));
    handle = nullptr;
    own = makeRouting(p, p.rank, T);
    makeTokens(p, p.rank, T, &ownX, &ownScales);
    PERF_CUDA(cudaMemcpy(d.x, ownX.data(), ownX.size(), cudaMemcpyHostToDevice));
    if (p.scalesPerRow)
      PERF_CUDA(cudaMemcpy(d.scales, ownScales.data(), ownScales.size() * 4, cudaMemcpyHostToDevice));
    PERF_CUDA(cudaMemcpy(d.idx, own.idx.data(), own.idx.size() * 8, cudaMemcpyHostToDevice));
    PERF_CUDA(cudaMemcpy(d.weights, own.weights.data(), own.weights.size() * 4, cudaMemcpyHostToDevice));
    plan = planReceive(p, T);
    if (p.nNodes > 1) netModel();
    combineIn.clear();
    if (p.dtype == ncclMoeFp8E4m3) combineIn = makeCombineInput(p, plan);
    memset(&out, 0, sizeof(out));
    dispatch();  // creates the handle and tells where the outputs are
    moe_perf::quiesce(ctx);
    poison();
  }

  // Across nodes: this rank's traffic at T (testing/ht_net_model.h) and, on rank 0, the model
  // line: the busiest NIC's bytes per direction and, with the plugin shaped, its time at line
  // rate (ll_net_model.h's llNetModelUs: one message latency + the busier direction's bytes).
  void netModel() {
    moe_net::HtNetShape s;
    s.nRanks = p.nRanks;
    s.gpusPerNode = p.nRanks / p.nNodes;
    s.numExperts = p.numExperts;
    s.hidden = p.hidden;
    s.topK = p.topK;
    s.fp8 = p.dtype == ncclMoeFp8E4m3;
    std::vector<moe_ref::Routing> rt(p.nRanks);
    for (int r = 0; r < p.nRanks; r++) {
      rt[r].numTokens = (int)T;
      rt[r].topK = p.topK;
      rt[r].topkIdx = plan.routing[r].idx;
      rt[r].topkWeights = plan.routing[r].weights;
    }
    traffic = moe_net::htNetTraffic(s, rt, p.rank);
    if (p.rank != 0) return;
    const moe_net::NicShape nic = moe_net::nicShapeFromEnv();
    double dispUs = 0, combUs = 0;  // the busiest NIC's time at line rate
    double dispOut = 0, dispIn = 0, combOut = 0, combIn = 0, dispNvl = 0, combNvl = 0;  // bytes
    for (int r = 0; r < p.nRanks; r++) {
      const moe_net::HtNetTraffic t = r == p.rank ? traffic : moe_net::htNetTraffic(s, rt, r);
      dispUs = std::max(dispUs, moe_net::llNetModelUs(nic, t.dispatchRdmaOut, t.dispatchRdmaIn));
      combUs = std::max(combUs, moe_net::llNetModelUs(nic, t.combineRdmaOut, t.combineRdmaIn));
      dispOut = std::max(dispOut, t.dispatchRdmaOut);
      dispIn = std::max(dispIn, t.dispatchRdmaIn);
      combOut = std::max(combOut, t.combineRdmaOut);
      combIn = std::max(combIn, t.combineRdmaIn);
      dispNvl = std::max(dispNvl, t.dispatchNvlinkOut);
      combNvl = std::max(combNvl, t.combineNvlinkIn);
    }
    char shape[96] = "NIC unshaped";
    if (nic.gbps > 0)
      snprintf(shape, sizeof(shape), "NIC %g GB/s + %g us per message", nic.gbps, nic.latencyUs);
    auto op = [&](double us, double out, double in, double nvl) {
      char buf[160];
      int n = snprintf(buf, sizeof(buf), "busiest NIC %.3f MB out, %.3f MB in, NVLink %.3f MB",
                       out / 1e6, in / 1e6, nvl / 1e6);
      if (nic.gbps > 0) snprintf(buf + n, sizeof(buf) - n, ": >= %.1f us", us);
      return std::string(buf);
    };
    printf("# net model, %ld tokens (%d nodes x %d GPUs, %s): dispatch %s; combine %s\n", T,
           p.nNodes, s.gpusPerNode, shape, op(dispUs, dispOut, dispIn, dispNvl).c_str(),
           op(combUs, combOut, combIn, combNvl).c_str());
    fflush(stdout);
  }

  // Operations in run order. Checks: one more call on poisoned outputs, compared on the host.
  std::vector<moe_perf::PerfOp> ops() {
    moe_perf::PerfOp lay, disp, comb;
    lay.name = "layout";
    lay.run = [this] { layout(); };
    lay.check = [this](long) {
      poison();
      layout();
      moe_perf::quiesce(ctx);
      return checkLayout(p, own, T, d);
    };
    disp.name = "dispatch";
    disp.run = [this] { dispatch(); };
    disp.bytes = [this](long, double* alg, double* bus) {
      *alg = plan.rows * p.bwRowBytes();
      *bus = (plan.rows - plan.selfRows) * p.bwRowBytes();
    };
    disp.netBytes = [this](long, double* rdma, double* nvl) {
      *rdma = traffic.dispatchRdmaOut;
      *nvl = traffic.dispatchNvlinkOut;
    };
    disp.check = [this](long) {
      poison();
      dispatch();
      moe_perf::quiesce(ctx);
      return checkDispatch(p, plan, T, ownX, ownScales, out);
    };
    comb.name = "combine";
    comb.init = [this](long) { fillCombineInput(); };
    comb.run = [this] { combine(); };
    comb.bytes = [this](long, double* alg, double* bus) {
      *alg = plan.rows * 2.0 * p.hidden;
      *bus = (plan.rows - plan.selfRows) * 2.0 * p.hidden;
    };
    comb.netBytes = [this](long, double* rdma, double* nvl) {
      *rdma = traffic.combineRdmaOut;
      *nvl = traffic.combineNvlinkIn;
    };
    comb.check = [this](long) {
      poison();
      dispatch();
      fillCombineInput();
      combine();
      moe_perf::quiesce(ctx);
      return checkCombine(p, own, T, ownX, d, weighted);
    };
    return {lay, disp, comb};
  }

  void teardown() {
    if (handle) PERF_MOE(ncclMoeHandleDestroy(handle));
    for (void* ptr : {d.x, (void*)d.scales, (void*)d.idx, (void*)d.weights, (void*)d.tokensPerRank,
                      (void*)d.tokensPerExpert, (void*)d.isTokenInRank, d.combineOut})
      if (ptr) PERF_CUDA(cudaFree(ptr));
  }
};

}  // namespace

int main(int argc, char** argv) {
  static Bench bench;
  moe_perf::PerfTest test;
  test.name = "ht_perf";
  test.mode = ncclMoeHighThroughput;
  test.timing = moe_perf::Timing::kBackToBack;
  test.params = [] {
    const char* k = getenv("NCCL_MOE_HT_COMBINE");  // the combine kernel
    const bool group = bench.p.routing == moe_perf::Routing::kGroup;
    return moe_perf::Params{{"combine", k && *k ? k : "pull"},
                            {"group_nodes", group ? std::to_string(bench.p.groupNodes) : "-"},
                            {"weighted", bench.weighted ? "1" : "0"}};
  };
  test.extraOptions = {
      {"weighted", 'W', "0|1",
       "combine weighted by the dispatch's top-k weights (default 0: the plain sum, as DeepEP's)",
       [](const char* v) { return moe_perf::parse01(v, &bench.weighted); }},
  };
  test.setup = [](const moe_perf::Context& ctx) {
    bench.setup(ctx);
    return bench.ops();
  };
  test.prepare = [](long T) { bench.prepare(T); };
  test.teardown = [] { bench.teardown(); };
  return moe_perf::perfMain(argc, argv, moe_perf::Options(), &test);
}
