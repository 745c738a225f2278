// Window regions of the internode low-latency path (INTERNODE.md §4), per buffer slot, in the
// same symmetric window as the intranode regions (the kernels put from window to window).
//
// A token goes to a rank on another node as one record: a 16-byte-aligned header (source token,
// then the K route entries of that destination: LlRouteEntry, row or -1 and weight), the row in
// the dispatch dtype, its FP8 scales. The sender writes records into its staging rows for the
// destination and puts them in batches into the destination's landing rows for the sender;
// rows per remote rank are indexed by remoteIndex (net/device/rail.h: own node's ranks skipped).
// After its records, the sender puts one counts row (rows per local expert of the destination,
// and the number of records) that carries the "done" part of the count signal (gin_setup.h).
// The combine returns one BF16 partial per (token, rank) the same way, in record order.
#pragma once
#include <stddef.h>
#include "config.h"
#include "net/node_map.h"

namespace nccl_moe {

struct LlRecordLayout {
  size_t header;  // bytes of the header: int32 token, int32 pad, K LlRouteEntry; 16-aligned
  size_t data;    // offset of the row (hidden * dispatch dtype bytes)
  size_t scales;  // offset of the scales (llScaleBytesPerRow bytes)
  size_t bytes;   // record size, a multiple of 16
};

struct LlNetSlotRegions {
  LlRecordLayout record;
  size_t countsBytes;    // one counts row: int32 [L] rows per local expert, int32 records; 16-aligned
  size_t dispatchStage;  // [remote ranks][M][record]: records this rank sends, per destination
  size_t dispatchLand;   // [remote ranks][M][record]: records received, per source
  size_t countsStage;    // [remote ranks][countsBytes]: this rank's counts for each destination
  size_t countsLand;     // [remote ranks][countsBytes]: each source's counts for this rank
  size_t combineStage;   // [remote ranks][M][H] BF16: partials this rank returns, per source, in
                         // the order of the source's records
  size_t combineLand;    // [remote ranks][M][H] BF16: partials received, per expert rank
  size_t sendIndex;      // int32 [M][remote ranks]: record index of token t at each destination
  size_t destCount;      // int32 [remote ranks]: records reserved per destination (zero between sends)
  size_t bytes;          // size of these regions of one slot, a multiple of 4096
};

// The record of a resolved low-latency config.
LlRecordLayout llRecordLayout(const ncclMoeConfig_t& resolved);

// The regions of one slot, relative to their start (the window holds numBufferSlots of them, one
// after the other, after the intranode slots: see ncclMoeComm::llNetOff). Overflow-checked (CheckedBytes): on overflow
// ncclInvalidArgument naming the sizes. A single-node map has no remote ranks: all sizes 0.
ncclResult_t computeLlNetRegions(const ncclMoeConfig_t& resolved, const NodeMap& nodes, LlNetSlotRegions* out);

}  // namespace nccl_moe
