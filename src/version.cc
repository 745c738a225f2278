// Version queries of the public API and the check that the NCCL loaded at run time is the line
// the library was built against.
#include "version.h"
#include "error.h"
#include "nccl_compat.h"
#include "nccl_moe.h"

namespace nccl_moe {

ncclResult_t checkNcclRuntimeVersion(const char* caller) {
  int loaded = 0;
  ncclResult_t res = ncclGetVersion(&loaded);
  if (res != ncclSuccess)
    return setError(res, "%s: ncclGetVersion failed: %s", caller, ncclGetErrorString(res));
  if (!ncclVersionsCompatible(kNcclBuildVersion, loaded)) {
    char built[16], have[16];
    return setError(ncclInvalidUsage,
                    "%s: nccl-moe was built against NCCL %s but this process loaded NCCL %s "
                    "(libnccl.so.2 found first on the library path); rebuild nccl-moe with "
                    "NCCL_HOME pointing at NCCL %d.%d, or load that NCCL",
                    caller, formatNcclVersion(kNcclBuildVersion, built, sizeof(built)),
                    formatNcclVersion(loaded, have, sizeof(have)), kNcclBuildVersion / 10000,
                    kNcclBuildVersion / 100 % 100);
  }
  return ncclSuccess;
}

}  // namespace nccl_moe

extern "C" ncclResult_t ncclMoeGetVersion(int* version) {
  nccl_moe::clearError();
  if (version == nullptr)
    return nccl_moe::setError(ncclInvalidArgument, "ncclMoeGetVersion: version is NULL");
  *version = NCCL_MOE_VERSION_CODE;
  return ncclSuccess;
}

extern "C" ncclResult_t ncclMoeGetNcclVersion(int* buildVersion, int* runtimeVersion) {
  nccl_moe::clearError();
  if (buildVersion == nullptr && runtimeVersion == nullptr)
    return nccl_moe::setError(ncclInvalidArgument,
                              "ncclMoeGetNcclVersion: buildVersion and runtimeVersion are both NULL");
  if (buildVersion != nullptr) *buildVersion = nccl_moe::kNcclBuildVersion;
  if (runtimeVersion != nullptr) {
    ncclResult_t res = ncclGetVersion(runtimeVersion);
    if (res != ncclSuccess)
      return nccl_moe::setError(res, "ncclMoeGetNcclVersion: ncclGetVersion failed: %s",
                                ncclGetErrorString(res));
  }
  return ncclSuccess;
}
