// The internode high-throughput protocol simulation (ht_net_protocol.h).
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
  std::vector<uint8_t> row;     // rowBytes (dispatch only)
  std::vector<float> scales;    // hidden / 128 or empty (dispatch only)
};

struct CountsRow {  // per (source, destination node): rows for each rank j of it, then records
  std::vector<int> rows;
  int records = 0;
};

// What the dispatch leaves behind, which the combine reuses: every source's layout, its dense
// per-node lists, the records landed on the rail peers (at the sender's slots), the counts rows
// beside them and every rank's bases.
struct Plan {
  int R, G, N, L, K;
  bool withScales, withWeights;  // some rank has FP8 scales / top-k weights
  std::vector<std::vector<std::vector<int>>> sendPos;  // [s][t][d]: index among s's rows for d, -1
  std::vector<std::vector<int>> cnt;                   // [s][d]
  std::vector<std::vector<std::vector<int>>> list;     // [s][B]: slot -> token, remote nodes B
  std::vector<std::vector<std::vector<Record>>> land;  // [f][A]: records from A's rail peer of f
  std::vector<std::vector<CountsRow>> countsLand;      // [f][A]
  std::vector<std::vector<int>> base;                  // [d][s..R]: first row on d of source s
  int node(int r) const { return r / G; }
};

// Steps 1-3 of the dispatch (see the header): layout, stage / put / land, bases. Rows and scales
// are copied into the records when xs is not empty.
Plan makePlan(int G, const std::vector<moe_ref::Routing>& rt, const std::vector<std::vector<uint8_t>>& xs,
              const std::vector<std::vector<float>>& scales, int rowBytes, int groups, int E) {
  Plan p;
  p.R = (int)rt.size();
  p.G = G;
  p.N = p.R / G;
  p.L = E / p.R;
  p.K = rt[0].topK;
  const int R = p.R, N = p.N, L = p.L, K = p.K;
  assert(R % G == 0 && E % R == 0);
  p.withScales = p.withWeights = false;
  for (const std::vector<float>& sc : scales) p.withScales |= !sc.empty();
  for (const moe_ref::Routing& r : rt) p.withWeights |= !r.topkWeights.empty();
  const bool withScales = p.withScales, withWeights = p.withWeights;
  auto idx = [&](const moe_ref::Routing& r, int t, int k) { return r.topkIdx[(size_t)t * K + k]; };

  // 1. Layout on each source s.
  p.sendPos.resize(R);
  p.cnt.assign(R, std::vector<int>(R, 0));
  p.list.assign(R, std::vector<std::vector<int>>(N));
  for (int s = 0; s < R; s++) {
    p.sendPos[s].assign(rt[s].numTokens, std::vector<int>(R, -1));
    for (int t = 0; t < rt[s].numTokens; t++) {
      std::vector<char> to(R, 0), toNode(N, 0);
      for (int k = 0; k < K; k++) {
        const int64_t e = idx(rt[s], t, k);
        if (e >= 0 && e < E) to[e / L] = 1;
      }
      for (int d = 0; d < R; d++)
        if (to[d]) {
          p.sendPos[s][t][d] = p.cnt[s][d]++;
          toNode[p.node(d)] = 1;
        }
      for (int b = 0; b < N; b++)
        if (b != p.node(s) && toNode[b]) p.list[s][b].push_back(t);
    }
  }
  // 2. Stage, put, land: the record of s's slot i for node B lands on s's rail peer f = B*G + s%G,
  //    in its region for s's node, at slot i; the counts row beside it.
  p.land.assign(R, std::vector<std::vector<Record>>(N));
  p.countsLand.assign(R, std::vector<CountsRow>(N));
  for (int s = 0; s < R; s++)
    for (int b = 0; b < N; b++) {
      if (b == p.node(s)) continue;
      const int f = b * G + s % G;
      CountsRow& c = p.countsLand[f][p.node(s)];
      c.rows.assign(G, 0);
      for (int j = 0; j < G; j++) c.rows[j] = p.cnt[s][b * G + j];
      c.records = (int)p.list[s][b].size();
      std::vector<Record>& dst = p.land[f][p.node(s)];
      dst.assign(p.list[s][b].size(), Record());
      for (size_t slot = 0; slot < p.list[s][b].size(); slot++) {
        const int t = p.list[s][b][slot];
        Record& rec = dst[slot];  // the same slot as in s's stage
        rec.srcToken = t;
        rec.pos.assign(G, -1);
        for (int j = 0; j < G; j++) rec.pos[j] = p.sendPos[s][t][b * G + j];
        for (int k = 0; k < K; k++) {
          rec.expert.push_back(idx(rt[s], t, k));
          rec.weight.push_back(withWeights ? rt[s].topkWeights[(size_t)t * K + k] : 0.0f);
        }
        if (!xs.empty())
          rec.row.assign(xs[s].begin() + (size_t)t * rowBytes, xs[s].begin() + (size_t)(t + 1) * rowBytes);
        if (!xs.empty() && withScales)
          rec.scales.assign(scales[s].begin() + (size_t)t * groups, scales[s].begin() + (size_t)(t + 1) * groups);
      }
    }
  // 3. Bases: d reads own-node sources' counts from their layouts (LSA) and remote sources'
  //    from the counts rows held by the rail peer of each in d's node.
  p.base.assign(R, std::vector<int>(R + 1, 0));
  for (int d = 0; d < R; d++)
    for (int s = 0; s < R; s++) {
      const int c = p.node(s) == p.node(d) ? p.cnt[s][d] : p.countsLand[p.node(d) * G + s % G][p.node(s)].rows[d % G];
      p.base[d][s + 1] = p.base[d][s] + c;
    }
  return p;
}

// a * b rounded to float, never fused with the next add (as moe_ref::combine).
float product(float a, float b) {
  volatile float p = a * b;
  return p;
}

}  // namespace

HtSimDispatch htSimulateDispatch(int G, const std::vector<moe_ref::Routing>& rt,
                                 const std::vector<std::vector<uint8_t>>& xs,
                                 const std::vector<std::vector<float>>& scales, int rowBytes,
                                 int hidden, int E) {
  const int groups = hidden / 128;
  const Plan p = makePlan(G, rt, xs, scales, rowBytes, groups, E);
  const int R = p.R, N = p.N, L = p.L, K = p.K;
  const bool withScales = p.withScales, withWeights = p.withWeights;

  HtSimDispatch out;
  out.recordsOut.assign(R, 0);
  out.recordsIn.assign(R, 0);
  out.forwarded.assign(R, 0);
  out.unfilled.assign(R, 0);
  out.misplaced.assign(R, 0);
  for (int s = 0; s < R; s++)
    for (int b = 0; b < N; b++)
      if (b != p.node(s)) {
        out.recordsOut[s] += (long long)p.list[s][b].size();
        out.recordsIn[b * G + s % G] += (long long)p.list[s][b].size();
      }

  // 4. Placement into each rank's outputs (rows poisoned first: srcRank -1 = unwritten).
  out.recv.assign(R, moe_ref::Received());
  for (int d = 0; d < R; d++) {
    moe_ref::Received& o = out.recv[d];
    o.numRows = p.base[d][R];
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
      for (int d = p.node(s) * G; d < (p.node(s) + 1) * G; d++) {
        const int pos = p.sendPos[s][t][d];
        if (pos < 0) continue;
        place(d, s, p.base[d][s] + pos, t, xs[s].data() + (size_t)t * rowBytes,
              withScales ? scales[s].data() + (size_t)t * groups : nullptr, rt[s].topkIdx.data() + (size_t)t * K,
              withWeights ? rt[s].topkWeights.data() + (size_t)t * K : nullptr);
      }
  for (int f = 0; f < R; f++)  // forwarders: landed records to every rank of f's node they name
    for (int a = 0; a < N; a++) {
      if (a == p.node(f)) continue;
      const int s = a * G + f % G;
      for (const Record& rec : p.land[f][a])
        for (int j = 0; j < G; j++) {
          if (rec.pos[j] < 0) continue;
          const int d = p.node(f) * G + j;
          place(d, s, p.base[d][s] + rec.pos[j], rec.srcToken, rec.row.data(),
                withScales ? rec.scales.data() : nullptr, rec.expert.data(), rec.weight.data());
          if (d != f) out.forwarded[f]++;
        }
    }
  for (int d = 0; d < R; d++)
    for (int row = 0; row < out.recv[d].numRows; row++) out.unfilled[d] += out.recv[d].srcRank[row] == -1;
  return out;
}

std::vector<std::vector<uint16_t>> htSimulateCombine(int G, const std::vector<moe_ref::Routing>& routing,
                                                     const std::vector<std::vector<uint16_t>>& expertOut,
                                                     int H, int E, bool weighted,
                                                     const std::vector<std::vector<float>>& combineWeights) {
  // Combine-time weights: the plan's records and the own-node sums read them in place of the
  // routing's (the rail peer's per-rank weight is the same k-ordered FP32 sum either way).
  std::vector<moe_ref::Routing> replaced;
  if (!combineWeights.empty()) {
    assert(combineWeights.size() == routing.size());
    replaced = routing;
    for (size_t s = 0; s < routing.size(); s++) {
      assert(combineWeights[s].size() == (size_t)routing[s].numTokens * routing[s].topK);
      replaced[s].topkWeights = combineWeights[s];
    }
  }
  const std::vector<moe_ref::Routing>& rt = combineWeights.empty() ? routing : replaced;
  const Plan p = makePlan(G, rt, {}, {}, 0, 0, E);
  const int R = p.R, N = p.N, L = p.L, K = p.K;
  // Rank d's FP32 sum w * y, in rank order over the ranks of node b, of the rows a record (or a
  // token's own-node layout) names: pos[j] = index among s's rows for rank b*G + j.
  auto sumNode = [&](int s, int b, const int* pos, const int64_t* ex, const float* w, std::vector<float>* acc) {
    bool any = false;
    std::fill(acc->begin(), acc->end(), 0.0f);
    for (int j = 0; j < G; j++) {
      if (pos[j] < 0) continue;
      any = true;
      const int d = b * G + j;
      float wt = 1.0f;
      if (weighted) {
        wt = 0.0f;
        for (int k = 0; k < K; k++)
          if (ex[k] >= 0 && ex[k] < E && ex[k] / L == d) wt += w[k];
      }
      const uint16_t* y = expertOut[d].data() + (size_t)(p.base[d][s] + pos[j]) * H;
      for (int h = 0; h < H; h++) (*acc)[h] += product(wt, moe_ref::bf16ToFloat(y[h]));
    }
    return any;
  };
  // Rail peers: one BF16 partial per landed record, staged at its slot and put back to the
  // source's landing region for this node at the same slot.
  std::vector<std::vector<std::vector<std::vector<uint16_t>>>> combineLand(
      R, std::vector<std::vector<std::vector<uint16_t>>>(N));  // [s][B][slot][H]
  std::vector<float> acc(H), part(H);
  for (int f = 0; f < R; f++)
    for (int a = 0; a < N; a++) {
      if (a == p.node(f)) continue;
      const int s = a * G + f % G;
      std::vector<std::vector<uint16_t>>& back = combineLand[s][p.node(f)];
      back.assign(p.land[f][a].size(), std::vector<uint16_t>(H, 0));
      for (size_t slot = 0; slot < p.land[f][a].size(); slot++) {
        const Record& rec = p.land[f][a][slot];
        sumNode(s, p.node(f), rec.pos.data(), rec.expert.data(), rec.weight.data(), &part);
        for (int h = 0; h < H; h++) back[slot][h] = moe_ref::floatToBf16(part[h]);
      }
    }
  // Sources: nodes in node order, the own node's FP32 sum, the others' partials at t's slot.
  std::vector<std::vector<uint16_t>> out(R);
  std::vector<int> pos(G);
  for (int s = 0; s < R; s++) {
    out[s].assign((size_t)rt[s].numTokens * H, 0);
    std::vector<std::vector<int>> slotOf(N, std::vector<int>(rt[s].numTokens, -1));
    for (int b = 0; b < N; b++)
      for (size_t i = 0; i < p.list[s][b].size(); i++) slotOf[b][p.list[s][b][i]] = (int)i;
    for (int t = 0; t < rt[s].numTokens; t++) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int b = 0; b < N; b++) {
        if (b == p.node(s)) {
          for (int j = 0; j < G; j++) pos[j] = p.sendPos[s][t][b * G + j];
          const float* w = rt[s].topkWeights.empty() ? nullptr : rt[s].topkWeights.data() + (size_t)t * K;
          if (!sumNode(s, b, pos.data(), rt[s].topkIdx.data() + (size_t)t * K, w, &part)) continue;
          for (int h = 0; h < H; h++) acc[h] += part[h];
        } else if (slotOf[b][t] >= 0) {
          const std::vector<uint16_t>& partial = combineLand[s][b][slotOf[b][t]];
          for (int h = 0; h < H; h++) acc[h] += moe_ref::bf16ToFloat(partial[h]);
        }
      }
      for (int h = 0; h < H; h++) out[s][(size_t)t * H + h] = moe_ref::floatToBf16(acc[h]);
    }
  }
  return out;
}

std::vector<std::vector<float>> htSimulateCombineTopkValues(int G, const std::vector<moe_ref::Routing>& rt,
                                                            const std::vector<std::vector<float>>& recvValues,
                                                            int E) {
  const Plan p = makePlan(G, rt, {}, {}, 0, 0, E);
  const int R = p.R, N = p.N, K = p.K;
  std::vector<std::vector<float>> out(R);
  for (int s = 0; s < R; s++) {
    out[s].assign((size_t)rt[s].numTokens * K, 0.0f);
    for (int t = 0; t < rt[s].numTokens; t++)
      for (int k = 0; k < K; k++) {
        float acc = 0.0f;
        for (int b = 0; b < N; b++) {
          float part = 0.0f;
          bool any = false;
          for (int j = 0; j < G; j++) {
            const int d = b * G + j, pos = p.sendPos[s][t][d];
            if (pos < 0) continue;
            any = true;
            part += recvValues[d][(size_t)(p.base[d][s] + pos) * K + k];
          }
          if (any) acc += part;
        }
        out[s][(size_t)t * K + k] = acc;
      }
  }
  return out;
}

}  // namespace moe_net
