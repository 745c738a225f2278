// Deterministic problem generation, the reference results, and the element-exact comparisons
// of the multi-GPU tests (see gpu_env.h).
//
// Weights are multiples of 1/16 in [1/16, 1] and token values are BF16 (8 significant bits), so
// every product weight * value and every sum of weights is exact in FP32: the GPU (which may
// fuse multiply-adds) and the CPU reference then round identically as long as both add the
// per-rank terms in rank order, and combine can be compared bitwise.
#include "gpu_env.h"
#include "../../testing/ht_net_protocol.h"
#include "../../testing/rng.h"

#include <stdio.h>
#include <string.h>
#include <algorithm>
#include <cmath>
#include <sstream>

namespace moe_gpu {

namespace {

using moe_rng::Rng;

uint64_t streamSeed(uint64_t seed, int rank, int what) {
  Rng r(seed * 0x100000001B3ull + (uint64_t)rank * 0x9E3779B1ull + (uint64_t)what);
  r.next();
  return r.next();
}

int tokensOf(const Shape& s, const GenSpec& g, int r) {
  if (r == g.zeroTokenRank) return 0;
  if (g.numTokens >= 0) return std::min(g.numTokens, s.maxTokens);
  return s.maxTokens - (r * 37) % (s.maxTokens / 4 + 1);
}

// Picks n distinct ids in [base, base + range) into row[0..n).
void pickDistinct(Rng& rng, int n, int base, int range, int64_t* row) {
  for (int k = 0; k < n; k++) {
    int64_t e;
    bool dup;
    do {
      e = base + rng.below(range);
      dup = std::find(row, row + k, e) != row + k;
    } while (dup);
    row[k] = e;
  }
}

// Picks min(n, |nodes| * perNode) distinct experts into row[0..), each draw a node of `nodes`
// and an expert of its perNode experts (node b's: b * perNode ..).
void pickFromNodes(Rng& rng, int n, const std::vector<int>& nodes, int perNode, int64_t* row) {
  n = std::min(n, (int)nodes.size() * perNode);
  for (int k = 0; k < n; k++) {
    int64_t e;
    do {
      e = (int64_t)nodes[rng.below((int)nodes.size())] * perNode + rng.below(perNode);
    } while (std::find(row, row + k, e) != row + k);
    row[k] = e;
  }
}

// Entries k >= first become -1 with probability p (as Random's drops).
void dropEntries(Rng& rng, double p, int first, int K, int64_t* row) {
  for (int k = first; k < K; k++)
    if (rng.uniform() < p) row[k] = -1;
}

// The node routes (see Route): their tokens' top-k, on `nodes` nodes of the R ranks.
void nodeRoute(Rng& rng, const Shape& s, const GenSpec& g, int r, int64_t* row) {
  const int E = s.numExperts(), K = s.topK, R = nRanks();
  const int nodes = g.nodes >= 1 && R % g.nodes == 0 ? g.nodes : 1, G = R / nodes;
  const int perNode = G * (E / R), myNode = r / G;
  std::vector<int> pool;
  switch (g.route) {
    case Route::NodeLimited: {
      std::vector<int> all(nodes);
      for (int b = 0; b < nodes; b++) all[b] = b;
      for (int i = 0; i < std::min(g.nodesPerToken, nodes); i++) {  // partial Fisher-Yates
        const int j = i + rng.below(nodes - i);
        std::swap(all[i], all[j]);
        pool.push_back(all[i]);
      }
      break;
    }
    case Route::OwnNode:
      pool.push_back(myNode);
      break;
    case Route::RemoteNode:
      pool.push_back((myNode + 1) % nodes);
      break;
    case Route::AvoidLastNode: {
      const int range = E - (nodes > 1 ? perNode : E / R);
      if (range > 0) pickDistinct(rng, std::min(K, range), 0, range, row);
      dropEntries(rng, g.dropProb, 0, K, row);
      return;
    }
    case Route::EveryNode: {
      const int forced = std::min(K, nodes);
      for (int b = 0; b < forced; b++) row[b] = (int64_t)b * perNode + rng.below(perNode);
      for (int k = forced; k < std::min(K, E); k++) {
        int64_t e;
        do {
          e = rng.below(E);
        } while (std::find(row, row + k, e) != row + k);
        row[k] = e;
      }
      dropEntries(rng, g.dropProb, forced, K, row);
      return;
    }
    default:
      return;
  }
  pickFromNodes(rng, K, pool, perNode, row);
  dropEntries(rng, g.dropProb, 0, K, row);
}

moe_ref::Routing makeRouting(const Shape& s, const GenSpec& g, int r) {
  const int E = s.numExperts(), K = s.topK, local = E / nRanks();
  moe_ref::Routing rt;
  rt.numTokens = tokensOf(s, g, r);
  rt.topK = K;
  rt.topkIdx.assign((size_t)rt.numTokens * K, -1);
  rt.topkWeights.assign((size_t)rt.numTokens * K, 0.f);
  Rng rng(streamSeed(g.seed, r, 1));
  for (int t = 0; t < rt.numTokens; t++) {
    int64_t* row = &rt.topkIdx[(size_t)t * K];
    switch (g.route) {
      case Route::Random:
        pickDistinct(rng, std::min(K, E), 0, E, row);
        for (int k = 0; k < K; k++)
          if (rng.uniform() < g.dropProb) row[k] = -1;
        break;
      case Route::OneExpert:
        row[0] = 0;
        break;
      case Route::RankZeroOnly:
        pickDistinct(rng, std::min(K, local), 0, local, row);
        break;
      default:
        nodeRoute(rng, s, g, r, row);
        break;
    }
    // Weights of -1 entries are random too: combine must ignore them.
    for (int k = 0; k < K; k++) rt.topkWeights[(size_t)t * K + k] = (1 + rng.below(16)) / 16.f;
  }
  return rt;
}

void makeX(Problem& p, int r, uint64_t seed) {
  const Shape& s = p.shape;
  const int T = p.routing[r].numTokens, H = s.hidden;
  Rng rng(streamSeed(seed, r, 2));
  p.x[r].assign((size_t)T * s.rowBytes(), 0);
  p.scales[r].assign((size_t)T * s.scalesPerRow(), 0.f);
  std::vector<float> row(H);
  for (int t = 0; t < T; t++) {
    float mag = 1.f;
    for (int c = 0; c < H; c++) {
      if (c % 128 == 0) mag = std::ldexp(1.f, rng.below(9) - 4);  // 2^-4 .. 2^4 per group
      row[c] = (float)(2.0 * rng.uniform() - 1.0) * mag;
    }
    if (s.dtype == ncclMoeBf16) {
      uint16_t* dst = reinterpret_cast<uint16_t*>(&p.x[r][(size_t)t * s.rowBytes()]);
      for (int c = 0; c < H; c++) dst[c] = moe_ref::floatToBf16(row[c]);
    } else {
      moe_ref::quantizeFp8Row(row.data(), H, &p.x[r][(size_t)t * H],
                              &p.scales[r][(size_t)t * s.scalesPerRow()]);
    }
  }
}

// Collects mismatches of one output field and reports them as one failure.
struct Mismatches {
  Mismatches(const char* t, const char* f) : tag(t), field(f) {}
  const char* tag;
  const char* field;
  long count = 0;
  std::ostringstream first;
  void add(long row, long col, const std::string& got, const std::string& expected) {
    if (count++ < 5)
      first << "\n    (rank " << rank() << ", row " << row << ", col " << col << "): got " << got
            << ", expected " << expected;
  }
  long report() {
    if (count)
      ADD_FAILURE() << tag << ": rank " << rank() << ": " << field << ": " << count
                    << " mismatching elements; first:" << first.str();
    return count;
  }
};

std::string hexBits(uint64_t v, int digits) {
  char b[32];
  snprintf(b, sizeof(b), "0x%0*llx", digits, (unsigned long long)v);
  return b;
}
std::string bf16Str(uint16_t v) {
  std::ostringstream s;
  s << hexBits(v, 4) << "(" << moe_ref::bf16ToFloat(v) << ")";
  return s.str();
}
std::string fp8Str(uint8_t v) {
  std::ostringstream s;
  s << hexBits(v, 2) << "(" << moe_ref::fp8e4m3ToFloat(v) << ")";
  return s.str();
}
std::string floatStr(float v) {
  uint32_t u;
  memcpy(&u, &v, 4);
  std::ostringstream s;
  s << hexBits(u, 8) << "(" << v << ")";
  return s.str();
}

// Compares `n` rows of `cols` elements of type T bitwise.
template <class T, class Fmt>
long compareRows(const T* got, const T* exp, long n, long cols, Mismatches& mm, Fmt fmt) {
  for (long i = 0; i < n; i++) {
    if (memcmp(got + i * cols, exp + i * cols, cols * sizeof(T)) == 0) continue;
    for (long c = 0; c < cols; c++)
      if (memcmp(&got[i * cols + c], &exp[i * cols + c], sizeof(T)) != 0)
        mm.add(i, c, fmt(got[i * cols + c]), fmt(exp[i * cols + c]));
  }
  return mm.report();
}

std::string intStr(int64_t v) { return std::to_string((long long)v); }

}  // namespace

GenSpec spec(uint64_t seed, Route route, int numTokens) {
  GenSpec g;
  g.seed = seed;
  g.route = route;
  g.numTokens = numTokens;
  return g;
}

Problem makeProblem(const Shape& s, const GenSpec& g) {
  Problem p;
  p.shape = s;
  const int R = nRanks();
  p.routing.resize(R);
  p.x.resize(R);
  p.scales.resize(R);
  for (int r = 0; r < R; r++) {
    p.routing[r] = makeRouting(s, g, r);
    makeX(p, r, g.seed);
  }
  return p;
}

void regenerateX(Problem& p, uint64_t seed) {
  for (int r = 0; r < nRanks(); r++) makeX(p, r, seed);
}

int trimRouting(moe_ref::Routing& rt, int tokens, int topK) {
  const int T = std::max(0, std::min(tokens, rt.numTokens));
  rt.numTokens = T;
  rt.topkIdx.resize((size_t)T * topK);
  rt.topkWeights.resize((size_t)T * topK);
  return T;
}

void cutTokens(Problem& p, const std::vector<int>& tokens) {
  const Shape& s = p.shape;
  for (int r = 0; r < (int)p.routing.size() && r < (int)tokens.size(); r++) {
    const int T = trimRouting(p.routing[r], tokens[r], s.topK);
    p.x[r].resize((size_t)T * s.rowBytes());
    p.scales[r].resize((size_t)T * s.scalesPerRow());
  }
}

Reference makeReference(const Problem& p) {
  const Shape& s = p.shape;
  const int R = nRanks(), H = s.hidden, G = s.scalesPerRow();
  Reference ref;
  ref.recv.resize(R);
  ref.expertOut.resize(R);
  for (int d = 0; d < R; d++) {
    ref.recv[d] = moe_ref::dispatch(d, p.routing, p.x, p.scales, s.rowBytes(), H, s.numExperts());
    const moe_ref::Received& rv = ref.recv[d];
    std::vector<uint16_t>& eo = ref.expertOut[d];
    eo.resize((size_t)rv.numRows * H);
    if (s.dtype == ncclMoeBf16) {
      if (!eo.empty()) memcpy(eo.data(), rv.x.data(), eo.size() * sizeof(uint16_t));
    } else if (rv.scales.size() != (size_t)rv.numRows * G) {
      ADD_FAILURE() << "reference dispatch to rank " << d << " returned " << rv.scales.size()
                    << " scales for " << rv.numRows << " rows";
    } else {  // identity expert on dequantised rows
      for (size_t i = 0; i < (size_t)rv.numRows; i++)
        for (int c = 0; c < H; c++)
          eo[i * H + c] = moe_ref::floatToBf16(moe_ref::fp8e4m3ToFloat(rv.x[i * H + c]) *
                                               rv.scales[i * G + c / 128]);
    }
  }
  return ref;
}

int nodeCount() {
  const int n = moe_ranks::fakeNodes();
  return n >= 1 && nRanks() % n == 0 ? n : 1;
}

int gpusPerNode() { return nRanks() / nodeCount(); }

std::vector<uint16_t> referenceCombine(const Problem& p, const Reference& ref, bool weighted,
                                       const std::vector<std::vector<float>>& combineWeights) {
  if (nodeCount() > 1)
    return moe_net::htSimulateCombine(gpusPerNode(), p.routing, ref.expertOut, p.shape.hidden,
                                      p.shape.numExperts(), weighted, combineWeights)[rank()];
  if (combineWeights.empty())
    return moe_ref::combine(rank(), p.routing, ref.expertOut, p.shape.hidden,
                            p.shape.numExperts(), weighted);
  std::vector<moe_ref::Routing> rt = p.routing;
  for (size_t r = 0; r < rt.size(); r++) rt[r].topkWeights = combineWeights[r];
  return moe_ref::combine(rank(), rt, ref.expertOut, p.shape.hidden, p.shape.numExperts(), weighted);
}

std::vector<float> referenceTopkValues(const Problem& p, const std::vector<std::vector<float>>& values) {
  if (nodeCount() > 1)
    return moe_net::htSimulateCombineTopkValues(gpusPerNode(), p.routing, values, p.shape.numExperts())[rank()];
  return moe_ref::combineTopkValues(rank(), p.routing, values, p.shape.numExperts());
}

long checkDispatch(const ncclMoeDispatchOutput_t& out, const Problem& p,
                   const moe_ref::Received& ref, const DispatchChecks& what, const char* tag) {
  const Shape& s = p.shape;
  const int me = rank(), local = s.numExperts() / nRanks(), K = s.topK, G = s.scalesPerRow();
  long bad = 0;
  if (!out.x || !out.topkIdx || !out.numRecvTokens || !out.expertCounts || (G && !out.xScales)) {
    ADD_FAILURE() << tag << ": rank " << me << ": NULL pointer in the dispatch output";
    return 1;
  }
  int n = -1;
  std::vector<int> counts(local, -1);
  download(&n, out.numRecvTokens, sizeof(int));
  download(counts.data(), out.expertCounts, local * sizeof(int));
  if (n != ref.numRows) {
    ADD_FAILURE() << tag << ": rank " << me << ": numRecvTokens " << n << ", expected "
                  << ref.numRows;
    bad++;
  }
  Mismatches mc{tag, "expertCounts"};
  bad += compareRows(counts.data(), ref.expertCounts.data(), 1, local, mc, intStr);
  if (what.hostCounts) {
    if (out.hostNumRecvTokens != ref.numRows) {
      ADD_FAILURE() << tag << ": rank " << me << ": hostNumRecvTokens " << out.hostNumRecvTokens
                    << ", expected " << ref.numRows;
      bad++;
    }
    if (!out.hostExpertCounts) {
      ADD_FAILURE() << tag << ": rank " << me << ": hostExpertCounts is NULL";
      bad++;
    } else {
      Mismatches mh{tag, "hostExpertCounts"};
      bad += compareRows(out.hostExpertCounts, ref.expertCounts.data(), 1, local, mh, intStr);
    }
  } else if (out.hostNumRecvTokens != -1) {
    ADD_FAILURE() << tag << ": rank " << me << ": hostNumRecvTokens " << out.hostNumRecvTokens
                  << " without NCCL_MOE_DISPATCH_HOST_COUNTS, expected -1";
    bad++;
  }
  const long rows = std::min(ref.numRows, s.capacity());
  if (rows == 0) return bad;

  std::vector<uint8_t> x((size_t)rows * s.rowBytes());
  download(x.data(), out.x, x.size());
  if (s.dtype == ncclMoeBf16) {
    Mismatches m{tag, "x (bf16)"};
    bad += compareRows(reinterpret_cast<const uint16_t*>(x.data()),
                       reinterpret_cast<const uint16_t*>(ref.x.data()), rows, s.hidden, m,
                       bf16Str);
  } else {
    Mismatches m{tag, "x (fp8)"};
    bad += compareRows(x.data(), ref.x.data(), rows, s.hidden, m, fp8Str);
    std::vector<float> sc((size_t)rows * G);
    download(sc.data(), out.xScales, sc.size() * sizeof(float));
    Mismatches ms{tag, "xScales"};
    if (ref.scales.size() < sc.size()) {
      ADD_FAILURE() << tag << ": the reference has no scales for " << rows << " rows";
      bad++;
    } else {
      bad += compareRows(sc.data(), ref.scales.data(), rows, G, ms, floatStr);
    }
  }
  if (what.topkIdx) {
    std::vector<int64_t> idx((size_t)rows * K);
    download(idx.data(), out.topkIdx, idx.size() * sizeof(int64_t));
    Mismatches m{tag, "topkIdx"};
    bad += compareRows(idx.data(), ref.topkIdx.data(), rows, K, m, intStr);
  }
  if (what.weights) {
    if (!out.topkWeights) {
      ADD_FAILURE() << tag << ": rank " << me << ": topkWeights is NULL";
      return bad + 1;
    }
    std::vector<float> w((size_t)rows * K);
    download(w.data(), out.topkWeights, w.size() * sizeof(float));
    Mismatches m{tag, "topkWeights"};
    if (ref.topkWeights.size() < w.size()) {
      ADD_FAILURE() << tag << ": the reference has no weights for " << rows << " rows";
      bad++;
    } else {
      bad += compareRows(w.data(), ref.topkWeights.data(), rows, K, m, floatStr);
    }
  }
  return bad;
}

long checkCombine(const void* devOut, const std::vector<uint16_t>& expected, int numTokens,
                  int hidden, const char* tag, std::vector<uint16_t>* gotOut) {
  std::vector<uint16_t> got((size_t)numTokens * hidden);
  if (expected.size() != got.size()) {
    ADD_FAILURE() << tag << ": reference combine has " << expected.size() << " values, expected "
                  << got.size();
    return 1;
  }
  download(got.data(), devOut, got.size() * sizeof(uint16_t));
  Mismatches m{tag, "combine output"};
  long bad = compareRows(got.data(), expected.data(), numTokens, hidden, m, bf16Str);
  if (gotOut) *gotOut = std::move(got);
  return bad;
}

// Counts the bytes of `bytes` at `dev` that are no longer 0xFF (and reports them as a failure).
long countUnpoisoned(const void* dev, size_t bytes, const std::string& what) {
  if (!dev || bytes == 0) return 0;
  std::vector<uint8_t> h(bytes);
  download(h.data(), dev, bytes);
  long n = 0, first = -1;
  for (size_t i = 0; i < bytes; i++)
    if (h[i] != 0xFF) {
      if (first < 0) first = (long)i;
      n++;
    }
  if (n)
    ADD_FAILURE() << "rank " << rank() << ": " << what << ": " << n
                  << " bytes no longer poisoned (first at byte " << first << ")";
  return n;
}

}  // namespace moe_gpu
