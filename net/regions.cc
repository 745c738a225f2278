// Window arithmetic of the internode low-latency regions (see regions.h).
#include "net/regions.h"
#include "error.h"

namespace nccl_moe {

static size_t align16(size_t v) { return (v + 15) / 16 * 16; }

LlRecordLayout llRecordLayout(const ncclMoeConfig_t& c) {
  LlRecordLayout r;
  r.header = align16(2 * sizeof(int) + (size_t)c.topK * sizeof(LlRouteEntry));
  r.data = r.header;
  r.scales = r.data + (size_t)c.hidden * dtypeBytes(c.dispatchDtype);
  r.bytes = align16(r.scales + llScaleBytesPerRow(c));
  return r;
}

ncclResult_t computeLlNetRegions(const ncclMoeConfig_t& c, const NodeMap& nodes, LlNetSlotRegions* out) {
  LlNetSlotRegions s;
  s.record = llRecordLayout(c);
  CheckedBytes m;
  const size_t rows = m.mul((size_t)nodes.remoteRanks(), (size_t)c.maxTokensPerRank);
  const size_t records = m.mul(rows, s.record.bytes), partials = m.mul(m.mul(rows, (size_t)c.hidden), 2);
  const size_t remote = (size_t)nodes.remoteRanks(), L = (size_t)(c.numExperts / nodes.nRanks);
  s.countsBytes = align16(sizeof(int) * (L + 1));
  s.dispatchStage = m.take(records, 256);
  s.dispatchLand = m.take(records, 256);
  s.combineStage = m.take(partials, 256);
  s.combineLand = m.take(partials, 256);
  s.countsStage = m.take(m.mul(remote, s.countsBytes), 256);
  s.countsLand = m.take(m.mul(remote, s.countsBytes), 256);
  s.sendIndex = m.take(m.mul(rows, sizeof(int)), 256);
  s.destCount = m.take(m.mul(remote, sizeof(int)), 256);
  s.bytes = remote == 0 ? 0 : m.alignedEnd(m.off, NCCL_WIN_REQUIRED_ALIGNMENT);
  if (m.overflow)
    return setError(ncclInvalidArgument,
                    "the internode regions of config.hidden = %d, maxTokensPerRank = %d, topK = %d on %d ranks "
                    "(%d per node) exceed the address space",
                    c.hidden, c.maxTokensPerRank, c.topK, nodes.nRanks, nodes.gpusPerNode);
  *out = s;
  return ncclSuccess;
}

}  // namespace nccl_moe
