// The internode high-throughput dispatch simulation (ht_net_protocol.h).
#include "ht_net_protocol.h"

#include <assert.h>
#include <string.h>

namespace moe_net {
namespace {

// A staged / landed record (net/ht_regions.h): what the kernels pack into the window.
struct Record {
  int srcToken = -1;
  std::vector<int> pos;         // [G]: row index among the source's rows for rank j of the node
  std::vector<int64_t> expert;  // [K] global ids
  std::vector<float> weight;    // [K]
  std::vector<uint8_t> row;     // rowBytes
  std::vector<float> scales;    // hidden / 128 or empty
};

struct CountsRow {  // per (source, destination node): rows for each rank j of it, then records
  std::vector<int> rows;
  int records = 0;
};

// a * b rounded to float, never fused with the next add (as moe_ref::combine).
float product(float a, float b) {
  volatile float p = a * b;
  return p;
}

}  // namespace

std::vector<std::vector<uint16_t>> htSimulateCombine(int G, const std::vector<moe_ref::Routing>& rt,
                                                     const std::vector<std::vector<uint16_t>>& expertOut,
                                                     int H, int E, bool weighted) {
  const int R = (int)rt.size(), N = R / G, L = E / R, K = rt[0].topK;
  auto node = [&](int r) { return r / G; };
  // Rows: rank d's rows from source s start at base[d][s], in s's token order (the dispatch).
  std::vector<std::vector<int>> base(R, std::vector<int>(R + 1, 0));
  std::vector<std::vector<std::vector<int>>> row(R);  // [s][t][d]: row on d, -1 = none
  for (int s = 0; s < R; s++) {
    row[s].assign(rt[s].numTokens, std::vector<int>(R, -1));
    std::vector<int> n(R, 0);
    for (int t = 0; t < rt[s].numTokens; t++)
      for (int d = 0; d < R; d++)
        for (int k = 0; k < K; k++) {
          const int64_t e = rt[s].topkIdx[(size_t)t * K + k];
          if (e >= 0 && e < E && e / L == d) {
            row[s][t][d] = n[d]++;
            break;
          }
        }
    for (int d = 0; d < R; d++) base[d][s + 1] = base[d][s] + n[d];
  }
  auto weightOn = [&](int s, int t, int d) {
    if (!weighted) return 1.0f;
    float w = 0.0f;
    for (int k = 0; k < K; k++) {
      const int64_t e = rt[s].topkIdx[(size_t)t * K + k];
      if (e >= 0 && e < E && e / L == d) w += rt[s].topkWeights[(size_t)t * K + k];
    }
    return w;
  };
  // The FP32 sum over node b's ranks in rank order of token t of source s (false: none there).
  auto nodeSum = [&](int s, int t, int b, std::vector<float>* acc) {
    bool any = false;
    std::fill(acc->begin(), acc->end(), 0.0f);
    for (int d = b * G; d < (b + 1) * G; d++) {
      if (row[s][t][d] < 0) continue;
      any = true;
      const float w = weightOn(s, t, d);
      const uint16_t* y = expertOut[d].data() + (size_t)(base[d][s] + row[s][t][d]) * H;
      for (int h = 0; h < H; h++) (*acc)[h] += product(w, moe_ref::bf16ToFloat(y[h]));
    }
    return any;
  };
  std::vector<std::vector<uint16_t>> out(R);
  std::vector<float> acc(H), part(H);
  for (int s = 0; s < R; s++) {
    out[s].assign((size_t)rt[s].numTokens * H, 0);
    for (int t = 0; t < rt[s].numTokens; t++) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int b = 0; b < N; b++) {
        if (!nodeSum(s, t, b, &part)) continue;
        for (int h = 0; h < H; h++)  // a remote node's partial comes back as BF16
          acc[h] += b == node(s) ? part[h] : moe_ref::bf16ToFloat(moe_ref::floatToBf16(part[h]));
      }
      for (int h = 0; h < H; h++) out[s][(size_t)t * H + h] = moe_ref::floatToBf16(acc[h]);
    }
  }
  return out;
}

HtSimDispatch htSimulateDispatch(int G, const std::vector<moe_ref::Routing>& rt,
                                 const std::vector<std::vector<uint8_t>>& xs,
                                 const std::vector<std::vector<float>>& scales, int rowBytes,
                                 int hidden, int E) {
  const int R = (int)rt.size(), N = R / G, L = E / R, K = rt[0].topK, groups = hidden / 128;
  assert(R % G == 0 && E % R == 0);
  bool withScales = false, withWeights = false;
  for (const std::vector<float>& sc : scales) withScales |= !sc.empty();
  for (const moe_ref::Routing& r : rt) withWeights |= !r.topkWeights.empty();
  auto node = [&](int r) { return r / G; };
  auto idx = [&](const moe_ref::Routing& r, int t, int k) { return r.topkIdx[(size_t)t * K + k]; };

  // 1. Layout on each source s: sendPos[s][t][d] (index among s's tokens for d, -1: none),
  //    cnt[s][d], and per remote node B the dense list (slot -> token).
  std::vector<std::vector<std::vector<int>>> sendPos(R);
  std::vector<std::vector<int>> cnt(R, std::vector<int>(R, 0));
  std::vector<std::vector<std::vector<int>>> list(R, std::vector<std::vector<int>>(N));
  for (int s = 0; s < R; s++) {
    sendPos[s].assign(rt[s].numTokens, std::vector<int>(R, -1));
    for (int t = 0; t < rt[s].numTokens; t++) {
      std::vector<char> to(R, 0);
      for (int k = 0; k < K; k++) {
        const int64_t e = idx(rt[s], t, k);
        if (e >= 0 && e < E) to[e / L] = 1;
      }
      std::vector<char> toNode(N, 0);
      for (int d = 0; d < R; d++)
        if (to[d]) {
          sendPos[s][t][d] = cnt[s][d]++;
          toNode[node(d)] = 1;
        }
      for (int b = 0; b < N; b++)
        if (b != node(s) && toNode[b]) list[s][b].push_back(t);
    }
  }

  // 2. Stage, put, land: record of s's slot i for node B lands on s's rail peer f = B*G + s%G,
  //    in its region for s's node, at slot i; the counts row beside it.
  HtSimDispatch out;
  out.recordsOut.assign(R, 0);
  out.recordsIn.assign(R, 0);
  out.forwarded.assign(R, 0);
  out.unfilled.assign(R, 0);
  out.misplaced.assign(R, 0);
  std::vector<std::vector<std::vector<Record>>> land(R, std::vector<std::vector<Record>>(N));
  std::vector<std::vector<CountsRow>> countsLand(R, std::vector<CountsRow>(N));
  for (int s = 0; s < R; s++)
    for (int b = 0; b < N; b++) {
      if (b == node(s)) continue;
      const int f = b * G + s % G;
      CountsRow& c = countsLand[f][node(s)];
      c.rows.assign(G, 0);
      for (int j = 0; j < G; j++) c.rows[j] = cnt[s][b * G + j];
      c.records = (int)list[s][b].size();
      std::vector<Record>& dst = land[f][node(s)];
      dst.assign(list[s][b].size(), Record());
      for (size_t slot = 0; slot < list[s][b].size(); slot++) {
        const int t = list[s][b][slot];
        Record& rec = dst[slot];  // the same slot as in s's stage
        rec.srcToken = t;
        rec.pos.assign(G, -1);
        for (int j = 0; j < G; j++) rec.pos[j] = sendPos[s][t][b * G + j];
        for (int k = 0; k < K; k++) {
          rec.expert.push_back(idx(rt[s], t, k));
          rec.weight.push_back(withWeights ? rt[s].topkWeights[(size_t)t * K + k] : 0.0f);
        }
        rec.row.assign(xs[s].begin() + (size_t)t * rowBytes, xs[s].begin() + (size_t)(t + 1) * rowBytes);
        if (withScales) rec.scales.assign(scales[s].begin() + (size_t)t * groups, scales[s].begin() + (size_t)(t + 1) * groups);
      }
      out.recordsOut[s] += c.records;
      out.recordsIn[f] += c.records;
    }

  // 3. Bases: rank d's rows from source s start at base[d][s] = sum of the counts for d of the
  //    sources before s. d reads own-node sources' counts from their layouts (LSA) and remote
  //    sources' from the counts rows held by the rail peer of each in d's node.
  std::vector<std::vector<int>> base(R, std::vector<int>(R + 1, 0));
  for (int d = 0; d < R; d++)
    for (int s = 0; s < R; s++) {
      const int c = node(s) == node(d) ? cnt[s][d] : countsLand[node(d) * G + s % G][node(s)].rows[d % G];
      base[d][s + 1] = base[d][s] + c;
    }

  // 4. Placement into each rank's outputs (rows poisoned first: srcRank -1 = unwritten).
  out.recv.assign(R, moe_ref::Received());
  for (int d = 0; d < R; d++) {
    moe_ref::Received& o = out.recv[d];
    o.numRows = base[d][R];
    o.x.assign((size_t)o.numRows * rowBytes, 0);
    if (withScales) o.scales.assign((size_t)o.numRows * groups, 0.0f);
    o.topkIdx.assign((size_t)o.numRows * K, -2);
    if (withWeights) o.topkWeights.assign((size_t)o.numRows * K, -1.0f);
    o.srcRank.assign(o.numRows, -1);
    o.srcToken.assign(o.numRows, -1);
    o.expertCounts.assign(L, 0);
  }
  auto place = [&](int d, int s, int row, int t, const uint8_t* x, const float* sc, const int64_t* ex,
                   const float* w) {
    moe_ref::Received& o = out.recv[d];
    if (row < 0 || row >= o.numRows || o.srcRank[row] != -1) {  // outside the rows, or twice
      out.misplaced[d]++;
      return;
    }
    memcpy(o.x.data() + (size_t)row * rowBytes, x, rowBytes);
    if (withScales) memcpy(o.scales.data() + (size_t)row * groups, sc, sizeof(float) * groups);
    for (int k = 0; k < K; k++) {
      const bool local = ex[k] >= 0 && ex[k] < E && ex[k] / L == d;
      o.topkIdx[(size_t)row * K + k] = local ? ex[k] - (int64_t)d * L : -1;
      if (withWeights) o.topkWeights[(size_t)row * K + k] = local ? w[k] : 0.0f;
      if (local) o.expertCounts[ex[k] - (int64_t)d * L]++;
    }
    o.srcRank[row] = s;
    o.srcToken[row] = t;
  };
  for (int s = 0; s < R; s++)  // own node: direct, as intranode
    for (int t = 0; t < rt[s].numTokens; t++)
      for (int d = node(s) * G; d < (node(s) + 1) * G; d++) {
        const int p = sendPos[s][t][d];
        if (p < 0) continue;
        place(d, s, base[d][s] + p, t, xs[s].data() + (size_t)t * rowBytes,
              withScales ? scales[s].data() + (size_t)t * groups : nullptr, rt[s].topkIdx.data() + (size_t)t * K,
              withWeights ? rt[s].topkWeights.data() + (size_t)t * K : nullptr);
      }
  for (int f = 0; f < R; f++)  // forwarders: landed records to every rank of f's node they name
    for (int a = 0; a < N; a++) {
      if (a == node(f)) continue;
      const int s = a * G + f % G;
      for (const Record& rec : land[f][a])
        for (int j = 0; j < G; j++) {
          if (rec.pos[j] < 0) continue;
          const int d = node(f) * G + j;
          place(d, s, base[d][s] + rec.pos[j], rec.srcToken, rec.row.data(), withScales ? rec.scales.data() : nullptr,
                rec.expert.data(), rec.weight.data());
          if (d != f) out.forwarded[f]++;
        }
    }
  for (int d = 0; d < R; d++)
    for (int row = 0; row < out.recv[d].numRows; row++) out.unfilled[d] += out.recv[d].srcRank[row] == -1;
  return out;
}

}  // namespace moe_net
