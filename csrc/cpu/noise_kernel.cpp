#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <vector>

#include "../checks.h"
#include "../philox.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define DDRS_X86 1
#include <immintrin.h>
#else
#define DDRS_X86 0
#endif

namespace ddrs {
namespace {

// Elements per work item: large enough to amortise the bookkeeping, small
// enough that its Gaussians stay in L1 between generation and use.
constexpr int64_t kTile = 2048;

// Gaussians of counter blocks [block0, block0 + nblocks) of (stream, sample) into
// out[0 .. 4 * nblocks). Two implementations with bit-identical results (integer
// Philox is exact; the float maths has no FMA contraction, see philox.h).
void fill_gaussian_generic(PhiloxKey key, uint32_t stream, uint64_t sample, uint32_t block0,
                           int64_t nblocks, float* __restrict__ out) {
  for (int64_t q = 0; q < nblocks; ++q) {
    const Gauss4 g = gaussian_block(key, stream, sample, block0 + static_cast<uint32_t>(q));
    out[4 * q + 0] = g.z0;
    out[4 * q + 1] = g.z1;
    out[4 * q + 2] = g.z2;
    out[4 * q + 3] = g.z3;
  }
}

#if DDRS_X86
// 32 x 32 -> 64-bit products of eight lanes: even lanes directly, odd lanes after
// a shift, then the halves blended back into lane order.
__attribute__((target("avx2"))) inline void mulhilo8(__m256i a, __m256i m, __m256i* hi, __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// GCC's own vectorisation of philox4x32_10 spends most of its time shuffling
// 64-bit products; this keeps four 8-lane Philox streams in flight instead
// (enough independent work to hide the multiply latency).
__attribute__((target("avx2"))) void fill_gaussian_avx2(PhiloxKey key, uint32_t stream, uint64_t sample,
                                                        uint32_t block0, int64_t nblocks,
                                                        float* __restrict__ out) {
  constexpr int kLanes = 8, kUnroll = 4, kStep = kLanes * kUnroll, kChunk = 512;
  alignas(32) uint32_t w[4][kChunk];
  alignas(32) float z[4][kChunk];
  const __m256i M0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i M1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i C1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(sample)));
  const __m256i C2 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(sample >> 32)));
  const __m256i C3 = _mm256_set1_epi32(static_cast<int>(stream));
  for (int64_t base = 0; base < nblocks; base += kChunk) {
    const int64_t n = std::min<int64_t>(kChunk, nblocks - base);
    for (int64_t q = 0; q < n; q += kStep) {  // may run past n into the slack of w
      __m256i c0[kUnroll], c1[kUnroll], c2[kUnroll], c3[kUnroll];
      for (int u = 0; u < kUnroll; ++u) {
        const uint32_t first = block0 + static_cast<uint32_t>(base + q + kLanes * u);
        c0[u] = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(first)), lane);
        c1[u] = C1;
        c2[u] = C2;
        c3[u] = C3;
      }
      uint32_t k0 = key.k0, k1 = key.k1;
      for (int round = 0; round < 10; ++round) {
        const __m256i K0 = _mm256_set1_epi32(static_cast<int>(k0));
        const __m256i K1 = _mm256_set1_epi32(static_cast<int>(k1));
        for (int u = 0; u < kUnroll; ++u) {
          __m256i hi0, lo0, hi1, lo1;
          mulhilo8(c0[u], M0, &hi0, &lo0);
          mulhilo8(c2[u], M1, &hi1, &lo1);
          c0[u] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[u]), K0);
          c1[u] = lo1;
          c2[u] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[u]), K1);
          c3[u] = lo0;
        }
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
      }
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t at = q + kLanes * u;
        _mm256_store_si256(reinterpret_cast<__m256i*>(&w[0][at]), c0[u]);
        _mm256_store_si256(reinterpret_cast<__m256i*>(&w[1][at]), c1[u]);
        _mm256_store_si256(reinterpret_cast<__m256i*>(&w[2][at]), c2[u]);
        _mm256_store_si256(reinterpret_cast<__m256i*>(&w[3][at]), c3[u]);
      }
    }
    for (int64_t q = 0; q < n; ++q) {  // vectorised by the compiler
      box_muller(w[0][q], w[1][q], &z[0][q], &z[1][q]);
      box_muller(w[2][q], w[3][q], &z[2][q], &z[3][q]);
    }
    float* o = out + 4 * base;
    for (int64_t q = 0; q < n; ++q) {
      o[4 * q + 0] = z[0][q];
      o[4 * q + 1] = z[1][q];
      o[4 * q + 2] = z[2][q];
      o[4 * q + 3] = z[3][q];
    }
  }
}

bool use_avx2() {
  static const bool yes = [] {
    const char* force = std::getenv("DDRS_EXT_CPU_GENERIC");
    return __builtin_cpu_supports("avx2") && !(force != nullptr && force[0] == '1');
  }();
  return yes;
}
#endif

void fill_gaussian(PhiloxKey key, uint32_t stream, uint64_t sample, uint32_t block0, int64_t nblocks,
                   float* out) {
#if DDRS_X86
  if (use_avx2()) return fill_gaussian_avx2(key, stream, sample, block0, nblocks, out);
#endif
  fill_gaussian_generic(key, stream, sample, block0, nblocks, out);
}

template <typename scalar_t>
void perturb_rows(const scalar_t* x, const double* sigma, const int64_t* stream, uint64_t seed,
                  int64_t sample_offset, int64_t m, int64_t row_start, int64_t num_rows, int64_t D,
                  scalar_t* out, double* sq_norm) {
  using opmath_t = at::opmath_type<scalar_t>;
  const PhiloxKey key = philox_key(seed);
  const int64_t tiles = (D + kTile - 1) / kTile;
  const int64_t items = num_rows * tiles;
  std::vector<double> partial(sq_norm != nullptr ? items : 0);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::min(D, kTile));
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    alignas(64) float z[kTile];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / tiles, t = item % tiles;
      const int64_t g = row_start + r;
      const int64_t b = g / m;
      const uint64_t sample = static_cast<uint64_t>(sample_offset) + static_cast<uint64_t>(g % m);
      const int64_t j0 = t * kTile, len = std::min(kTile, D - j0);
      fill_gaussian(key, static_cast<uint32_t>(stream[b]), sample, static_cast<uint32_t>(j0 / 4),
                    (len + 3) / 4, z);
      const scalar_t* xb = x + b * D + j0;
      scalar_t* o = out + r * D + j0;
      const opmath_t s = static_cast<opmath_t>(sigma[b]);
      for (int64_t j = 0; j < len; ++j) {
        o[j] = static_cast<scalar_t>(static_cast<opmath_t>(xb[j]) + s * static_cast<opmath_t>(z[j]));
      }
      if (sq_norm != nullptr) {
        double acc = 0.0;
        for (int64_t j = 0; j < len; ++j) acc += static_cast<double>(z[j]) * z[j];
        partial[item] = acc;
      }
    }
  });
  if (sq_norm != nullptr) {
    // Fixed summation order over tiles: the result does not depend on threads.
    for (int64_t r = 0; r < num_rows; ++r) {
      double acc = 0.0;
      for (int64_t t = 0; t < tiles; ++t) acc += partial[r * tiles + t];
      sq_norm[r] = acc;
    }
  }
}

void perturb_gaussian_out_cpu(const at::Tensor& x, const at::Tensor& sigma, const at::Tensor& stream,
                              int64_t seed, int64_t sample_offset, int64_t samples_per_input,
                              int64_t row_start, const at::Tensor& out,
                              const std::optional<at::Tensor>& sq_norm) {
  const int64_t num_rows = out.dim() >= 1 ? out.size(0) : 0;
  const RowPlan plan = check_perturb_args(x, sigma, stream, sample_offset, samples_per_input, row_start,
                                          num_rows);
  check_perturb_out(x, out, sq_norm, num_rows);
  TORCH_INTERNAL_ASSERT(x.device().is_cpu());
  if (num_rows == 0 || plan.sample_dim == 0) {
    if (sq_norm.has_value()) sq_norm->zero_();
    return;
  }
  const at::Tensor xc = x.contiguous();
  const at::Tensor sc = sigma.to(at::kDouble).contiguous();
  const at::Tensor stc = stream.contiguous();
  const int64_t* st = stc.data_ptr<int64_t>();
  for (int64_t b = 0; b < plan.num_inputs; ++b) {
    TORCH_CHECK_VALUE(st[b] >= 0 && st[b] <= int64_t{0xFFFFFFFF},
                      "perturb_gaussian: stream ids must lie in [0, 2^32), got ", st[b], " for input ", b);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "perturb_gaussian_cpu", [&] {
    perturb_rows<scalar_t>(xc.const_data_ptr<scalar_t>(), sc.const_data_ptr<double>(), st,
                           static_cast<uint64_t>(seed), sample_offset, samples_per_input, row_start,
                           num_rows, plan.sample_dim, out.mutable_data_ptr<scalar_t>(),
                           sq_norm.has_value() ? sq_norm->mutable_data_ptr<double>() : nullptr);
  });
}

std::tuple<at::Tensor, at::Tensor> perturb_gaussian_cpu(const at::Tensor& x, const at::Tensor& sigma,
                                                        const at::Tensor& stream, int64_t seed,
                                                        int64_t sample_offset, int64_t samples_per_input,
                                                        int64_t row_start, int64_t num_rows,
                                                        bool with_sq_norm) {
  check_perturb_args(x, sigma, stream, sample_offset, samples_per_input, row_start, num_rows);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[0] = num_rows;
  at::Tensor out = at::empty(shape, x.options());
  at::Tensor sq = at::empty({with_sq_norm ? num_rows : 0}, x.options().dtype(at::kDouble));
  perturb_gaussian_out_cpu(x, sigma, stream, seed, sample_offset, samples_per_input, row_start, out,
                           with_sq_norm ? std::optional<at::Tensor>(sq) : std::nullopt);
  return {out, sq};
}

// Any device: the counters are copied to the host, the words back to their device.
at::Tensor philox4x32_10_any(const at::Tensor& counters, int64_t seed) {
  TORCH_CHECK_TYPE(counters.scalar_type() == at::kLong, "philox4x32_10: counters must be int64");
  TORCH_CHECK_VALUE(counters.dim() == 2 && counters.size(1) == 4,
                    "philox4x32_10: counters must have shape (N, 4), got ", counters.sizes());
  const at::Tensor c = counters.cpu().contiguous();
  at::Tensor words = at::empty_like(c);
  const int64_t* in = c.const_data_ptr<int64_t>();
  int64_t* out = words.mutable_data_ptr<int64_t>();
  const PhiloxKey key = philox_key(static_cast<uint64_t>(seed));
  for (int64_t i = 0; i < c.size(0); ++i) {
    const int64_t* ci = in + 4 * i;
    for (int k = 0; k < 4; ++k) {
      TORCH_CHECK_VALUE(ci[k] >= 0 && ci[k] <= int64_t{0xFFFFFFFF},
                        "philox4x32_10: counter words must lie in [0, 2^32)");
    }
    const Words4 w = philox4x32_10(static_cast<uint32_t>(ci[0]), static_cast<uint32_t>(ci[1]),
                                   static_cast<uint32_t>(ci[2]), static_cast<uint32_t>(ci[3]), key);
    out[4 * i + 0] = w.w0;
    out[4 * i + 1] = w.w1;
    out[4 * i + 2] = w.w2;
    out[4 * i + 3] = w.w3;
  }
  return words.to(counters.device());
}

}  // namespace

TORCH_LIBRARY_IMPL(ddrs_ext, CompositeExplicitAutograd, m) {
  m.impl("philox4x32_10", &philox4x32_10_any);
}

TORCH_LIBRARY_IMPL(ddrs_ext, CPU, m) {
  m.impl("perturb_gaussian", &perturb_gaussian_cpu);
  m.impl("perturb_gaussian_out", &perturb_gaussian_out_cpu);
}

}  // namespace ddrs
