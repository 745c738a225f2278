// The hash the cross-topology digest tests write (LlTopology, HtTopology): 64-bit FNV-1a, chained.
#pragma once
#include <stddef.h>
#include <stdint.h>

namespace moe_gpu {

constexpr uint64_t kFnvBasis = 1469598103934665603ull;

// h extended by the n bytes at p (start a hash with kFnvBasis).
inline uint64_t fnv(uint64_t h, const void* p, size_t n) {
  const unsigned char* b = (const unsigned char*)p;
  for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  return h;
}

}  // namespace moe_gpu
