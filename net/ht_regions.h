// Window regions of the internode high-throughput path (INTERNODE.md §3, the dense-slot mirror),
// in the same symmetric window as the intranode regions (the kernels put from window to window).
// Host arithmetic; the kernels that fill and read these regions are src/device/ht/dispatch_gin.cu
// and combine_gin.cu (HtNetArgs, device/kernel_args.h).
//
// A token of source rank s crosses the network at most once per remote node B: as one record
// into the rank with s's local index on B (s's rail peer there), which forwards it over NVLink
// into its final row on every rank of B that owns one of its experts. A record, every field
// 16-byte aligned where it starts:
//   header  int32 srcToken, int32 flags (bit 0: the source's dispatch had top-k weights),
//           int32 pos[G]      for each rank j of node B (local index), the token's index among
//                             s's rows for j in token order, -1 when j owns none of its experts
//                             (the forwarder adds j's base for s, learned from the counts rows),
//           int32 expert[K]   the token's top-k as global expert ids (-1 = none),
//           float weight[K]   their weights (0 without);
//   data    the row, hidden x the dispatch dtype;
//   scales  FP8 only: hidden / 128 FP32 scales.
// Slots are dense per remote node: slot_B(t) is t's index in the list of s's tokens that need
// node B, and a record has the same slot in the sender's stage and in the receiver's landing rows.
#pragma once
#include <stddef.h>
#include "config.h"
#include "net/node_map.h"

namespace nccl_moe {

constexpr size_t kHtHandshakeBytes = 16;

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
  size_t countsBytes;    // one counts row: int32 [R] rows to every rank (so that every rank
                         // learns the whole count matrix: bases, overflow), int32 records to the
                         // destination node, int32 [G][L] rows per expert of its ranks; 16-aligned
  size_t dispatchStage;  // [N-1][M][record]: this rank's records, by remote node, dense slots
  size_t dispatchLand;   // [N-1][M][record]: records from the rail peer on each other node
  size_t countsStage;    // [N-1][countsBytes]: this rank's counts row for each remote node
  size_t countsLand;     // [N-1][countsBytes]: the rail peers' counts rows for this node
  size_t partialRow;     // bytes of a partial row with per-row values: align16(H * 2 + K * 4)
                         // (a combine without values uses H * 2 of it)
  size_t combineStage;   // [N-1][M][partialRow]: partials returned to each remote node's rail
                         // peer, at that peer's slots
  size_t combineLand;    // [N-1][M][partialRow]: partials received for this rank's records, by
                         // remote node, at this rank's slots
  size_t weightStage;    // [N-1][M][G] FP32: a weighted combine's w(t, r) of this rank's records
                         // for each rank r of the remote node, at the records' slots
  size_t weightLand;     // [N-1][M][G] FP32: the rail peers' combine weights for their records
  size_t handshakeStage; // [R][kHtHandshakeBytes]: creation's GIN handshake (row per remote rank)
  size_t handshakeLand;  // [R][kHtHandshakeBytes]
  size_t bytes;          // all of the above, a multiple of NCCL_WIN_REQUIRED_ALIGNMENT
};

// The record of a resolved high-throughput config on G ranks per node.
HtRecordLayout htRecordLayout(const ncclMoeConfig_t& resolved, int gpusPerNode);

// The regions relative to their start. Remote nodes are indexed 0..N-2 in node order with the
// own node skipped. Overflow-checked (CheckedBytes): on overflow ncclInvalidArgument naming the
// sizes. A single-node map has no remote node: every size 0.
ncclResult_t computeHtNetRegions(const ncclMoeConfig_t& resolved, const NodeMap& nodes, HtNetRegions* out);

}  // namespace nccl_moe
