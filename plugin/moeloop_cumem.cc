// cuMem export / import for the moeloop copy transport (see moeloop_cumem.h).
#include "moeloop_cumem.h"

#include <cuda.h>
#include <cuda_runtime.h>
#include <mutex>
#include <stdio.h>
#include "moeloop_cuda_util.h"

namespace moeloop {
namespace {

// The driver functions used here, resolved once.
struct Driver {
  CUresult (*getErrorString)(CUresult, const char**);
  CUresult (*memGetAddressRange)(CUdeviceptr*, size_t*, CUdeviceptr);
  CUresult (*memRetainAllocationHandle)(CUmemGenericAllocationHandle*, void*);
  CUresult (*memExportToShareableHandle)(void*, CUmemGenericAllocationHandle, CUmemAllocationHandleType,
                                         unsigned long long);
  CUresult (*memImportFromShareableHandle)(CUmemGenericAllocationHandle*, void*, CUmemAllocationHandleType);
  CUresult (*memRelease)(CUmemGenericAllocationHandle);
  CUresult (*memAddressReserve)(CUdeviceptr*, size_t, size_t, CUdeviceptr, unsigned long long);
  CUresult (*memAddressFree)(CUdeviceptr, size_t);
  CUresult (*memMap)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long);
  CUresult (*memUnmap)(CUdeviceptr, size_t);
  CUresult (*memSetAccess)(CUdeviceptr, size_t, const CUmemAccessDesc*, size_t);
};

template <class F>
bool resolve(const char* name, F* fn, std::string* why) {
  void* p = nullptr;
  cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
  cudaError_t e = cudaGetDriverEntryPointByVersion(name, &p, 12000, cudaEnableDefault, &q);
#else
  cudaError_t e = cudaGetDriverEntryPoint(name, &p, cudaEnableDefault, &q);
#endif
  if (e != cudaSuccess || q != cudaDriverEntryPointSuccess || p == nullptr) {
    *why = std::string("CUDA driver entry point ") + name + " not found (" +
           (e != cudaSuccess ? cudaGetErrorString(e) : "symbol missing") + ")";
    return false;
  }
  *fn = (F)p;
  return true;
}

struct DriverState {
  bool ok = false;
  std::string why;
  Driver d{};
};

const DriverState& driver() {
  static DriverState* s = [] {
    DriverState* st = new DriverState();
    Driver& d = st->d;
    std::string* w = &st->why;
    st->ok = resolve("cuGetErrorString", &d.getErrorString, w) &&
             resolve("cuMemGetAddressRange", &d.memGetAddressRange, w) &&
             resolve("cuMemRetainAllocationHandle", &d.memRetainAllocationHandle, w) &&
             resolve("cuMemExportToShareableHandle", &d.memExportToShareableHandle, w) &&
             resolve("cuMemImportFromShareableHandle", &d.memImportFromShareableHandle, w) &&
             resolve("cuMemRelease", &d.memRelease, w) &&
             resolve("cuMemAddressReserve", &d.memAddressReserve, w) &&
             resolve("cuMemAddressFree", &d.memAddressFree, w) &&
             resolve("cuMemMap", &d.memMap, w) && resolve("cuMemUnmap", &d.memUnmap, w) &&
             resolve("cuMemSetAccess", &d.memSetAccess, w);
    return st;
  }();
  return *s;
}

// "<call> failed: <driver message>" into *why; returns false.
bool fail(const char* call, CUresult r, std::string* why) {
  const char* msg = nullptr;
  if (driver().d.getErrorString == nullptr || driver().d.getErrorString(r, &msg) != CUDA_SUCCESS || msg == nullptr)
    msg = "unknown error";
  char buf[256];
  snprintf(buf, sizeof(buf), "%s failed: %s (%d)", call, msg, (int)r);
  *why = buf;
  return false;
}

// Device `dev` current with its primary context initialised (the driver calls need it).
bool enterDevice(int dev, DeviceScope& scope, std::string* why) {
  if (scope.status() != ncclSuccess) {
    *why = "cannot select CUDA device " + std::to_string(dev);
    return false;
  }
  cudaError_t e = cudaFree(nullptr);
  if (e != cudaSuccess) {
    *why = std::string("CUDA context of device ") + std::to_string(dev) + ": " + cudaGetErrorString(e);
    return false;
  }
  return true;
}

}  // namespace

bool cumemAvailable(std::string* why) {
  const DriverState& s = driver();
  if (!s.ok) *why = s.why;
  return s.ok;
}

bool cumemExport(int dev, const void* p, size_t size, CuMemExport* out, std::string* why) {
  *out = CuMemExport{};
  if (!cumemAvailable(why)) return false;
  DeviceScope scope(dev);
  if (!enterDevice(dev, scope, why)) return false;
  const Driver& d = driver().d;
  CUdeviceptr base = 0;
  size_t mapSize = 0;
  CUresult r = d.memGetAddressRange(&base, &mapSize, (CUdeviceptr)p);
  if (r != CUDA_SUCCESS) return fail("cuMemGetAddressRange", r, why);
  uint64_t begin = (uint64_t)(uintptr_t)p;
  if (begin < base || begin + size > base + mapSize) {
    *why = "the registered range spans several allocations";
    return false;
  }
  CUmemGenericAllocationHandle h = 0;
  r = d.memRetainAllocationHandle(&h, (void*)base);
  if (r != CUDA_SUCCESS) return fail("cuMemRetainAllocationHandle (memory not from cuMem / ncclMemAlloc?)", r, why);
  int fd = -1;
  r = d.memExportToShareableHandle(&fd, h, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0);
  d.memRelease(h);  // drops the reference taken by the retain; the allocation stays mapped
  if (r != CUDA_SUCCESS) return fail("cuMemExportToShareableHandle(POSIX_FILE_DESCRIPTOR)", r, why);
  out->fd = fd;
  out->offset = begin - base;
  out->mapSize = mapSize;
  return true;
}

bool cumemImport(int dev, int fd, uint64_t mapSize, CuMemMapping* out, std::string* why) {
  *out = CuMemMapping{};
  if (!cumemAvailable(why)) return false;
  DeviceScope scope(dev);
  if (!enterDevice(dev, scope, why)) return false;
  const Driver& d = driver().d;
  CUmemGenericAllocationHandle h = 0;
  CUresult r = d.memImportFromShareableHandle(&h, (void*)(uintptr_t)fd, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR);
  if (r != CUDA_SUCCESS) return fail("cuMemImportFromShareableHandle", r, why);
  CUdeviceptr va = 0;
  r = d.memAddressReserve(&va, mapSize, 0, 0, 0);
  if (r != CUDA_SUCCESS) {
    d.memRelease(h);
    return fail("cuMemAddressReserve", r, why);
  }
  r = d.memMap(va, mapSize, 0, h, 0);
  d.memRelease(h);  // the mapping keeps the allocation alive from here on
  if (r != CUDA_SUCCESS) {
    d.memAddressFree(va, mapSize);
    return fail("cuMemMap", r, why);
  }
  CUmemAccessDesc access = {};
  access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  access.location.id = dev;
  access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  r = d.memSetAccess(va, mapSize, &access, 1);
  if (r != CUDA_SUCCESS) {
    d.memUnmap(va, mapSize);
    d.memAddressFree(va, mapSize);
    return fail("cuMemSetAccess (no peer access between these GPUs?)", r, why);
  }
  out->base = (char*)(uintptr_t)va;
  out->size = mapSize;
  return true;
}

bool threadHasCudaContext() {
  static CUresult (*getCurrent)(CUcontext*) = [] {
    CUresult (*fn)(CUcontext*) = nullptr;
    std::string why;
    return resolve("cuCtxGetCurrent", &fn, &why) ? fn : nullptr;
  }();
  CUcontext ctx = nullptr;
  return getCurrent == nullptr || getCurrent(&ctx) != CUDA_SUCCESS || ctx != nullptr;
}

void cumemUnmap(int dev, CuMemMapping* m) {
  if (m->base == nullptr) return;
  std::string why;
  if (!cumemAvailable(&why)) return;
  DeviceScope scope(dev);
  const Driver& d = driver().d;
  CUdeviceptr va = (CUdeviceptr)(uintptr_t)m->base;
  CUresult r = d.memUnmap(va, m->size);
  if (r != CUDA_SUCCESS) {
    fail("cuMemUnmap", r, &why);
    ML_WARN("copy transport: %s", why.c_str());
  }
  r = d.memAddressFree(va, m->size);
  if (r != CUDA_SUCCESS) {
    fail("cuMemAddressFree", r, &why);
    ML_WARN("copy transport: %s", why.c_str());
  }
  *m = CuMemMapping{};
}

}  // namespace moeloop
