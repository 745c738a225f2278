// GIN signal plan and device-communicator requirements (see gin_setup.h).
#include "net/gin_setup.h"
#include "error.h"
#include "nccl_compat.h"

namespace nccl_moe {

ncclResult_t planGinSignals(const ncclMoeConfig_t& c, const NodeMap& nodes, GinSignalPlan* plan) {
  GinSignalPlan p;
  p.highThroughput = c.mode == ncclMoeHighThroughput;
  p.slots = p.highThroughput ? 0 : c.numBufferSlots;
  p.channels = p.highThroughput ? c.numSms : 0;
  p.nRanks = nodes.nRanks;
  const long long need = p.highThroughput ? 2LL * p.nRanks * p.channels + 4LL * p.nRanks + 1
                                          : 2LL * p.slots * p.nRanks + 1;
  if (need > kMaxGinSignals) {
    if (p.highThroughput)
      return setError(ncclInvalidArgument,
                      "config.numSms = %d on %d ranks needs %lld GIN signals across nodes; at most %d are "
                      "addressable: use fewer SMs", c.numSms, p.nRanks, need, kMaxGinSignals);
    return setError(ncclInvalidArgument,
                    "config.numBufferSlots = %d on %d ranks needs %lld GIN signals; at most %d are addressable",
                    p.slots, p.nRanks, need, kMaxGinSignals);
  }
  *plan = p;
  return ncclSuccess;
}

ncclDevCommRequirements ginRequirements(const NodeMap& nodes, const GinSignalPlan& plan) {
  ncclDevCommRequirements reqs = defaultDevCommRequirements();
  reqs.lsaBarrierCount = 1;
  if (nodes.nNodes > 1) {
    requestFullGin(&reqs);
    reqs.ginContextCount = kGinContexts;
    reqs.ginSignalCount = plan.count();
    reqs.ginCounterCount = 0;
  }
  return reqs;
}

ncclResult_t ginUnavailableError(ncclResult_t res, const NodeMap& nodes) {
  return setError(res,
                  "ncclDevCommCreate with GIN failed (%s) on %d nodes x %d GPUs: the internode path needs "
                  "GPU-initiated networking, i.e. a NET plugin that provides GIN (on one host: plugin/'s "
                  "libnccl-net-moeloop.so with NCCL_NET_PLUGIN=moeloop on LD_LIBRARY_PATH) or RDMA NICs whose "
                  "GIN NCCL supports (GDAKI, or its CPU proxy); NCCL says: %s",
                  ncclGetErrorString(res), nodes.nNodes, nodes.gpusPerNode, ncclGetLastError(nullptr));
}

}  // namespace nccl_moe
