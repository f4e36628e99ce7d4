// Counter-based Gaussian noise shared by the CPU and CUDA kernels.
//
// RNG contract (docs/mathematics.md, "Random numbers"): the Gaussian value for element j of
// sample i of input stream s under a 64-bit seed is
//     w = Philox4x32-10(counter = (j / 4, lo32(i), hi32(i), s), key = (lo32(seed), hi32(seed)))
//     (z0, z1) = box_muller(w[0], w[1]),  (z2, z3) = box_muller(w[2], w[3]),  value = z[j % 4].
// It depends on nothing else: not the batch, the chunking, the threads or the device.
//
// Everything below uses only IEEE +, -, *, / and sqrt, which CPUs and GPUs round
// identically, so CPU and CUDA produce the same bits as long as neither side fuses
// multiply-adds (built with -ffp-contract=off and nvcc --fmad=false). That is
// also why log and sin/cos are written out here instead of calling libm, whose
// results differ between glibc, Sleef and CUDA by an ulp or so; and branch-free
// code lets the compiler vectorise the CPU loop.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define DDRS_HD __host__ __device__ __forceinline__
#else
#define DDRS_HD inline
#endif

namespace ddrs {

struct PhiloxKey {
  uint32_t k0, k1;
};

DDRS_HD PhiloxKey philox_key(uint64_t seed) {
  return PhiloxKey{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
}

struct Words4 {
  uint32_t w0, w1, w2, w3;
};

// Philox4x32 with 10 rounds (Salmon et al., SC'11), as in Random123 and numpy-compatible
// generators such as randomgen's Philox(number=4, width=32).
DDRS_HD Words4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, PhiloxKey key) {
  const uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
  const uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
  uint32_t k0 = key.k0, k1 = key.k1;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(M0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(M1) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += W0;
    k1 += W1;
  }
  return Words4{c0, c1, c2, c3};
}

DDRS_HD float bits_to_float(uint32_t u) {
  union {
    uint32_t u;
    float f;
  } v;
  v.u = u;
  return v.f;
}

DDRS_HD uint32_t float_to_bits(float f) {
  union {
    uint32_t u;
    float f;
  } v;
  v.f = f;
  return v.u;
}

// Natural log for u in (0, 1]: u = 2^e * m with m in [sqrt(1/2), sqrt(2)) (found
// without branches by offsetting the bits so that the exponent carries exactly
// when the mantissa passes sqrt(2)), log m = 2 atanh(s), s = (m - 1) / (m + 1),
// |s| < 0.172, series to s^9 (truncation below 3e-9 relative; float's ulp is 6e-8).
DDRS_HD float log_unit(float u) {
  const uint32_t ix = float_to_bits(u) + (0x3F800000u - 0x3F3504F3u);
  const int32_t e = static_cast<int32_t>(ix >> 23) - 127;
  const float m = bits_to_float((ix & 0x007FFFFFu) + 0x3F3504F3u);
  const float s = (m - 1.0f) / (m + 1.0f);
  const float s2 = s * s;
  const float series =
      1.0f + s2 * (1.0f / 3.0f + s2 * (1.0f / 5.0f + s2 * (1.0f / 7.0f + s2 * (1.0f / 9.0f))));
  // ln 2 split into a part that is exact times e (|e| <= 33) and a small remainder.
  const float ln2_hi = 0.693145751953125f, ln2_lo = 1.42860682030941723212e-6f;
  const float fe = static_cast<float>(e);
  return (fe * ln2_hi + 2.0f * s * series) + fe * ln2_lo;
}

// cos and sin of the angle (b >> 8) * 2^-24 turns. The reduction to the nearest
// quarter turn is exact in integers; then Taylor series in the remaining fraction
// f of a quarter turn, |f| <= 1/2 (coefficients (pi/2)^n / n!; truncation below 2e-9).
DDRS_HD void sincos_turns(uint32_t b, float* c_out, float* s_out) {
  const int32_t v = static_cast<int32_t>(b >> 8);                        // units of 2^-22 quarter turns
  const int32_t k = (v + (1 << 21)) >> 22;                                 // nearest quarter turn, 0..4
  const float f = static_cast<float>(v - k * (1 << 22)) * 2.384185791015625e-7f;  // exact, [-1/2, 1/2)
  const float f2 = f * f;
  const float s =
      f * (1.57079632679489662f +
           f2 * (-0.645964097506246254f +
                 f2 * (0.0796926262461670451f + f2 * (-0.00468175413531868810f + f2 * 0.000160441184787159560f))));
  const float c =
      1.0f + f2 * (-1.23370055013616983f +
                   f2 * (0.253669507901048014f +
                         f2 * (-0.0208634807633529609f +
                               f2 * (0.000919260274839426020f + f2 * -0.0000252020423730606054f))));
  const uint32_t q = static_cast<uint32_t>(k);
  // Rotate (c, s) by q quarter turns: swap for odd q, then flip signs by bit operations.
  const bool odd = (q & 1u) != 0;
  const float x = odd ? s : c, y = odd ? c : s;
  *c_out = bits_to_float(float_to_bits(x) ^ (((q + 1u) & 2u) << 30));  // negative for q = 1, 2
  *s_out = bits_to_float(float_to_bits(y) ^ ((q & 2u) << 30));         // negative for q = 2, 3
}

// Box-Muller: two uniform words to two independent standard normals.
// u1 = (a >> 1) * 2^-31 + 2^-32 lies in (0, 1], so log u1 is finite (|z| <= 6.66).
DDRS_HD void box_muller(uint32_t a, uint32_t b, float* z0, float* z1) {
  const float u1 = static_cast<float>(static_cast<int32_t>(a >> 1)) * 4.656612873077392578e-10f +
                   2.3283064365386963e-10f;
  const float r = sqrtf(-2.0f * log_unit(u1));
  float c, s;
  sincos_turns(b, &c, &s);
  *z0 = r * c;
  *z1 = r * s;
}

// The four Gaussians of counter block `block` of (stream, sample).
struct Gauss4 {
  float z0, z1, z2, z3;
};

DDRS_HD Gauss4 gaussian_block(PhiloxKey key, uint32_t stream, uint64_t sample, uint32_t block) {
  const Words4 w = philox4x32_10(block, static_cast<uint32_t>(sample),
                                 static_cast<uint32_t>(sample >> 32), stream, key);
  Gauss4 g;
  box_muller(w.w0, w.w1, &g.z0, &g.z1);
  box_muller(w.w2, w.w3, &g.z2, &g.z3);
  return g;
}

}  // namespace ddrs
