// FP8 e4m3 cast of BF16 rows in the sending warp, one scale per 128 channels.
// A warp handles 32 consecutive 16-byte vectors (8 BF16 each): lanes 0-15 hold one group of 128
// channels, lanes 16-31 the next. Scale rules (the CPU reference in testing/reference_ll.cc
// computes exactly the same): amax = max(max |x|, 1e-4); FP32 format: scale = amax / 448,
// q = e4m3(x * (448 / amax)); power-of-two formats: scale = the smallest 2^e >= amax / 448,
// q = e4m3(x * 2^-e). Conversions round to nearest even and saturate to +-448. A group holding
// +-Inf gets scale +Inf and inverse 0 in every format (UE8M0 byte 0xFF, its NaN code): finite
// values cast to +-0, the Inf to NaN, and the group dequantises to NaN, never to finite values.
#pragma once
#include <cuda_fp8.h>
#include <stdint.h>
#include "device/common/vec_io.cuh"

namespace nccl_moe {

constexpr float kFp8Max = 448.0f;
constexpr float kAmaxFloor = 1e-4f;

// Max of |x| over the 16 lanes of this lane's half-warp (8 values per lane).
__device__ __forceinline__ float groupAmax(uint4 v) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  float m = 0.0f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    m = fmaxf(m, fabsf(bf16BitsToFloat(w[i] & 0xffffu)));
    m = fmaxf(m, fabsf(bf16BitsToFloat(w[i] >> 16)));
  }
#pragma unroll
  for (int off = 8; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
  return fmaxf(m, kAmaxFloor);
}

struct Fp8Scale {
  float scale;     // dequantisation factor
  float inverse;   // quantisation factor
  uint8_t ue8m0;   // biased exponent byte of a power-of-two scale
};

__device__ __forceinline__ Fp8Scale fp8Scale(float amax, bool powerOfTwo) {
  Fp8Scale s;
  if (!powerOfTwo) {
    s.scale = __fdiv_rn(amax, kFp8Max);
    s.inverse = __fdiv_rn(kFp8Max, amax);
    s.ue8m0 = 0;
    return s;
  }
  const float r = __fdiv_rn(amax, kFp8Max);  // > 0 and normal (amax >= 1e-4)
  const uint32_t bits = __float_as_uint(r);
  int e = (int)((bits >> 23) & 0xff) - 127;   // r = 1.m * 2^e
  if (e > 127) {                              // amax = +Inf (a group holding +-Inf)
    s.scale = __uint_as_float(0x7f800000u);
    s.inverse = 0.0f;
    s.ue8m0 = 0xff;
    return s;
  }
  if (bits & 0x7fffffu) e += 1;               // round up unless r is a power of two
  // e is in [-22, 120] (amax >= 1e-4, finite BF16 < 2^128): both powers are normal floats, built exactly.
  s.scale = __uint_as_float((uint32_t)(e + 127) << 23);
  s.inverse = __uint_as_float((uint32_t)(127 - e) << 23);
  s.ue8m0 = (uint8_t)(e + 127);
  return s;
}

// Quantises 8 BF16 values with `inverse` into 8 e4m3 bytes.
__device__ __forceinline__ uint2 castToFp8(uint4 v, float inverse) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  uint32_t out[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float2 a = make_float2(__fmul_rn(bf16BitsToFloat(w[2 * i] & 0xffffu), inverse),
                           __fmul_rn(bf16BitsToFloat(w[2 * i] >> 16), inverse));
    float2 b = make_float2(__fmul_rn(bf16BitsToFloat(w[2 * i + 1] & 0xffffu), inverse),
                           __fmul_rn(bf16BitsToFloat(w[2 * i + 1] >> 16), inverse));
    const uint32_t lo = __nv_cvt_float2_to_fp8x2(a, __NV_SATFINITE, __NV_E4M3);
    const uint32_t hi = __nv_cvt_float2_to_fp8x2(b, __NV_SATFINITE, __NV_E4M3);
    out[i] = (lo & 0xffffu) | (hi << 16);
  }
  return make_uint2(out[0], out[1]);
}

}  // namespace nccl_moe
