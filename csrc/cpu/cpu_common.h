// Shared helpers of the C++ CPU kernels: dtype codes, branch-free fp16/bf16 <-> fp32 conversion (scalar and 16-lane),
// 16-lane row reductions and exp written with GCC/Clang vector extensions, and the function-multiversioning attribute.
//
// The vector-extension code compiles to straight SIMD for whatever ISA the enclosing function targets. Hot functions
// carry VLMO_CPU_CLONES: GCC emits an AVX-512 (x86-64-v4), an AVX2+FMA (x86-64-v3) and a baseline copy and the loader
// picks one per machine, so one build runs everywhere and still uses wide vectors where they exist.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__x86_64__) && defined(__GNUC__) && __GNUC__ >= 11 && !defined(__clang__) && !defined(VLMO_FAST_NO_CLONES)
#define VLMO_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VLMO_CPU_CLONES
#endif

#define VLMO_INLINE inline __attribute__((always_inline))

#ifdef _OPENMP
#include <omp.h>
#endif

// This thread's share [begin, end) of `total` items inside an OpenMP parallel region (the whole range without
// OpenMP), and its thread number for per-thread partial buffers.
struct ThreadShare {
  int tid;
  int64_t begin, end;
};

inline ThreadShare thread_share(int64_t total) {
  int tid = 0, nt = 1;
#ifdef _OPENMP
  tid = omp_get_thread_num();
  nt = omp_get_num_threads();
#endif
  return {tid, total * tid / nt, total * (tid + 1) / nt};
}

namespace vlmo_fast {
namespace cpu {

// Element type codes shared with Python (vlmo_fast/ops/native.py): the kernels read and write these, math is fp32.
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

VLMO_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

VLMO_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

VLMO_INLINE float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// Round to nearest even; NaN stays a (quiet) NaN.
VLMO_INLINE uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  return static_cast<uint16_t>(nan ? ((u >> 16) | 0x40u) : rounded);
}

// IEEE half -> float, exact for every input. The 15-bit magnitude shifted into the float's exponent/mantissa field is
// the half's value scaled by 2^-112 (also for subnormals); one multiply rebiases it. Inf/NaN get the full exponent.
VLMO_INLINE float f16_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t mag = static_cast<uint32_t>(h & 0x7fffu);
  float finite = bits_to_float(mag << 13) * 5.192296858534828e+33f;  // 2^112
  uint32_t bits = mag >= 0x7c00u ? ((mag << 13) | 0x7f800000u) : float_to_bits(finite);
  return bits_to_float(bits | sign);
}

// float -> IEEE half, round to nearest even, overflow to inf, NaN to a quiet NaN.
VLMO_INLINE uint16_t float_to_f16(float f) {
  uint32_t u = float_to_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  // |f| < 2^-14: the result is subnormal (or zero). Adding 0.5 lines the half's subnormal grid up with the float's
  // last mantissa bits, and the FPU's own round-to-nearest-even does the rounding.
  uint32_t sub = float_to_bits(bits_to_float(u) + 0.5f) - 0x3f000000u;
  // Normal range: rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits to nearest even; a carry
  // out of the mantissa correctly bumps the exponent.
  uint32_t odd = (u >> 13) & 1u;
  uint32_t norm = (u + 0xc8000fffu + odd) >> 13;  // 0xc8000000 == (15 - 127) << 23 modulo 2^32
  uint32_t h = u < 0x38800000u ? sub : norm;
  h = u >= 0x477ff000u ? 0x7c00u : h;  // >= 65520 rounds to inf
  h = u > 0x7f800000u ? 0x7e00u : h;   // NaN
  return static_cast<uint16_t>(h | sign);
}

template <int DT>
struct Elem;
template <>
struct Elem<kF32> {
  using T = float;
  static VLMO_INLINE float load(T v) { return v; }
  static VLMO_INLINE T store(float v) { return v; }
};
template <>
struct Elem<kF16> {
  using T = uint16_t;
  static VLMO_INLINE float load(T v) { return f16_to_float(v); }
  static VLMO_INLINE T store(float v) { return float_to_f16(v); }
};
template <>
struct Elem<kBF16> {
  using T = uint16_t;
  static VLMO_INLINE float load(T v) { return bf16_to_float(v); }
  static VLMO_INLINE T store(float v) { return float_to_bf16(v); }
};

// Row reductions over 16 fixed lanes, written with GCC vector extensions: they vectorize without -ffast-math (plain
// float loops do not: reassociating a sum or a NaN-aware max is not allowed), and the result does not depend on
// the vector width of the clone that runs (16 partials, then the same fixed-order tail).
typedef float Vec16 __attribute__((vector_size(64)));

VLMO_INLINE Vec16 vload(const float* p) {
  Vec16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

VLMO_INLINE Vec16 vsplat(float x) { return Vec16{} + x; }

VLMO_INLINE float hsum(Vec16 v) {
  float s = 0.0f;
  for (int l = 0; l < 16; ++l) s += v[l];
  return s;
}

VLMO_INLINE float row_max(const float* x, int64_t n) {
  Vec16 acc = vsplat(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const Vec16 v = vload(x + j);
    acc = acc > v ? acc : v;
  }
  float m = acc[0];
  for (int l = 1; l < 16; ++l) m = m > acc[l] ? m : acc[l];
  for (; j < n; ++j) m = m > x[j] ? m : x[j];
  return m;
}

VLMO_INLINE float row_sum(const float* x, int64_t n) {
  Vec16 acc = {};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) acc += vload(x + j);
  float s = hsum(acc);
  for (; j < n; ++j) s += x[j];
  return s;
}

VLMO_INLINE float row_dot(const float* x, const float* y, int64_t n) {
  Vec16 acc = {};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) acc += vload(x + j) * vload(y + j);
  float s = hsum(acc);
  for (; j < n; ++j) s += x[j] * y[j];
  return s;
}

typedef int32_t Vec16i __attribute__((vector_size(64)));

// exp over 16 floats: exp(x) = 2^n · e^r with n = round(x / ln 2), |r| <= ln 2 / 2, e^r = 1 + r + r²·P(r) with the
// classic Cephes degree-5 P (relative error ~1e-7, about 1 ulp). Exactly 0 below -87.3 (so -inf, a masked logit,
// gives 0; the true value there is below FLT_MIN anyway); arguments are clamped at 88 (the kernels only pass
// x <= 0). Pure vector arithmetic, so it compiles to straight-line SIMD in every clone.
VLMO_INLINE Vec16 exp_approx(Vec16 x) {
  const Vec16 lo = vsplat(-87.3f), hi = vsplat(88.0f);
  Vec16 xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const Vec16 nf = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest (1.5·2^23)
  Vec16 r = xc - nf * 0.693359375f;                                            // ln 2 split in two parts
  r = r - nf * -2.12194440e-4f;
  Vec16 p = vsplat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const Vec16i bits = (__builtin_convertvector(nf, Vec16i) + 127) << 23;
  Vec16 two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  const Vec16 y = p * two_n;
  return x < lo ? Vec16{} : y;
}

VLMO_INLINE void vstore(float* p, Vec16 v) { std::memcpy(p, &v, sizeof(v)); }

// 16 elements of any storage type <-> 16 fp32 lanes, in vector arithmetic (the same bit manipulations as the
// scalar conversions above), so rows of fp16/bf16 vectorize too.
typedef uint32_t Vec16u __attribute__((vector_size(64)));
typedef uint16_t Vec16h __attribute__((vector_size(32)));

VLMO_INLINE Vec16 bits_as_float(Vec16u u) {
  Vec16 f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

VLMO_INLINE Vec16u float_as_bits(Vec16 f) {
  Vec16u u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

template <int DT>
VLMO_INLINE Vec16 vload_as_float(const typename Elem<DT>::T* p) {
  if constexpr (DT == kF32) {
    return vload(p);
  } else {
    Vec16h h;
    std::memcpy(&h, p, sizeof(h));
    const Vec16u u = __builtin_convertvector(h, Vec16u);
    if constexpr (DT == kBF16) {
      return bits_as_float(u << 16);
    } else {
      const Vec16u sign = (u & 0x8000u) << 16;
      const Vec16u mag = u & 0x7fffu;
      const Vec16u finite = float_as_bits(bits_as_float(mag << 13) * 5.192296858534828e+33f);  // 2^112
      const Vec16u special = (mag << 13) | 0x7f800000u;
      return bits_as_float((mag >= 0x7c00u ? special : finite) | sign);
    }
  }
}

template <int DT>
VLMO_INLINE void vstore_from_float(typename Elem<DT>::T* p, Vec16 v) {
  if constexpr (DT == kF32) {
    vstore(p, v);
  } else {
    Vec16u u = float_as_bits(v);
    Vec16u h;
    if constexpr (DT == kBF16) {
      const Vec16u rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
      h = (u & 0x7fffffffu) > 0x7f800000u ? ((u >> 16) | 0x40u) : rounded;
    } else {
      const Vec16u sign = (u >> 16) & 0x8000u;
      u &= 0x7fffffffu;
      const Vec16u sub = float_as_bits(bits_as_float(u) + 0.5f) - 0x3f000000u;
      const Vec16u norm = (u + 0xc8000fffu + ((u >> 13) & 1u)) >> 13;
      h = u < 0x38800000u ? sub : norm;
      h = u >= 0x477ff000u ? Vec16u{} + 0x7c00u : h;
      h = u > 0x7f800000u ? Vec16u{} + 0x7e00u : h;
      h |= sign;
    }
    const Vec16h out = __builtin_convertvector(h, Vec16h);
    std::memcpy(p, &out, sizeof(out));
  }
}

// Σ (x - c)², for the two-pass variance.
VLMO_INLINE float row_centered_sq(const float* x, float c, int64_t n) {
  Vec16 acc = {};
  const Vec16 cv = vsplat(c);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const Vec16 d = vload(x + j) - cv;
    acc += d * d;
  }
  float s = hsum(acc);
  for (; j < n; ++j) s += (x[j] - c) * (x[j] - c);
  return s;
}

}  // namespace cpu
}  // namespace vlmo_fast
