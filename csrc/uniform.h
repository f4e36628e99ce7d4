// Counter-based uniform noise on [-1, 1] shared by the CPU and CUDA kernels (the l1 certificate).
//
// RNG contract (docs/mathematics.md, "Random numbers"): the uniform value for element j of sample i of input
// stream s under a 64-bit seed is
//     w = Philox4x32-10(counter = (j / 4, lo32(i), hi32(i), s), key = uniform_key(seed))
//     u = (2 * (w[j % 4] >> 8) - (2^24 - 1)) * 2^-24
// The counters are the Gaussian noise's (philox.h); the key is not: uniform_key is a bijective
// mix (a splitmix64 step) of the seed XOR a constant, so uniform and Gaussian noise drawn under
// the same seed come from Philox under two unrelated keys, independent streams. (Sharing the key
// would make u_j a function of the very words behind the Gaussian z_j of the same element.)
//
// u takes the 2^24 values (2k + 1) / 2^24 - 1, k = 0 .. 2^24 - 1: the midpoints of 2^24 equal
// cells of [-1, 1], symmetric about 0 (mean exactly 0), never +-1. Every step is exact in float
// (an integer below 2^24 and a power-of-two scale), so CPU and CUDA agree bit for bit.
#pragma once

#include <stdint.h>

#include "philox.h"

namespace ddrs {

// Mixed into the seed before the splitmix64 step: e's fractional bits, a nothing-up-my-sleeve number.
constexpr uint64_t kUniformKeyTweak = 0xB7E151628AED2A6Aull;

DDRS_HD PhiloxKey uniform_key(uint64_t seed) {
  uint64_t z = (seed ^ kUniformKeyTweak) + 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return philox_key(z ^ (z >> 31));
}

// One Philox word to a uniform value on [-1, 1] (see above).
DDRS_HD float uniform_from_word(uint32_t w) {
  const int32_t odd = static_cast<int32_t>((w >> 8) << 1) - 0x00FFFFFF;  // odd, |odd| < 2^24
  return static_cast<float>(odd) * 5.9604644775390625e-8f;               // 2^-24
}

// The four uniforms of counter block `block` of (stream, sample), under a key from uniform_key.
struct Uniform4 {
  float z0, z1, z2, z3;
};

DDRS_HD Uniform4 uniform_block(PhiloxKey key, uint32_t stream, uint64_t sample, uint32_t block) {
  const Words4 w = philox4x32_10(block, static_cast<uint32_t>(sample),
                                 static_cast<uint32_t>(sample >> 32), stream, key);
  return Uniform4{uniform_from_word(w.w0), uniform_from_word(w.w1), uniform_from_word(w.w2),
                  uniform_from_word(w.w3)};
}

}  // namespace ddrs
