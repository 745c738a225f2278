// The internode high-throughput protocol, simulated on the CPU (testing/ht_net_protocol.h): on
// every node count its outputs equal the single-domain reference (moe_ref::dispatch) on every
// rank, no output row is left unwritten or written twice, and the records it stages and lands
// are the traffic model's (testing/ht_net_model.h).
#include <gtest/gtest.h>

#include <math.h>
#include <stdint.h>
#include <vector>

#include "testing/ht_net_model.h"
#include "testing/ht_net_protocol.h"
#include "testing/reference.h"

namespace {

struct Case {
  int R, E, K, hidden;
  bool fp8;
  int route;  // 0 random with -1s, 1 all to one remote node, 2 at most two nodes per token
};

uint64_t next(uint64_t* x) {
  *x = *x * 6364136223846793005ull + 1442695040888963407ull;
  return *x >> 17;
}

// Each rank's routing (rank 1 has no tokens), rows and scales.
struct Inputs {
  std::vector<moe_ref::Routing> rt;
  std::vector<std::vector<uint8_t>> xs;
  std::vector<std::vector<float>> scales;
};

Inputs makeInputs(const Case& c, int G, uint64_t seed) {
  Inputs in;
  const int L = c.E / c.R, rowBytes = c.hidden * (c.fp8 ? 1 : 2);
  uint64_t x = seed;
  for (int s = 0; s < c.R; s++) {
    const int T = s == 1 ? 0 : 5 + (int)(next(&x) % 40);
    std::vector<std::vector<int64_t>> idx;
    std::vector<std::vector<float>> w;
    for (int t = 0; t < T; t++) {
      std::vector<int64_t> row;
      const int n0 = (int)(next(&x) % (c.R / G)), n1 = (int)(next(&x) % (c.R / G));
      // Distinct experts from the case's pool; a pool smaller than K leaves -1s.
      for (int draw = 0; draw < 64 * c.K && (int)row.size() < c.K; draw++) {
        int64_t e = (int64_t)(next(&x) % c.E);
        if (c.route == 1) e = (int64_t)((c.R / G - 1) * G * L + next(&x) % (G * L));  // the last node
        if (c.route == 2) e = (int64_t)(((row.size() % 2 ? n1 : n0) * G) * L + next(&x) % (G * L));
        bool dup = false;
        for (int64_t f : row) dup |= f == e;
        if (!dup) row.push_back(e);
      }
      while ((int)row.size() < c.K) row.push_back(-1);
      if (c.route == 0 && next(&x) % 4 == 0) row[next(&x) % c.K] = -1;
      idx.push_back(row);
      std::vector<float> wr;
      for (int k = 0; k < c.K; k++) wr.push_back((float)(next(&x) % 1000) / 997.0f);
      w.push_back(wr);
    }
    in.rt.push_back(moe_ref::makeRouting(c.K, idx, w));
    std::vector<uint8_t> rows((size_t)T * rowBytes);
    for (uint8_t& b : rows) b = (uint8_t)next(&x);
    in.xs.push_back(rows);
    std::vector<float> sc;
    if (c.fp8)
      for (int i = 0; i < T * c.hidden / 128; i++) sc.push_back((float)(next(&x) % 100) / 7.0f);
    in.scales.push_back(sc);
  }
  return in;
}

void checkCase(const Case& c, int G, uint64_t seed) {
  const auto [rt, xs, scales] = makeInputs(c, G, seed);
  const int rowBytes = c.hidden * (c.fp8 ? 1 : 2);
  const moe_net::HtSimDispatch sim = moe_net::htSimulateDispatch(G, rt, xs, scales, rowBytes, c.hidden, c.E);
  moe_net::HtNetShape shape;
  shape.nRanks = c.R;
  shape.gpusPerNode = G;
  shape.numExperts = c.E;
  shape.hidden = c.hidden;
  shape.topK = c.K;
  shape.fp8 = c.fp8;
  for (int d = 0; d < c.R; d++) {
    SCOPED_TRACE(testing::Message() << c.R / G << " x " << G << ", route " << c.route << ", rank " << d);
    const moe_ref::Received want = moe_ref::dispatch(d, rt, xs, scales, rowBytes, c.hidden, c.E);
    const moe_ref::Received& got = sim.recv[d];
    EXPECT_EQ(sim.unfilled[d], 0);
    EXPECT_EQ(sim.misplaced[d], 0);
    ASSERT_EQ(got.numRows, want.numRows);
    EXPECT_EQ(got.srcRank, want.srcRank);
    EXPECT_EQ(got.srcToken, want.srcToken);
    EXPECT_EQ(got.x, want.x);
    EXPECT_EQ(got.scales, want.scales);
    EXPECT_EQ(got.topkIdx, want.topkIdx);
    EXPECT_EQ(got.topkWeights, want.topkWeights);
    EXPECT_EQ(got.expertCounts, want.expertCounts);
    const moe_net::HtNetTraffic t = moe_net::htNetTraffic(shape, rt, d);
    EXPECT_EQ(sim.recordsOut[d], t.recordsOut);
    EXPECT_EQ(sim.recordsIn[d], t.recordsIn);
    if (G == c.R) {
      EXPECT_EQ(sim.recordsOut[d] + sim.recordsIn[d], 0);  // one node: no records
    }
  }
}

TEST(HtNetProtocol, OutputsEqualOneDomainOnEveryNodeCount) {
  const Case cases[] = {{4, 16, 4, 256, false, 0}, {4, 16, 4, 256, true, 0}, {8, 32, 6, 128, false, 0},
                        {8, 32, 8, 256, true, 1}, {8, 32, 4, 128, false, 2}, {8, 64, 8, 128, true, 2}};
  uint64_t seed = 1;
  for (const Case& c : cases)
    for (int G = c.R; G >= 1; G /= 2) checkCase(c, G, seed++);
}

TEST(HtNetProtocol, AllToOneRemoteNodeLandsEverythingOnTheRailPeers) {
  const Case c{8, 32, 4, 128, false, 1};  // 4 nodes x 2: every token's experts on node 3
  const auto [rt, xs, scales] = makeInputs(c, 2, 99);
  const moe_net::HtSimDispatch sim = moe_net::htSimulateDispatch(2, rt, xs, scales, 256, 128, 32);
  for (int s = 0; s < 6; s++) EXPECT_EQ(sim.recordsOut[s], rt[s].numTokens) << "rank " << s;  // once each
  EXPECT_EQ(sim.recordsIn[6] + sim.recordsIn[7], rt[0].numTokens + rt[1].numTokens + rt[2].numTokens +
                                                     rt[3].numTokens + rt[4].numTokens + rt[5].numTokens);
  for (int f = 0; f < 6; f++) EXPECT_EQ(sim.recordsIn[f], 0) << "rank " << f;  // nodes 0-2 receive nothing
}

// Expert outputs: each rank's BF16 rows [rows][H] in its dispatch order, values in [-1, 1].
std::vector<std::vector<uint16_t>> expertOutputs(const Case& c, const std::vector<moe_ref::Routing>& rt,
                                                 const std::vector<std::vector<uint8_t>>& xs,
                                                 const std::vector<std::vector<float>>& scales, uint64_t seed) {
  std::vector<std::vector<uint16_t>> y;
  uint64_t x = seed;
  for (int d = 0; d < c.R; d++) {
    const moe_ref::Received r = moe_ref::dispatch(d, rt, xs, scales, c.hidden * (c.fp8 ? 1 : 2), c.hidden, c.E);
    std::vector<uint16_t> rows((size_t)r.numRows * c.hidden);
    for (uint16_t& v : rows) v = moe_ref::floatToBf16((float)((int)(next(&x) % 2001) - 1000) / 1000.0f);
    y.push_back(rows);
  }
  return y;
}

// The combine contract: bit for bit moe_ref::combine on one node and wherever a token's ranks are
// all on one node; elsewhere within one BF16 rounding per remote node of it.
TEST(HtNetProtocol, CombineRoundsOncePerRemoteNode) {
  const Case cases[] = {{8, 32, 8, 128, false, 0}, {8, 32, 4, 128, false, 1}, {8, 32, 4, 128, false, 2}};
  uint64_t seed = 500;
  for (const Case& c : cases)
    for (int G = c.R; G >= 1; G /= 2)
      for (bool weighted : {false, true}) {
        SCOPED_TRACE(testing::Message() << c.R / G << " x " << G << ", route " << c.route << ", weighted " << weighted);
        const auto [rt, xs, scales] = makeInputs(c, G, seed++);
        const std::vector<std::vector<uint16_t>> y = expertOutputs(c, rt, xs, scales, seed++);
        const std::vector<std::vector<uint16_t>> got = moe_net::htSimulateCombine(G, rt, y, c.hidden, c.E, weighted);
        for (int s = 0; s < c.R; s++) {
          const std::vector<uint16_t> want = moe_ref::combine(s, rt, y, c.hidden, c.E, weighted);
          ASSERT_EQ(got[s].size(), want.size());
          for (int t = 0; t < rt[s].numTokens; t++) {
            // Nodes token t went to: one node (or the own node only) means no regrouping.
            std::vector<char> nodes(c.R / G, 0);
            for (int k = 0; k < c.K; k++) {
              const int64_t e = rt[s].topkIdx[(size_t)t * c.K + k];
              if (e >= 0) nodes[(e / (c.E / c.R)) / G] = 1;
            }
            int count = 0;
            for (char n : nodes) count += n;
            for (int h = 0; h < c.hidden; h++) {
              const size_t i = (size_t)t * c.hidden + h;
              const float a = moe_ref::bf16ToFloat(got[s][i]), b = moe_ref::bf16ToFloat(want[i]);
              if (count <= 1) {
                ASSERT_EQ(got[s][i], want[i]) << "rank " << s << " token " << t << " channel " << h;
              } else {
                // Each partial's BF16 rounding (2^-9 relative) and the final one; |w * y| <= K.
                ASSERT_LE(std::fabs(a - b), (count + 1) * (float)c.K / 256.0f) << "rank " << s << " token " << t;
              }
            }
          }
        }
      }
}

// Combine-time weights other than the dispatch's: the simulation uses them wherever the routing's
// weights were used (one node: moe_ref::combine on the routing with those weights, bit for bit),
// and an unweighted combine ignores them.
TEST(HtNetProtocol, CombineWeightsReplaceTheRoutings) {
  const Case c{8, 32, 4, 128, false, 0};
  uint64_t seed = 900;
  for (int G = c.R; G >= 1; G /= 2) {
    SCOPED_TRACE(testing::Message() << c.R / G << " x " << G);
    const auto [rt, xs, scales] = makeInputs(c, G, seed++);
    const std::vector<std::vector<uint16_t>> y = expertOutputs(c, rt, xs, scales, seed++);
    std::vector<std::vector<float>> cw(c.R);
    std::vector<moe_ref::Routing> rtCw = rt;
    uint64_t x = seed++;
    for (int s = 0; s < c.R; s++) {
      for (int i = 0; i < rt[s].numTokens * c.K; i++) cw[s].push_back((float)(1 + next(&x) % 16) / 16.0f);
      rtCw[s].topkWeights = cw[s];
    }
    const auto got = moe_net::htSimulateCombine(G, rt, y, c.hidden, c.E, true, cw);
    EXPECT_EQ(got, moe_net::htSimulateCombine(G, rtCw, y, c.hidden, c.E, true));
    EXPECT_NE(got, moe_net::htSimulateCombine(G, rt, y, c.hidden, c.E, true));
    EXPECT_EQ(moe_net::htSimulateCombine(G, rt, y, c.hidden, c.E, false, cw),
              moe_net::htSimulateCombine(G, rt, y, c.hidden, c.E, false));
    if (G == c.R) {
      for (int s = 0; s < c.R; s++) EXPECT_EQ(got[s], moe_ref::combine(s, rtCw, y, c.hidden, c.E, true)) << "rank " << s;
    }
  }
}

// The per-row top-k values across nodes: with values whose sums are exact (small integers) the
// grouping by node cannot show, so every node count gives moe_ref::combineTopkValues; a hand case
// where it shows (ranks 0 | 2, 3 on 2 nodes of 2) sums node 1's two values first.
TEST(HtNetProtocol, TopkValuesGroupedByNode) {
  const Case c{8, 32, 4, 128, false, 0};
  uint64_t seed = 1200;
  for (int G = c.R; G >= 1; G /= 2) {
    SCOPED_TRACE(testing::Message() << c.R / G << " x " << G);
    const auto [rt, xs, scales] = makeInputs(c, G, seed++);
    std::vector<std::vector<float>> values(c.R);
    uint64_t x = seed++;
    for (int r = 0; r < c.R; r++) {
      const moe_ref::Received got = moe_ref::dispatch(r, rt, xs, scales, c.hidden * 2, c.hidden, c.E);
      for (int i = 0; i < got.numRows * c.K; i++) values[r].push_back((float)(int)(next(&x) % 64) - 32.0f);
    }
    const auto got = moe_net::htSimulateCombineTopkValues(G, rt, values, c.E);
    for (int s = 0; s < c.R; s++) EXPECT_EQ(got[s], moe_ref::combineTopkValues(s, rt, values, c.E)) << "rank " << s;
  }
  // 4 ranks, 2 nodes of 2, 2 experts each; rank 0's token 0 goes to ranks 0, 2 and 3.
  std::vector<moe_ref::Routing> rt = {moe_ref::makeRouting(3, {{0, 4, 6}}), moe_ref::makeRouting(3, {}),
                                      moe_ref::makeRouting(3, {}), moe_ref::makeRouting(3, {})};
  const std::vector<std::vector<float>> values = {{1.0f, 0, 0}, {}, {1e8f, 0, 0}, {-1e8f, 0, 0}};
  EXPECT_EQ(moe_ref::combineTopkValues(0, rt, values, 8)[0], 0.0f);                 // (1 + 1e8) - 1e8
  EXPECT_EQ(moe_net::htSimulateCombineTopkValues(2, rt, values, 8)[0][0], 1.0f);    // 1 + (1e8 - 1e8)
  EXPECT_EQ(moe_net::htSimulateCombineTopkValues(4, rt, values, 8)[0][0], 0.0f);    // one node: flat
}

}  // namespace
