// The one place that knows which NCCL line the library is built against (2.28.9, 2.29.x,
// 2.30.x). Host code only; kernels see no version switches (the device API calls they make
// have the same signatures on every supported line).
//
// Supported: NCCL >= 2.28.9 (device API with GIN, symmetric windows). The library's kernels
// embed NCCL's device structs (ncclDevComm, ncclWindow_t layouts), so the NCCL loaded at run
// time must be the major.minor it was built against; patch releases of one line are
// interchangeable.
#pragma once
#include <stdio.h>
#include <string.h>
#include <nccl.h>
#include <nccl_device.h>

#if NCCL_VERSION_CODE < 22809
#error "nccl-moe needs NCCL 2.28.9 or later (device API with GIN); run `make deps` or set NCCL_HOME"
#endif

namespace nccl_moe {

// NCCL_VERSION_CODE of the headers this translation unit is compiled with (major*10000 +
// minor*100 + patch, NCCL's own encoding since 2.9).
constexpr int kNcclBuildVersion = NCCL_VERSION_CODE;

// Device-communicator requirements with every field at NCCL's default. From 2.29 on the struct
// carries size/magic/version and must start from NCCL's initializer (ncclDevCommCreate rejects
// a zeroed one with ncclInvalidUsage); 2.28.9 has no initializer and wants the struct zeroed.
inline ncclDevCommRequirements defaultDevCommRequirements() {
#ifdef NCCL_DEV_COMM_REQUIREMENTS_INITIALIZER
  ncclDevCommRequirements reqs = NCCL_DEV_COMM_REQUIREMENTS_INITIALIZER;
#else
  ncclDevCommRequirements reqs;
  memset(&reqs, 0, sizeof(reqs));
#endif
  return reqs;
}

// Asks for GIN connections between every pair of ranks. 2.29+ take it from ginConnectionType
// (ncclDevCommCreate rejects GIN signals or contexts requested while it is NONE, the default);
// 2.28.9 has no such field and enables GIN when the communicator spans several LSA teams, or
// when forced.
inline void requestFullGin(ncclDevCommRequirements* reqs) {
#ifdef NCCL_DEV_COMM_REQUIREMENTS_INITIALIZER
  reqs->ginConnectionType = NCCL_GIN_CONNECTION_FULL;
#else
  reqs->ginForceEnable = true;
#endif
}

// Whether a library built against NCCL `built` can run on the NCCL `loaded` (both
// NCCL_VERSION_CODE encodings): same major and minor. Pure, so the CPU tests cover it.
constexpr bool ncclVersionsCompatible(int built, int loaded) { return built / 100 == loaded / 100; }

// Formats a version code as "2.30.7" into `buf` (at least 16 bytes); returns buf.
inline const char* formatNcclVersion(int code, char* buf, size_t len) {
  snprintf(buf, len, "%d.%d.%d", code / 10000, code / 100 % 100, code % 100);
  return buf;
}

}  // namespace nccl_moe
