#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <vector>

#include "../checks.h"
#include "../votes.h"

namespace ddrs {
namespace {

template <typename scalar_t>
bool all_finite(const scalar_t* v, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {  // vectorised: no early exit
    const acc_t d = static_cast<acc_t>(v[i]) - static_cast<acc_t>(v[i]);
    bad |= !(d == acc_t(0));
  }
  return bad == 0;
}

// Argmax class of every row into cls; returns the first row holding a NaN or
// Inf, or `rows` if there is none.
template <typename scalar_t>
int64_t argmax_rows(const scalar_t* logits, int64_t rows, int64_t C, int32_t* cls) {
  using acc_t = at::opmath_type<scalar_t>;
  std::atomic<int64_t> first_bad{rows};
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / C), [&](int64_t begin, int64_t end) {
    if (all_finite(logits + begin * C, (end - begin) * C)) {
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
  if (bad < rows) fail_non_finite(bad, row_start, samples_per_input);
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

at::Tensor count_votes_cpu(const at::Tensor& logits, int64_t row_start, int64_t samples_per_input,
                           int64_t num_inputs) {
  TORCH_CHECK_VALUE(num_inputs >= 0, "count_votes: num_inputs must be >= 0");
  TORCH_CHECK_VALUE(logits.dim() == 2, "count_votes: logits must have shape (rows, num_classes), got ",
                    logits.sizes());
  at::Tensor counts = at::zeros({num_inputs, logits.size(1)}, logits.options().dtype(at::kLong));
  count_votes_cpu_(logits, row_start, samples_per_input, counts);
  return counts;
}

}  // namespace

TORCH_LIBRARY_IMPL(ddrs_ext, CPU, m) {
  m.impl("count_votes", &count_votes_cpu);
  m.impl("count_votes_", &count_votes_cpu_);
}

}  // namespace ddrs
