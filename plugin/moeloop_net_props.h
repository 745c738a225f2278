// Device properties shared by the NET and GIN sides of the moeloop plugin.
#pragma once
#include <stddef.h>
#include "nccl_plugin_abi.h"
#include "nccl_plugin_abi_v13.h"

namespace moeloop {

constexpr size_t kMaxMessageBytes = 1ull << 30;  // largest single NET message / GIN put
constexpr int kGinMaxRecvs = 8;                  // GIN queue depth per rank = 32 * 8

// Fills `props` for fake NIC `dev`: the NET view (host memory, NCCL_NET_DEVICE_HOST) or the
// GIN view (host + CUDA memory, NCCL_NET_DEVICE_GIN_PROXY).
ncclResult_t fillProperties(int dev, bool gin, ncclNetProperties_v11_t* props);
// The same in NCCL 2.30's v12 layout (GIN v13, RMA v14), rail and plane unspecified
// (moeloop_gin_tables.cc).
ncclResult_t fillPropertiesV12(int dev, bool gin, ncclNetProperties_v12_t* props);

}  // namespace moeloop
