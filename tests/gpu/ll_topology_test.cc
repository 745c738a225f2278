// Low-latency results do not depend on where the ranks are: the same routing on 1 node x R GPUs
// and on n fake nodes (MOE_FAKE_NODES=n, testing/ranks.h: NCCL_HOSTID per rank, the moeloop
// plugin) gives bitwise-identical dispatch blocks and combine outputs.
//
// Each run checks its results exactly against the CPU reference (llRunAndCheck) and writes, per
// rank and case, a digest of what it got into $MOE_LL_DIGEST_DIR/<case>.rank<r>.nodes<n>: the
// counts, every (local expert, source) block with its rows sorted by srcToken (row and scale
// bytes; the order inside a block is unspecified), and the combine output. When the directory
// already holds the digest of another topology for the same case and rank, the two must be equal.
// `make llnettest` runs the suite on 1 node, then on 2 fake nodes, with one directory. Skipped
// without MOE_LL_DIGEST_DIR.
#include <stdio.h>
#include <stdlib.h>
#include <algorithm>
#include <fstream>
#include <numeric>
#include <sstream>

#include "digest.h"
#include "ll_test_util.h"

namespace moe_gpu {
namespace {

class LlTopology : public GpuTest {};


// Digest lines of one run: counts, blocks in srcToken order, combine output.
std::string digest(const LlShape& s, const LlBlocks& got, const std::vector<uint16_t>& combined) {
  std::ostringstream o;
  uint64_t h = fnv(kFnvBasis, got.counts.data(), got.counts.size() * sizeof(int));
  h = fnv(h, got.expertCounts.data(), got.expertCounts.size() * sizeof(int));
  o << "counts " << std::hex << h << "\n";
  for (size_t b = 0; b < got.srcToken.size(); ++b) {
    const std::vector<int>& tok = got.srcToken[b];
    std::vector<size_t> order(tok.size());
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](size_t x, size_t y) { return tok[x] < tok[y]; });
    uint64_t hb = kFnvBasis;
    for (size_t i : order) {
      hb = fnv(hb, &tok[i], sizeof(int));
      hb = fnv(hb, got.rows[b].data() + i * s.rowBytes(), s.rowBytes());
      if (s.scaleBytes() > 0) hb = fnv(hb, got.scales[b].data() + i * s.scaleBytes(), s.scaleBytes());
    }
    o << "block " << std::dec << b << " " << std::hex << hb << "\n";
  }
  o << "combine " << std::hex << fnv(kFnvBasis, combined.data(), combined.size() * 2) << "\n";
  return o.str();
}

void runCase(const char* name, const LlShape& s, const GenSpec& g, bool split) {
  const char* dir = getenv("MOE_LL_DIGEST_DIR");
  if (dir == nullptr || dir[0] == '\0') GTEST_SKIP() << "MOE_LL_DIGEST_DIR is not set (make llnettest sets it)";
  const int nodes = moe_ranks::fakeNodes();
  LlEp ep(s);
  if (!ep.create()) return;
  LlInputs in;
  LlProblem p = makeLlProblem(s, g);
  if (!allRanksOk(in.upload(p), "upload inputs")) return;
  LlBlocks got;
  std::vector<uint16_t> combined;
  LlRunOpts o;
  o.split = split;
  o.blocks = &got;
  o.combineResult = &combined;
  if (!llRunAndCheck(ep, in, p, o, std::string(name) + " " + s.str())) return;
  const std::string mine = digest(s, got, combined);
  const std::string base = std::string(dir) + "/" + name + ".rank" + std::to_string(rank()) + ".nodes";
  std::ofstream(base + std::to_string(nodes)) << mine;
  for (int other = 1; other <= nRanks(); ++other) {
    if (other == nodes) continue;
    std::ifstream f(base + std::to_string(other));
    if (!f) continue;
    std::stringstream theirs;
    theirs << f.rdbuf();
    EXPECT_EQ(theirs.str(), mine) << "rank " << rank() << ": " << name << " on " << nodes << " node(s) differs from "
                                  << other << " node(s)";
    if (rank() == 0) printf("# %s: %d node(s) == %d node(s): %s\n", name, nodes, other, theirs.str() == mine ? "identical" : "DIFFERENT");
  }
}

LlShape shapeOf(bool fp8, ncclMoeScaleFormat_t fmt) {
  LlShape s;
  s.fp8 = fp8;
  s.fmt = fmt;
  return s;
}

TEST_F(LlTopology, RandomBf16) { runCase("random-bf16", shapeOf(false, ncclMoeScaleFp32), spec(9101), false); }
TEST_F(LlTopology, RandomFp8Fp32Split) {
  runCase("random-fp8-fp32-split", shapeOf(true, ncclMoeScaleFp32), spec(9102), true);
}
TEST_F(LlTopology, RandomFp8Pow2) { runCase("random-fp8-pow2", shapeOf(true, ncclMoeScaleFp32Pow2), spec(9103), false); }
TEST_F(LlTopology, SkewedFp8Ue8m0) {
  runCase("skewed-fp8-ue8m0", shapeOf(true, ncclMoeScaleUe8m0), spec(9104, Route::RankZeroOnly), false);
}
TEST_F(LlTopology, OneTokenBf16) { runCase("one-token-bf16", shapeOf(false, ncclMoeScaleFp32), spec(9105, Route::Random, 1), false); }

}  // namespace
}  // namespace moe_gpu
