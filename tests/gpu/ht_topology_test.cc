// High-throughput dispatch results do not depend on where the ranks are: the same routing on
// 1 node x R GPUs and on n fake nodes (MOE_FAKE_NODES=n, testing/ranks.h: NCCL_HOSTID per rank,
// the moeloop plugin) gives bitwise-identical dispatch outputs on every rank (the rows in source
// rank then token order, as intranode). The combine is not compared across topologies (across
// nodes it rounds once per remote node's partial); each run checks it against its own
// topology's contract (referenceCombine).
//
// Each run checks its results exactly against the CPU reference (runAndCheck) and writes, per
// rank and case, a digest of every dispatch output (numRecvTokens, expertCounts, and the
// received rows' x, scales, topkIdx, topkWeights) into
// $MOE_HT_DIGEST_DIR/<case>.R<ranks>.rank<r>.nodes<n>. A 1-node run only writes; a run on n > 1
// nodes compares with the 1-node run's file of the same case, rank count and rank, and fails on
// any difference or when that file is missing. The routings do not depend on the run's nodes
// (node-limited routing assumes 2 nodes whatever the topology). `make htnettest` runs the suite
// on 1 node, then on fake nodes, with one directory. Skipped without MOE_HT_DIGEST_DIR.
#include <stdio.h>
#include <stdlib.h>

#include <fstream>
#include <sstream>
#include <vector>

#include "digest.h"
#include "ht_net_util.h"

namespace moe_gpu {
namespace {

class HtTopology : public GpuTest {};

// One line per field of ep's last dispatch outputs: the counts, then the received rows' fields.
std::string digest(const Shape& s, const ncclMoeDispatchOutput_t& out, bool weights) {
  const int L = s.numExperts() / nRanks(), K = s.topK, groups = s.scalesPerRow();
  int n = -1;
  std::vector<int> counts(L, -1);
  download(&n, out.numRecvTokens, sizeof(int));
  download(counts.data(), out.expertCounts, L * sizeof(int));
  std::ostringstream o;
  o << "numRecvTokens " << n << "\n";
  o << "expertCounts " << std::hex << fnv(kFnvBasis, counts.data(), counts.size() * sizeof(int)) << std::dec << "\n";
  const size_t rows = n < 0 ? 0 : (size_t)std::min(n, s.capacity());
  auto field = [&](const char* name, const void* dev, size_t bytes) {
    std::vector<uint8_t> h(bytes);
    download(h.data(), dev, bytes);
    o << name << " " << std::hex << fnv(kFnvBasis, h.data(), h.size()) << std::dec << "\n";
  };
  field("x", out.x, rows * s.rowBytes());
  if (groups) field("xScales", out.xScales, rows * groups * sizeof(float));
  field("topkIdx", out.topkIdx, rows * K * sizeof(int64_t));
  if (weights) field("topkWeights", out.topkWeights, rows * K * sizeof(float));
  return o.str();
}

// Dispatch (+ combine, checked) `g` on `s`; with `cached`, then a dispatch with topkIdx = NULL
// and new x, whose outputs are the ones digested.
void runCase(const char* name, const Shape& s, const GenSpec& g, bool cached = false) {
  const char* dir = getenv("MOE_HT_DIGEST_DIR");
  if (dir == nullptr || dir[0] == '\0') GTEST_SKIP() << "MOE_HT_DIGEST_DIR is not set (make htnettest sets it)";
  const int nodes = nodeCount(), me = rank();
  Ep ep(s);
  if (!ep.create()) return;
  DeviceInputs in;
  Problem p = makeProblem(s, g);
  if (!allRanksOk(in.upload(p), "upload inputs")) return;
  const std::string tag = std::string(name) + " " + s.str() + " " + topologyStr();
  {
    Reference ref = makeReference(p);
    if (!runAndCheck(ep, in, p, ref, RunOpts(), tag.c_str())) return;
  }
  bool weights = true;
  if (cached) {
    regenerateX(p, g.seed + 77);
    Reference ref = makeReference(p);
    if (!allRanksOk(in.upload(p), "upload new x")) return;
    RunOpts o;
    o.reuseRouting = true;
    o.dispatchWeights = false;
    weights = false;
    if (!runAndCheck(ep, in, p, ref, o, (tag + " [cached]").c_str())) return;
  }
  const std::string mine = digest(s, ep.lastOut, weights);
  const std::string base = std::string(dir) + "/" + name + ".R" + std::to_string(nRanks()) + ".rank" + std::to_string(me) +
                           ".nodes";
  std::ofstream(base + std::to_string(nodes)) << mine;
  if (nodes == 1) return;
  std::ifstream f(base + "1");
  if (!f) {
    ADD_FAILURE() << "rank " << me << ": " << name << ": no 1-node digest " << base << "1 to compare with (run the "
                  << "suite on 1 node first with the same MOE_HT_DIGEST_DIR, as make htnettest does)";
    return;
  }
  std::stringstream theirs;
  theirs << f.rdbuf();
  EXPECT_EQ(theirs.str(), mine) << "rank " << me << ": " << name << " on " << nodes
                                << " node(s) differs from 1 node (numRecvTokens / counts / x / scales / topkIdx / "
                                   "topkWeights lines above)";
  if (me == 0)
    printf("# %s: %d node(s) == 1 node: %s\n", name, nodes, theirs.str() == mine ? "identical" : "DIFFERENT");
}

// Node-limited routing on 2 assumed nodes (1 where R is odd), whatever the run's topology.
GenSpec twoNodeSpec(uint64_t seed, int nodesPerToken) {
  GenSpec g = spec(seed, Route::NodeLimited);
  g.nodes = nRanks() % 2 == 0 ? 2 : 1;
  g.nodesPerToken = nodesPerToken;
  return g;
}

TEST_F(HtTopology, RandomBf16) { runCase("random-bf16", htShape(7168, 32, ncclMoeBf16), spec(9201)); }

TEST_F(HtTopology, RandomFp8) { runCase("random-fp8", htShape(2048, 64, ncclMoeFp8E4m3), spec(9202)); }

TEST_F(HtTopology, SkewedRankZeroBf16) {
  runCase("skewed-rank-zero-bf16", htShape(2048, 256, ncclMoeBf16), spec(9203, Route::RankZeroOnly));
}

TEST_F(HtTopology, NodeLimitedFp8) { runCase("node-limited-fp8", htShape(2048, 64, ncclMoeFp8E4m3), twoNodeSpec(9204, 1)); }

TEST_F(HtTopology, ZeroTokenRankBf16) {
  GenSpec g = spec(9205);
  g.zeroTokenRank = 1;
  runCase("zero-token-rank-bf16", htShape(2048, 32, ncclMoeBf16), g);
}

TEST_F(HtTopology, CachedDispatchBf16) {
  runCase("cached-bf16", htShape(2048, 32, ncclMoeBf16), twoNodeSpec(9206, 2), true);
}

TEST_F(HtTopology, OneTokenFp8) {
  Shape s = htShape(2048, 32, ncclMoeFp8E4m3);
  s.maxTokens = 1;
  runCase("one-token-fp8", s, spec(9207));
}

}  // namespace
}  // namespace moe_gpu
