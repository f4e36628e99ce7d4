#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <atomic>
#include <type_traits>
#include <cmath>
#include <vector>

#include "../checks.h"
#include "../votes.h"
#include "cpu_features.h"

namespace ddrs {
namespace {

template <typename scalar_t>
bool no_nan(const scalar_t* v, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {  // vectorised: no early exit
    const acc_t a = static_cast<acc_t>(v[i]);
    bad |= !(a == a);
  }
  return bad == 0;
}

#if DDRS_X86
// float32 logits with few classes: eight rows at a time, one gather per class,
// which beats a row-by-row loop of data-dependent selects. Rows [begin, end);
// stops (cls untouched for that group) at a group of eight that holds a NaN,
// leaving the diagnosis to the scalar code.
__attribute__((target("avx2"))) int64_t argmax_rows_f32_avx2(const float* logits, int64_t begin, int64_t end,
                                                             int64_t C, int32_t* cls) {
  const __m256i offsets = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                             _mm256_set1_epi32(static_cast<int>(C)));
  int64_t r = begin;
  for (; r + 8 <= end; r += 8) {
    const float* base = logits + r * C;
    __m256 best_v = _mm256_i32gather_ps(base, offsets, 4);
    __m256i best = _mm256_setzero_si256();
    __m256 ordered = _mm256_cmp_ps(best_v, best_v, _CMP_ORD_Q);
    for (int64_t c = 1; c < C; ++c) {
      const __m256 v = _mm256_i32gather_ps(base + c, offsets, 4);
      ordered = _mm256_and_ps(ordered, _mm256_cmp_ps(v, v, _CMP_ORD_Q));
      const __m256 greater = _mm256_cmp_ps(v, best_v, _CMP_GT_OQ);
      best_v = _mm256_blendv_ps(best_v, v, greater);
      best = _mm256_castps_si256(_mm256_blendv_ps(
          _mm256_castsi256_ps(best), _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(c))), greater));
    }
    if (_mm256_movemask_ps(ordered) != 0xFF) return r;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(cls + r), best);
  }
  return r;  // the scalar code takes the rest
}

#endif

// Argmax class of every row into cls; returns the first row holding a NaN, or
// `rows` if there is none.
template <typename scalar_t>
int64_t argmax_rows(const scalar_t* logits, int64_t rows, int64_t C, int32_t* cls) {
  using acc_t = at::opmath_type<scalar_t>;
  std::atomic<int64_t> first_bad{rows};
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / C), [&](int64_t begin, int64_t end) {
#if DDRS_X86
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (C <= 64 && use_avx2()) begin = argmax_rows_f32_avx2(logits, begin, end, C, cls);
    }
#endif
    if (no_nan(logits + begin * C, (end - begin) * C)) {
      for (int64_t r = begin; r < end; ++r) cls[r] = finite_row_argmax<scalar_t, acc_t>(logits + r * C, C);
      return;
    }
    for (int64_t r = begin; r < end; ++r) {
      const int32_t c = row_argmax(logits + r * C, C);
      cls[r] = c;
      if (c < 0) {
        int64_t cur = first_bad.load();
        while (r < cur && !first_bad.compare_exchange_weak(cur, r)) {
        }
      }
    }
  });
  return first_bad.load();
}

void count_votes_cpu_(const at::Tensor& logits, int64_t row_start, int64_t samples_per_input,
                      const at::Tensor& counts) {
  check_votes_args(logits, row_start, samples_per_input, counts);
  TORCH_INTERNAL_ASSERT(logits.device().is_cpu());
  const int64_t rows = logits.size(0), C = logits.size(1);
  if (rows == 0) return;
  const at::Tensor lc = logits.contiguous();
  std::vector<int32_t> cls(rows);
  int64_t bad = rows;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lc.scalar_type(), "count_votes_cpu", [&] {
    bad = argmax_rows<scalar_t>(lc.const_data_ptr<scalar_t>(), rows, C, cls.data());
  });
  if (bad < rows) fail_nan_vote(bad, row_start, samples_per_input);
  int64_t* cnt = counts.mutable_data_ptr<int64_t>();
  // Walk the inputs alongside the rows rather than dividing per row.
  int64_t b = row_start / samples_per_input, k = row_start % samples_per_input;
  for (int64_t r = 0; r < rows; ++r) {
    cnt[b * C + cls[r]] += 1;
    if (++k == samples_per_input) {
      k = 0;
      ++b;
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(ddrs_ext, CPU, m) {
  m.impl("count_votes_", &count_votes_cpu_);
}

}  // namespace ddrs
