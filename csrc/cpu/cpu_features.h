// What the CPU can run, for the kernels' AVX2 paths (checked once, at first use).
#pragma once

#include <cstdlib>

#define DDRS_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__) && defined(__GNUC__)
#define DDRS_X86 1
#include <immintrin.h>
#else
#define DDRS_X86 0
#endif

namespace ddrs {

#if DDRS_X86
// DDRS_EXT_CPU_GENERIC=1 forces the portable code paths (which give the same results).
inline bool use_avx2() {
  static const bool yes = [] {
    const char* force = std::getenv("DDRS_EXT_CPU_GENERIC");
    return __builtin_cpu_supports("avx2") && !(force != nullptr && force[0] == '1');
  }();
  return yes;
}
#endif

}  // namespace ddrs
