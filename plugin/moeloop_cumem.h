// CUDA IPC of cuMem (VMM) allocations for the moeloop copy transport, through the driver API
// obtained from the runtime (cudaGetDriverEntryPoint*): the plugin links only cudart and loads
// without a GPU. Nothing here logs at WARN: callers decide whether a failure is worth a warning
// (every failure has a fallback, the socket path).
//
// Exporter: the allocation holding a registered range is found with cuMemGetAddressRange (the
// range mapped by one cuMemMap, whose offset into its allocation is always 0), retained and
// exported once as a POSIX file descriptor. Importer: the descriptor is imported, mapped whole
// into a fresh VA reservation and made readable / writable by the importer's device.
#pragma once
#include <stddef.h>
#include <stdint.h>
#include <string>

namespace moeloop {

// True once the driver entry points resolved (the first call resolves them; thread-safe).
// *why explains a false answer.
bool cumemAvailable(std::string* why);

struct CuMemExport {
  int fd = -1;           // POSIX fd of the allocation (the caller closes it)
  uint64_t offset = 0;   // bytes from the allocation's start to the registered range
  uint64_t mapSize = 0;  // bytes the importer maps (the whole allocation)
};
// Exports the cuMem allocation holding [p, p + size) of device `dev`. false (with *why) when the
// memory is not cuMem-backed, spans several allocations or cannot be exported as a POSIX fd.
bool cumemExport(int dev, const void* p, size_t size, CuMemExport* out, std::string* why);

struct CuMemMapping {
  char* base = nullptr;  // importer's VA of the allocation's first byte
  size_t size = 0;
};
// Imports `fd` (not closed here) and maps `mapSize` bytes for device `dev`. On failure nothing
// stays mapped or reserved.
bool cumemImport(int dev, int fd, uint64_t mapSize, CuMemMapping* out, std::string* why);
// Unmaps and frees the reservation (no-op for an empty mapping). The caller has made sure that no
// copy into the mapping is still in flight.
void cumemUnmap(int dev, CuMemMapping* m);

// Whether the calling thread has a current CUDA context (cuCtxGetCurrent); true when that entry
// point cannot be resolved (DeviceScope then restores the device as it always did).
bool threadHasCudaContext();

}  // namespace moeloop
