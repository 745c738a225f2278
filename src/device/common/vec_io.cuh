// 16-byte vector loads and stores used by the data-moving kernels, with the cache hints that
// suit each side: token sources are read once (no L1 allocation), peer memory is written
// through to NVLink, values written by peers are read past L1 (not coherent across GPUs).
#pragma once
#include <stdint.h>

namespace nccl_moe {

__device__ __forceinline__ uint4 loadStreaming(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// Reads memory another GPU wrote during this or an earlier kernel (bypasses L1).
__device__ __forceinline__ uint4 loadPeer(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.cg.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

__device__ __forceinline__ int loadPeerInt(const int* p) {
  int v;
  asm volatile("ld.global.cg.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

__device__ __forceinline__ int2 loadPeerInt2(const int2* p) {
  int2 v;
  asm volatile("ld.global.cg.v2.s32 {%0,%1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}

__device__ __forceinline__ void storeNoAllocate(uint4* p, uint4 v) {
  asm volatile("st.global.L1::no_allocate.v4.u32 [%0], {%1,%2,%3,%4};"
               ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
}

__device__ __forceinline__ float bf16BitsToFloat(uint32_t bits16) {
  return __uint_as_float(bits16 << 16);
}

// Two FP32 values rounded to nearest even as BF16 bits, packed with the first in the low half, by
// the hardware conversion (cvt.rn.bf16x2.f32: one instruction for both); a NaN becomes the
// canonical NaN 0x7fff (the CPU reference's floatToBf16 does the same).
__device__ __forceinline__ uint32_t floatsToBf16x2Bits(float lo, float hi) {
  uint32_t v;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(v) : "f"(hi), "f"(lo));
  return v;
}

// acc[i] += scale * x[i] for the 8 BF16 values of v (element 2j in the low half of word j), as a
// separate multiply and add with round-to-nearest (no FMA): the CPU reference computes
// acc += w * x the same way, so every combine kernel that sums through this gets its bits.
__device__ __forceinline__ void accumulateBf16x8(float (&acc)[8], uint4 v, float scale) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    acc[2 * i] = __fadd_rn(acc[2 * i], __fmul_rn(scale, bf16BitsToFloat(words[i] & 0xffffu)));
    acc[2 * i + 1] = __fadd_rn(acc[2 * i + 1], __fmul_rn(scale, bf16BitsToFloat(words[i] >> 16)));
  }
}

// The 8 FP32 sums rounded to BF16 and packed as one 16-byte vector (the inverse layout).
__device__ __forceinline__ uint4 packBf16x8(const float (&acc)[8]) {
  uint4 v;
  v.x = floatsToBf16x2Bits(acc[0], acc[1]);
  v.y = floatsToBf16x2Bits(acc[2], acc[3]);
  v.z = floatsToBf16x2Bits(acc[4], acc[5]);
  v.w = floatsToBf16x2Bits(acc[6], acc[7]);
  return v;
}

}  // namespace nccl_moe
