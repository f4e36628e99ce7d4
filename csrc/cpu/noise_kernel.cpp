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
#include "../uniform.h"
#include "cpu_features.h"

namespace ddrs {
namespace {

// Counter blocks (4 Gaussians each) per work item: enough to amortise the
// bookkeeping, few enough that the item's Gaussians stay in L1.
constexpr int64_t kItemBlocks = 512;
// Rows longer than this many elements are cut into tiles of exactly this size;
// ||eps||^2 is summed tile by tile, so its rounding never depends on chunking.
constexpr int64_t kTile = 4 * kItemBlocks;

// The counters of up to kItemBlocks Philox blocks, one array per counter word.
struct Counters {
  alignas(32) uint32_t c0[kItemBlocks];
  alignas(32) uint32_t c1[kItemBlocks];
  alignas(32) uint32_t c2[kItemBlocks];
  alignas(32) uint32_t c3[kItemBlocks];
};

// The noise values of up to kItemBlocks blocks, word by word: z[w][i] is word w of block i.
struct Gauss {
  alignas(32) float z[4][kItemBlocks];
};

// The two noise families: how a seed becomes a Philox key and four words become four values.
// Everything else (counters, rows, tiles, threads) is the same for both.
struct GaussianNoise {
  static constexpr const char* kName = "perturb_gaussian";
  static PhiloxKey key(uint64_t seed) { return philox_key(seed); }
  static DDRS_INLINE void values(uint32_t a, uint32_t b, uint32_t c, uint32_t d, float* z0, float* z1, float* z2,
                                 float* z3) {
    box_muller(a, b, z0, z1);
    box_muller(c, d, z2, z3);
  }
};

struct UniformNoise {
  static constexpr const char* kName = "perturb_uniform";
  static PhiloxKey key(uint64_t seed) { return uniform_key(seed); }
  static DDRS_INLINE void values(uint32_t a, uint32_t b, uint32_t c, uint32_t d, float* z0, float* z1, float* z2,
                                 float* z3) {
    *z0 = uniform_from_word(a);
    *z1 = uniform_from_word(b);
    *z2 = uniform_from_word(c);
    *z3 = uniform_from_word(d);
  }
};

// Noise values of blocks [0, n) of `ctr` into g.z[word][i]. Two implementations
// with bit-identical results (integer Philox is exact; the float maths has no
// FMA contraction, see philox.h).
template <typename Family>
void values_generic(PhiloxKey key, const Counters& ctr, int64_t n, Gauss& g) {
  for (int64_t i = 0; i < n; ++i) {
    const Words4 w = philox4x32_10(ctr.c0[i], ctr.c1[i], ctr.c2[i], ctr.c3[i], key);
    Family::values(w.w0, w.w1, w.w2, w.w3, &g.z[0][i], &g.z[1][i], &g.z[2][i], &g.z[3][i]);
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
// (enough independent work to hide the multiply latency). The words-to-values
// transform (Box-Muller, or the uniform scaling) is left to the compiler, which
// vectorises it in this AVX2 function.
template <typename Family>
__attribute__((target("avx2"))) void values_avx2(PhiloxKey key, const Counters& ctr, int64_t n, Gauss& g) {
  constexpr int kLanes = 8, kUnroll = 4, kStep = kLanes * kUnroll;
  alignas(32) uint32_t w[4][kItemBlocks];
  const __m256i M0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i M1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  for (int64_t q = 0; q < n; q += kStep) {  // may run past n into the slack of the arrays
    __m256i c0[kUnroll], c1[kUnroll], c2[kUnroll], c3[kUnroll];
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t at = q + kLanes * u;
      c0[u] = _mm256_load_si256(reinterpret_cast<const __m256i*>(ctr.c0 + at));
      c1[u] = _mm256_load_si256(reinterpret_cast<const __m256i*>(ctr.c1 + at));
      c2[u] = _mm256_load_si256(reinterpret_cast<const __m256i*>(ctr.c2 + at));
      c3[u] = _mm256_load_si256(reinterpret_cast<const __m256i*>(ctr.c3 + at));
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
  for (int64_t i = 0; i < n; ++i) {  // vectorised by the compiler
    Family::values(w[0][i], w[1][i], w[2][i], w[3][i], &g.z[0][i], &g.z[1][i], &g.z[2][i], &g.z[3][i]);
  }
}

#endif

// out[j] = x[j] + sigma * z[j] for j < len (z in element order).
template <typename scalar_t>
DDRS_INLINE void write_row(const scalar_t* __restrict__ x, double sigma, const float* __restrict__ z, int64_t len,
                           scalar_t* __restrict__ out, double* sq_norm_partial) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t s = static_cast<opmath_t>(sigma);
  for (int64_t j = 0; j < len; ++j) {
    out[j] = static_cast<scalar_t>(static_cast<opmath_t>(x[j]) + s * static_cast<opmath_t>(z[j]));
  }
  if (sq_norm_partial != nullptr) {
    double acc = 0.0;
    for (int64_t j = 0; j < len; ++j) acc += static_cast<double>(z[j]) * z[j];
    *sq_norm_partial = acc;
  }
}

// The same from word-major Gaussians: eps[j] = word j % 4 of block i0 + j / 4.
// Interleaving while writing saves a pass on long rows.
template <typename scalar_t>
DDRS_INLINE void write_row(const scalar_t* __restrict__ x, double sigma, const Gauss& g, int64_t i0,
                           int64_t len, scalar_t* __restrict__ out, double* sq_norm_partial) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t s = static_cast<opmath_t>(sigma);
  const float* __restrict__ z0 = g.z[0] + i0;
  const float* __restrict__ z1 = g.z[1] + i0;
  const float* __restrict__ z2 = g.z[2] + i0;
  const float* __restrict__ z3 = g.z[3] + i0;
  const int64_t full = len / 4;
  for (int64_t q = 0; q < full; ++q) {  // vectorised, interleaving the four words
    out[4 * q + 0] = static_cast<scalar_t>(static_cast<opmath_t>(x[4 * q + 0]) + s * static_cast<opmath_t>(z0[q]));
    out[4 * q + 1] = static_cast<scalar_t>(static_cast<opmath_t>(x[4 * q + 1]) + s * static_cast<opmath_t>(z1[q]));
    out[4 * q + 2] = static_cast<scalar_t>(static_cast<opmath_t>(x[4 * q + 2]) + s * static_cast<opmath_t>(z2[q]));
    out[4 * q + 3] = static_cast<scalar_t>(static_cast<opmath_t>(x[4 * q + 3]) + s * static_cast<opmath_t>(z3[q]));
  }
  const float* words[4] = {z0, z1, z2, z3};
  for (int64_t j = 4 * full; j < len; ++j) {
    out[j] = static_cast<scalar_t>(static_cast<opmath_t>(x[j]) + s * static_cast<opmath_t>(words[j & 3][full]));
  }
  if (sq_norm_partial != nullptr) {
    double acc = 0.0;  // in element order, whatever the layout
    for (int64_t j = 0; j < len; ++j) {
      const double v = words[j & 3][j >> 2];
      acc += v * v;
    }
    *sq_norm_partial = acc;
  }
}

// Walks rows g = row_start + r of the virtual batch in order, tracking input
// b = g / m and sample k = g % m without a division per row.
class RowCursor {
 public:
  RowCursor(const int64_t* stream, int64_t sample_offset, int64_t m, int64_t g)
      : stream_(stream), offset_(static_cast<uint64_t>(sample_offset)), m_(m), b_(g / m), k_(g % m) {}
  int64_t input() const { return b_; }
  uint32_t stream() const { return static_cast<uint32_t>(stream_[b_]); }
  uint64_t sample() const { return offset_ + static_cast<uint64_t>(k_); }
  void next() {
    if (++k_ == m_) {
      k_ = 0;
      ++b_;
    }
  }

 private:
  const int64_t* stream_;
  uint64_t offset_;
  int64_t m_, b_, k_;
};

template <typename scalar_t>
struct Job {
  const scalar_t* x;
  const double* sigma;
  const int64_t* stream;
  PhiloxKey key;
  int64_t sample_offset, m, row_start, num_rows, D;
  scalar_t* out;
  double* sq_norm;  // per row (short rows) or per (row, tile) (long rows); may be null
};

template <typename Family, bool kAvx2>
DDRS_INLINE void noise_values(PhiloxKey key, const Counters& ctr, int64_t n, Gauss& g) {
#if DDRS_X86
  if constexpr (kAvx2) return values_avx2<Family>(key, ctr, n, g);
#endif
  values_generic<Family>(key, ctr, n, g);
}

// Short rows: each work item takes whole rows, as many as fill its blocks.
template <typename scalar_t, typename Family, bool kAvx2>
DDRS_INLINE void short_row_items(const Job<scalar_t>& job, int64_t rows_per_item, int64_t begin, int64_t end) {
  const int64_t D = job.D, blocks_per_row = (D + 3) / 4;
  Counters ctr;
  Gauss g;
  alignas(64) float z[4 * kItemBlocks];
  for (int64_t item = begin; item < end; ++item) {
    const int64_t r0 = item * rows_per_item, r1 = std::min(job.num_rows, r0 + rows_per_item);
    RowCursor cursor(job.stream, job.sample_offset, job.m, job.row_start + r0);
    for (int64_t r = r0; r < r1; ++r, cursor.next()) {
      const uint64_t sample = cursor.sample();
      const uint32_t lo = static_cast<uint32_t>(sample), hi = static_cast<uint32_t>(sample >> 32);
      const uint32_t st = cursor.stream();
      const int64_t at = (r - r0) * blocks_per_row;
      for (int64_t q = 0; q < blocks_per_row; ++q) {
        ctr.c0[at + q] = static_cast<uint32_t>(q);
        ctr.c1[at + q] = lo;
        ctr.c2[at + q] = hi;
        ctr.c3[at + q] = st;
      }
    }
    const int64_t n = (r1 - r0) * blocks_per_row;
    noise_values<Family, kAvx2>(job.key, ctr, n, g);
    // Short rows: one interleaving pass over the item beats one per row.
    for (int64_t i = 0; i < n; ++i) {
      z[4 * i + 0] = g.z[0][i];
      z[4 * i + 1] = g.z[1][i];
      z[4 * i + 2] = g.z[2][i];
      z[4 * i + 3] = g.z[3][i];
    }
    RowCursor rows(job.stream, job.sample_offset, job.m, job.row_start + r0);
    for (int64_t r = r0; r < r1; ++r, rows.next()) {
      const int64_t b = rows.input();
      write_row(job.x + b * D, job.sigma[b], z + 4 * (r - r0) * blocks_per_row, D, job.out + r * D,
                job.sq_norm != nullptr ? job.sq_norm + r : nullptr);
    }
  }
}

// Long rows: one work item per (row, tile).
template <typename scalar_t, typename Family, bool kAvx2>
DDRS_INLINE void long_row_items(const Job<scalar_t>& job, int64_t tiles, int64_t begin, int64_t end) {
  Counters ctr;
  Gauss g;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t r = item / tiles, t = item % tiles;
    const RowCursor row(job.stream, job.sample_offset, job.m, job.row_start + r);
    const uint64_t sample = row.sample();
    const int64_t j0 = t * kTile, len = std::min(kTile, job.D - j0);
    const int64_t n = (len + 3) / 4;
    for (int64_t q = 0; q < n; ++q) {
      ctr.c0[q] = static_cast<uint32_t>(j0 / 4 + q);
      ctr.c1[q] = static_cast<uint32_t>(sample);
      ctr.c2[q] = static_cast<uint32_t>(sample >> 32);
      ctr.c3[q] = row.stream();
    }
    noise_values<Family, kAvx2>(job.key, ctr, n, g);
    const int64_t b = row.input();
    write_row(job.x + b * job.D + j0, job.sigma[b], g, 0, len, job.out + r * job.D + j0,
              job.sq_norm != nullptr ? job.sq_norm + item : nullptr);
  }
}

// The item loops compiled twice, so that the counter set-up, the words-to-values
// transform and the final x + sigma * z also use AVX2 where the CPU has it.
template <typename scalar_t, typename Family>
void run_items(const Job<scalar_t>& job, bool short_rows, int64_t per, int64_t begin, int64_t end) {
  if (short_rows) {
    short_row_items<scalar_t, Family, false>(job, per, begin, end);
  } else {
    long_row_items<scalar_t, Family, false>(job, per, begin, end);
  }
}

#if DDRS_X86
template <typename scalar_t, typename Family>
__attribute__((target("avx2"))) void run_items_avx2(const Job<scalar_t>& job, bool short_rows, int64_t per,
                                                    int64_t begin, int64_t end) {
  if (short_rows) {
    short_row_items<scalar_t, Family, true>(job, per, begin, end);
  } else {
    long_row_items<scalar_t, Family, true>(job, per, begin, end);
  }
}
#endif

template <typename scalar_t, typename Family>
void perturb_rows(const scalar_t* x, const double* sigma, const int64_t* stream, uint64_t seed,
                  int64_t sample_offset, int64_t m, int64_t row_start, int64_t num_rows, int64_t D,
                  scalar_t* out, double* sq_norm) {
  Job<scalar_t> job{x, sigma, stream, Family::key(seed), sample_offset, m, row_start, num_rows, D, out, sq_norm};
  const int64_t blocks_per_row = (D + 3) / 4;
  const bool short_rows = blocks_per_row <= kItemBlocks;
  // Short rows: rows per item; long rows: tiles per row.
  const int64_t per = short_rows ? kItemBlocks / blocks_per_row : (D + kTile - 1) / kTile;
  const int64_t items = short_rows ? (num_rows + per - 1) / per : num_rows * per;
  std::vector<double> partial(sq_norm != nullptr && !short_rows ? items : 0);
  if (!partial.empty()) job.sq_norm = partial.data();
  const int64_t grain = short_rows ? std::max<int64_t>(1, 16 / per) : 8;
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
#if DDRS_X86
    if (use_avx2()) return run_items_avx2<scalar_t, Family>(job, short_rows, per, begin, end);
#endif
    run_items<scalar_t, Family>(job, short_rows, per, begin, end);
  });
  if (!partial.empty()) {
    // Fixed summation order over tiles: the result does not depend on threads.
    for (int64_t r = 0; r < num_rows; ++r) {
      double acc = 0.0;
      for (int64_t t = 0; t < per; ++t) acc += partial[r * per + t];
      sq_norm[r] = acc;
    }
  }
}

// Rows [row_start, row_start + out.size(0)) of the virtual batch for noise `Family`.
template <typename Family>
void perturb_out_cpu(const at::Tensor& x, const at::Tensor& sigma, const at::Tensor& stream, int64_t seed,
                     int64_t sample_offset, int64_t samples_per_input, int64_t row_start, const at::Tensor& out,
                     const std::optional<at::Tensor>& sq_norm, const NoiseOpNames& names) {
  const int64_t num_rows = out.dim() >= 1 ? out.size(0) : 0;
  const RowPlan plan = check_perturb_args(x, sigma, stream, sample_offset, samples_per_input, row_start,
                                          num_rows, names);
  check_perturb_out(x, out, sq_norm, num_rows, names);
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
    TORCH_CHECK_VALUE(st[b] >= 0 && st[b] <= int64_t{0xFFFFFFFF}, names.op,
                      ": stream ids must lie in [0, 2^32), got ", st[b], " for input ", b);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), Family::kName, [&] {
    perturb_rows<scalar_t, Family>(xc.const_data_ptr<scalar_t>(), sc.const_data_ptr<double>(), st,
                                   static_cast<uint64_t>(seed), sample_offset, samples_per_input, row_start,
                                   num_rows, plan.sample_dim, out.mutable_data_ptr<scalar_t>(),
                                   sq_norm.has_value() ? sq_norm->mutable_data_ptr<double>() : nullptr);
  });
}

void perturb_gaussian_out_cpu(const at::Tensor& x, const at::Tensor& sigma, const at::Tensor& stream,
                              int64_t seed, int64_t sample_offset, int64_t samples_per_input,
                              int64_t row_start, const at::Tensor& out,
                              const std::optional<at::Tensor>& sq_norm) {
  perturb_out_cpu<GaussianNoise>(x, sigma, stream, seed, sample_offset, samples_per_input, row_start, out,
                                 sq_norm, kGaussianNames);
}

void perturb_uniform_out_cpu(const at::Tensor& x, const at::Tensor& theta, const at::Tensor& stream,
                             int64_t seed, int64_t sample_offset, int64_t samples_per_input, int64_t row_start,
                             const at::Tensor& out) {
  perturb_out_cpu<UniformNoise>(x, theta, stream, seed, sample_offset, samples_per_input, row_start, out,
                                std::nullopt, kUniformNames);
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
  m.impl("perturb_gaussian_out", &perturb_gaussian_out_cpu);
  m.impl("perturb_uniform_out", &perturb_uniform_out_cpu);
}

}  // namespace ddrs
