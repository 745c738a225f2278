// Run-time check of the NCCL library against the headers nccl-moe was built with.
#pragma once
#include <nccl.h>

namespace nccl_moe {

// ncclSuccess when the loaded NCCL (ncclGetVersion) has the major.minor of the build's headers;
// otherwise ncclInvalidUsage with a message, prefixed by `caller`, that names both versions.
ncclResult_t checkNcclRuntimeVersion(const char* caller);

}  // namespace nccl_moe
