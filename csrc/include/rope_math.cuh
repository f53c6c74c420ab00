// Per-element RoPE math shared by every CUDA kernel and by the host test program (tests/test_csrc.py).
//
// The same angle computation as the Triton kernels (pi_kernels/ops/_rope.py, which explains it): the host folds
// 1 / (2π · scaling_factor) into a float64 "turns" table, so the angle of pair j at position m is
// m · turns[j] turns. It is formed in double (exact to 1e-16 relative), its whole turns dropped (exact), and the
// fraction multiplied by 2π split into a float32-exact high part and a low part, still in double. The reduced
// angle, in (-2π, 2π), is rounded to float once and fed to float sin/cos: ~1e-7 of the float64 reference at any
// position below 2^52, where a float32 angle would be off by ulp(angle) (4e-3 rad at m = 2^20, scaling 16).
//
// Plain C++ when not compiled by nvcc, so a host compiler builds it with no CUDA headers. Kernels must not be
// built with --use_fast_math: sinf/cosf must stay the accurate ones.
#pragma once

#include <math.h>

#include <cstdint>

#ifdef __CUDACC__
#define PI_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PI_HOST_DEVICE inline
#endif

namespace pi_kernels {

// 2π = kTwoPiHi + kTwoPiLo, kTwoPiHi exact in float32 (the constants of pi_kernels/_angles.py).
constexpr double kTwoPiHi = 6.2831854820251465;
constexpr double kTwoPiLo = -1.7484556025237907e-07;

// The angle of `turns_per_position` turns per position at `position`, reduced to (-2π, 2π), in float.
PI_HOST_DEVICE float reduced_angle(int64_t position, double turns_per_position) {
  double turns = static_cast<double>(position) * turns_per_position;
  turns -= trunc(turns);
  return static_cast<float>(turns * kTwoPiHi + turns * kTwoPiLo);
}

// cos and sin of the angle of `position` for one pair; sin negated for the inverse rotation (the backward).
PI_HOST_DEVICE void rope_cos_sin(int64_t position, double turns_per_position, bool conjugate, float* cos_out,
                                 float* sin_out) {
  const float angle = reduced_angle(position, turns_per_position);
  *cos_out = cosf(angle);
  *sin_out = conjugate ? -sinf(angle) : sinf(angle);
}

// Rotate the pair (x1, x2) by the angle whose cos and sin are given.
PI_HOST_DEVICE void rotate_pair(float x1, float x2, float cos_angle, float sin_angle, float* out1, float* out2) {
  *out1 = x1 * cos_angle - x2 * sin_angle;
  *out2 = x1 * sin_angle + x2 * cos_angle;
}

}  // namespace pi_kernels
