// Device properties shared by the NET and GIN sides of the moeloop plugin.
#pragma once
#include <stddef.h>
#include "nccl_plugin_abi.h"

namespace moeloop {

constexpr size_t kMaxMessageBytes = 1ull << 30;  // largest single NET message / GIN put
constexpr int kGinMaxRecvs = 8;                  // GIN queue depth per rank = 32 * 8

// Fills `props` for fake NIC `dev`: the NET view (host memory, NCCL_NET_DEVICE_HOST) or the
// GIN view (host + CUDA memory, NCCL_NET_DEVICE_GIN_PROXY).
ncclResult_t fillProperties(int dev, bool gin, ncclNetProperties_v11_t* props);

}  // namespace moeloop
