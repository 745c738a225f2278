// Window regions of the internode high-throughput path (INTERNODE.md §3, the dense-slot mirror),
// in the same symmetric window as the intranode regions (the kernels put from window to window).
// Host arithmetic only: the kernels that fill and read these regions are the HT internode
// dispatch and combine (issue 13), which size their work from the same layout.
//
// A token of source rank s crosses the network at most once per remote node B: as one record
// into the rank with s's local index on B (s's rail peer there), which forwards it over NVLink
// into its final row on every rank of B that owns one of its experts. A record, every field
// 16-byte aligned where it starts:
//   header  int32 srcToken, int32 reserved,
//           int32 pos[G]      for each rank j of node B (local index), the token's index among
//                             s's rows for j in token order, -1 when j owns none of its experts
//                             (the forwarder adds j's base for s, learned from the counts rows),
//           int32 expert[K]   the token's top-k as global expert ids (-1 = none),
//           float weight[K]   their weights;
//   data    the row, hidden x the dispatch dtype;
//   scales  FP8 only: hidden / 128 FP32 scales.
// Slots are dense per remote node: slot_B(t) is t's index in the list of s's tokens that need
// node B, and a record has the same slot in the sender's stage and in the receiver's landing rows.
#pragma once
#include <stddef.h>
#include "config.h"
#include "net/node_map.h"

namespace nccl_moe {

struct HtRecordLayout {
  size_t pos;      // offset of pos[G] (int32)
  size_t expert;   // offset of expert[K] (int32)
  size_t weight;   // offset of weight[K] (float)
  size_t data;     // offset of the row; the header's bytes
  size_t scales;   // offset of the FP8 scales (== bytes of header + row for BF16)
  size_t bytes;    // record size, a multiple of 16
};

struct HtNetRegions {
  HtRecordLayout record;
  size_t countsBytes;    // one counts row: int32 [G] rows for each rank of the destination node,
                         // int32 records; 16-aligned
  size_t dispatchStage;  // [N-1][M][record]: this rank's records, by remote node, dense slots
  size_t dispatchLand;   // [N-1][M][record]: records from the rail peer on each other node
  size_t countsStage;    // [N-1][countsBytes]: this rank's counts row for each remote node
  size_t countsLand;     // [N-1][countsBytes]: the rail peers' counts rows for this node
  size_t combineStage;   // [N-1][M][H] BF16: partials returned to each remote node's rail peer,
                         // at that peer's slots
  size_t combineLand;    // [N-1][M][H] BF16: partials received for this rank's records, by
                         // remote node, at this rank's slots
  size_t bytes;          // all of the above, a multiple of NCCL_WIN_REQUIRED_ALIGNMENT
};

// The record of a resolved high-throughput config on G ranks per node.
HtRecordLayout htRecordLayout(const ncclMoeConfig_t& resolved, int gpusPerNode);

// The regions relative to their start. Remote nodes are indexed 0..N-2 in node order with the
// own node skipped. Overflow-checked (CheckedBytes): on overflow ncclInvalidArgument naming the
// sizes. A single-node map has no remote node: every size 0.
ncclResult_t computeHtNetRegions(const ncclMoeConfig_t& resolved, const NodeMap& nodes, HtNetRegions* out);

}  // namespace nccl_moe
