// Window arithmetic of the internode high-throughput regions (see ht_regions.h).
#include "net/ht_regions.h"
#include "device/kernel_args.h"
#include "error.h"

namespace nccl_moe {

static size_t align16(size_t v) { return (v + 15) / 16 * 16; }

HtRecordLayout htRecordLayout(const ncclMoeConfig_t& c, int gpusPerNode) {
  HtRecordLayout r;
  r.pos = 2 * sizeof(int);
  r.expert = align16(r.pos + (size_t)gpusPerNode * sizeof(int));
  r.weight = align16(r.expert + (size_t)c.topK * sizeof(int));
  r.data = align16(r.weight + (size_t)c.topK * sizeof(float));
  r.scales = r.data + (size_t)c.hidden * dtypeBytes(c.dispatchDtype);
  const size_t scaleBytes =
      c.dispatchDtype == ncclMoeFp8E4m3 ? (size_t)(c.hidden / kFp8GroupSize) * sizeof(float) : 0;
  r.bytes = align16(r.scales + scaleBytes);
  return r;
}

ncclResult_t computeHtNetRegions(const ncclMoeConfig_t& c, const NodeMap& nodes, HtNetRegions* out) {
  HtNetRegions s;
  s.record = htRecordLayout(c, nodes.gpusPerNode);
  CheckedBytes m;
  const size_t remote = nodes.nNodes > 1 ? (size_t)(nodes.nNodes - 1) : 0;
  const size_t slots = m.mul(remote, (size_t)c.maxTokensPerRank);
  s.partialRow = align16((size_t)c.hidden * 2 + (size_t)c.topK * sizeof(float));
  const size_t records = m.mul(slots, s.record.bytes), partials = m.mul(slots, s.partialRow);
  const size_t weights = m.mul(m.mul(slots, (size_t)nodes.gpusPerNode), sizeof(float));
  const size_t L = (size_t)(c.numExperts / nodes.nRanks);
  s.countsBytes = align16(sizeof(int) * ((size_t)nodes.nRanks + 1 + (size_t)nodes.gpusPerNode * L));
  s.dispatchStage = m.take(records, 256);
  s.dispatchLand = m.take(records, 256);
  s.countsStage = m.take(m.mul(remote, s.countsBytes), 256);
  s.countsLand = m.take(m.mul(remote, s.countsBytes), 256);
  s.combineStage = m.take(partials, 256);
  s.combineLand = m.take(partials, 256);
  s.weightStage = m.take(weights, 256);
  s.weightLand = m.take(weights, 256);
  s.handshakeStage = m.take(m.mul((size_t)nodes.nRanks, kHtHandshakeBytes), 256);
  s.handshakeLand = m.take(m.mul((size_t)nodes.nRanks, kHtHandshakeBytes), 256);
  s.bytes = remote == 0 ? 0 : m.alignedEnd(m.off, NCCL_WIN_REQUIRED_ALIGNMENT);
  if (m.overflow)
    return setError(ncclInvalidArgument,
                    "the internode high-throughput regions of config.hidden = %d, maxTokensPerRank = %d, "
                    "topK = %d on %d nodes of %d ranks exceed the address space",
                    c.hidden, c.maxTokensPerRank, c.topK, nodes.nNodes, nodes.gpusPerNode);
  *out = s;
  return ncclSuccess;
}

}  // namespace nccl_moe
