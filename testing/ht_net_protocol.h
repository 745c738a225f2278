// A host simulation of the internode high-throughput dispatch and combine (INTERNODE.md §3, the
// dense-slot mirror; the record and regions of net/ht_regions.h), step by step as the kernels
// will run it: layout (per-rank positions, per-node dense lists), records staged at dense slots
// and landed at the same slot on the rail peer, counts rows beside them, bases learned from the
// own node's layouts and from the counts rows the node's rail peers hold, then placement
// (own-node tokens direct, landed records forwarded to every rank of the node they name). Its
// outputs must equal moe_ref::dispatch on every rank for any node count, which checks the
// protocol's arithmetic (slots, positions, bases) on the CPU before a kernel exists, and it is the
// oracle the GPU tests of the internode kernels will use for the per-stage contents. CPU only.
#pragma once
#include <stdint.h>
#include <vector>
#include "reference.h"

namespace moe_net {

struct HtSimDispatch {
  std::vector<moe_ref::Received> recv;  // [R]: each rank's outputs, as moe_ref::dispatch
  std::vector<long long> recordsOut;    // [R]: records staged (one per token and remote node)
  std::vector<long long> recordsIn;     // [R]: records landed here (from rail peers)
  std::vector<long long> forwarded;     // [R]: rows this rank stored into other ranks of its node
                                        //      from landed records
  std::vector<int> unfilled;            // [R]: output rows no step wrote (must be 0)
  std::vector<int> misplaced;           // [R]: stores outside the rows or onto a written row
                                        //      (must be 0; such a store is dropped)
};

// routing[s], xs[s] ([T][rowBytes]), scales[s] ([T][hidden/128] or empty) as moe_ref::dispatch;
// the R ranks form R / gpusPerNode nodes of consecutive ranks.
HtSimDispatch htSimulateDispatch(int gpusPerNode, const std::vector<moe_ref::Routing>& routing,
                                 const std::vector<std::vector<uint8_t>>& xs,
                                 const std::vector<std::vector<float>>& scales, int rowBytes,
                                 int hidden, int numExperts);

// The combine mirror and its rounding contract, through the dispatch's landed records and slots.
// expertOut[r]: rank r's BF16 rows [rows][H] in its dispatch order (moe_ref::dispatch's). For
// source s and token t: on each remote node B that t went to, s's rail peer there, from the record
// landed at t's slot (its pos[] and top-k weights), sums the rows of B's ranks in rank order, each
// w(t, r) * y in FP32 (w as moe_ref::combine: the sum of t's weights on r, or 1), rounds the sum
// to BF16 once and puts it back at the same slot of s's landing region for B; s then accumulates
// over nodes in node order, in FP32, its own node's rank-ordered FP32 sum (not rounded) or the
// remote node's BF16 partial, and rounds once.
// On one node this is moe_ref::combine bit for bit; across nodes it adds one BF16 rounding per
// remote node and regroups the FP32 sum by node. Returns [R][T][H] BF16.
// combineWeights ([R][T * K], optional): the topkWeights each source passes to the combine, when
// they are not the dispatch routing's. The library sums them per rank of B on the source (k
// order, FP32) and sends those G weights to the rail peer with the record's slot; the arithmetic
// is the same as taking w from these weights instead of the routing's. Empty = the routing's.
std::vector<std::vector<uint16_t>> htSimulateCombine(int gpusPerNode,
                                                     const std::vector<moe_ref::Routing>& routing,
                                                     const std::vector<std::vector<uint16_t>>& expertOut,
                                                     int hidden, int numExperts, bool weighted,
                                                     const std::vector<std::vector<float>>& combineWeights = {});

// The per-row top-k values of ncclMoeCombineWithWeights across nodes, through the same plan:
// recvValues[r] is rank r's [rows][K] FP32 values (rows in its dispatch order). For source s and
// token t: each remote node B that t went to sums, in FP32 from +0.0f, its ranks' values of t's
// rows in rank order (s's rail peer there does, and returns the K sums with t's partial); s sums in
// FP32 from +0.0f, in node order, its own node's rank-ordered sum (when t has rows there) and those
// of the remote nodes. On one node this is moe_ref::combineTopkValues bit for bit; across nodes the
// FP32 sum is grouped by node. Returns [R][T * K].
std::vector<std::vector<float>> htSimulateCombineTopkValues(int gpusPerNode,
                                                            const std::vector<moe_ref::Routing>& routing,
                                                            const std::vector<std::vector<float>>& recvValues,
                                                            int numExperts);

}  // namespace moe_net
