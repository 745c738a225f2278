// The GIN / RMA tables exported by libnccl-net-moeloop.so (defined in moeloop_gin_tables.cc),
// declared for the tests that drive them directly.
#pragma once
#include "nccl_plugin_abi.h"
#include "nccl_plugin_abi_v13.h"

extern "C" {
extern ncclGin_v11_t ncclGinPlugin_v11;  // NCCL 2.28.x, 2.29.x
extern ncclGin_v13_t ncclGinPlugin_v13;  // NCCL 2.30.3 / 2.30.4 GIN, 2.30.7 RMA v13 fallback
extern ncclRma_v14_t ncclRmaPlugin_v14;  // NCCL 2.30.7: RMA backend of NCCL's GIN proxy
}
