// Checks of the pointers a public call receives, before any kernel dereferences them: alignment
// (pure arithmetic, tested on the CPU) and device accessibility (cudaPointerGetAttributes).
#pragma once
#include <stddef.h>
#include <nccl.h>

namespace nccl_moe {

// Fails with ncclInvalidArgument ("fn: name = p is not N-byte aligned") when p is not a
// multiple of `alignment` bytes. NULL passes: each call states its own NULL rules.
ncclResult_t checkAlignment(const char* fn, const char* name, const void* p, size_t alignment);

// Pointers one EP context found accessible from its device. A host pointer given to a kernel
// kills the CUDA context (illegal address), so every pointer argument is checked once:
//  - accepted: memory of the context's device, managed memory, pinned host memory mapped into
//    the device, and pageable host memory when the device reads it (HMM / ATS:
//    cudaDevAttrPageableMemoryAccess);
//  - rejected (ncclInvalidArgument): pageable host memory otherwise, and memory of another
//    device (peer access is not assumed).
// Cost: a pointer seen for the first time costs one cudaPointerGetAttributes (about 1 us of host
// time); the last kEntries accepted addresses are remembered and cost a scan of kEntries words,
// so a decode loop that reuses its buffers pays nothing after its first call (and a CUDA graph
// replay runs no host code at all). A remembered address is not queried again: it could only be
// wrong if the same address were device memory first and host memory later, which the driver's
// separate virtual ranges for device allocations rule out in practice.
// Not thread-safe (one per context, like the context itself).
class AccessiblePointers {
 public:
  void init(int device, bool pageableHostOk);
  // p == NULL passes. `fn` and `name` go into the message.
  ncclResult_t check(const char* fn, const char* name, const void* p);

 private:
  static constexpr int kEntries = 64;
  const void* seen_[kEntries] = {};
  int next_ = 0;  // entry replaced by the next accepted address (round robin)
  int device_ = -1;
  bool pageableHostOk_ = false;
};

// Alignment first (no CUDA call), then accessibility.
ncclResult_t checkDevicePointer(AccessiblePointers& pointers, const char* fn, const char* name, const void* p,
                                size_t alignment);

}  // namespace nccl_moe
