// Pointer checks of the public calls (see pointer_check.h).
#include "pointer_check.h"
#include <stdint.h>
#include <cuda_runtime.h>
#include "error.h"

namespace nccl_moe {

ncclResult_t checkAlignment(const char* fn, const char* name, const void* p, size_t alignment) {
  if ((uintptr_t)p % alignment != 0)
    return setError(ncclInvalidArgument, "%s: %s = %p is not %zu-byte aligned", fn, name, p, alignment);
  return ncclSuccess;
}

void AccessiblePointers::init(int device, bool pageableHostOk) {
  device_ = device;
  pageableHostOk_ = pageableHostOk;
}

ncclResult_t AccessiblePointers::check(const char* fn, const char* name, const void* p) {
  if (p == nullptr) return ncclSuccess;
  for (const void* s : seen_)
    if (s == p) return ncclSuccess;
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, p) != cudaSuccess) {
    (void)cudaGetLastError();  // CUDA < 11 fails on unregistered host memory: treat it as such
    attr.type = cudaMemoryTypeUnregistered;
  }
  switch (attr.type) {
    case cudaMemoryTypeDevice:
      if (attr.device != device_)
        return setError(ncclInvalidArgument, "%s: %s = %p is memory of CUDA device %d, not of the EP context's "
                        "device %d", fn, name, p, attr.device, device_);
      break;
    case cudaMemoryTypeManaged:
      break;
    case cudaMemoryTypeHost:
      if (attr.devicePointer == nullptr)
        return setError(ncclInvalidArgument, "%s: %s = %p is pinned host memory not mapped into the device", fn,
                        name, p);
      break;
    default:
      if (!pageableHostOk_)
        return setError(ncclInvalidArgument, "%s: %s = %p is host memory the device cannot access (pass device "
                        "memory)", fn, name, p);
  }
  seen_[next_] = p;
  next_ = (next_ + 1) % kEntries;
  return ncclSuccess;
}

ncclResult_t checkDevicePointer(AccessiblePointers& pointers, const char* fn, const char* name, const void* p,
                                size_t alignment) {
  MOE_CHECK(checkAlignment(fn, name, p, alignment));
  return pointers.check(fn, name, p);
}

}  // namespace nccl_moe
