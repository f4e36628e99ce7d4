#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../sigma.h"

namespace ddrs {
namespace {

// Accumulates rows [r0, r1) of one input into its float64 sums, in row order,
// so that the sums do not depend on how the rows were chunked. Returns the first
// row it cannot use (soft_row_ok in sigma.h), or r1.
template <typename scalar_t>
int64_t accumulate_input(const scalar_t* logits, const scalar_t* dlogits, const double* sq_norm, int64_t r0,
                         int64_t r1, int64_t C, double dim, bool probabilities, double* prob_sum,
                         double* deriv_sum, double* score_total, std::vector<double>& p) {
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* row = logits + r * C;
    SoftRowCheck check;
    for (int64_t c = 0; c < C; ++c) check.value(static_cast<double>(row[c]), probabilities);
    if (dlogits != nullptr) {
      for (int64_t c = 0; c < C; ++c) {
        check.tangent(static_cast<double>(row[c]), static_cast<double>(dlogits[r * C + c]));
      }
    }
    if (!check.ok(probabilities)) return r;
    const double top = check.top;
    if (probabilities) {
      for (int64_t c = 0; c < C; ++c) p[c] = static_cast<double>(row[c]);
    } else {
      double total = 0.0;
      for (int64_t c = 0; c < C; ++c) {
        p[c] = std::exp(static_cast<double>(row[c]) - top);
        total += p[c];
      }
      for (int64_t c = 0; c < C; ++c) p[c] /= total;
    }
    for (int64_t c = 0; c < C; ++c) prob_sum[c] += p[c];
    if (score_total != nullptr) *score_total += sq_norm[r] - dim;
    if (deriv_sum == nullptr) continue;
    if (dlogits != nullptr) {
      const scalar_t* d = dlogits + r * C;
      if (probabilities) {
        for (int64_t c = 0; c < C; ++c) deriv_sum[c] += static_cast<double>(d[c]);
      } else {
        // d softmax = p * (d - <p, d>); a -Inf logit (p = 0) contributes nothing, whatever its tangent.
        double mean = 0.0;
        for (int64_t c = 0; c < C; ++c) mean += p[c] * tangent_of(static_cast<double>(row[c]), static_cast<double>(d[c]));
        for (int64_t c = 0; c < C; ++c) {
          deriv_sum[c] += p[c] * (tangent_of(static_cast<double>(row[c]), static_cast<double>(d[c])) - mean);
        }
      }
    } else {
      const double s = sq_norm[r] - dim;
      for (int64_t c = 0; c < C; ++c) deriv_sum[c] += p[c] * s;
    }
  }
  return r1;
}

void soft_votes_cpu_(const at::Tensor& logits, const std::optional<at::Tensor>& dlogits,
                     const std::optional<at::Tensor>& sq_norm, int64_t row_start, int64_t samples_per_input,
                     int64_t dim, bool probabilities, const at::Tensor& prob_sum,
                     const std::optional<at::Tensor>& deriv_sum, const std::optional<at::Tensor>& score_total) {
  check_soft_votes_args(logits, dlogits, sq_norm, row_start, samples_per_input, dim, prob_sum, deriv_sum,
                        score_total);
  TORCH_INTERNAL_ASSERT(logits.device().is_cpu());
  const int64_t rows = logits.size(0), C = logits.size(1);
  if (rows == 0) return;
  const at::Tensor lc = logits.contiguous();
  const at::Tensor dc = dlogits.has_value() ? dlogits->to(logits.scalar_type()).contiguous() : at::Tensor();
  const at::Tensor sc = sq_norm.has_value() ? sq_norm->contiguous() : at::Tensor();
  // The chunk's rows split into runs that belong to one input each.
  const int64_t m = samples_per_input;
  const int64_t first = row_start / m, last = (row_start + rows - 1) / m;
  std::atomic<int64_t> first_bad{rows};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lc.scalar_type(), "soft_votes_cpu", [&] {
    const scalar_t* lp = lc.const_data_ptr<scalar_t>();
    const scalar_t* dp = dc.defined() ? dc.const_data_ptr<scalar_t>() : nullptr;
    const double* sp = sc.defined() ? sc.const_data_ptr<double>() : nullptr;
    double* ps = prob_sum.mutable_data_ptr<double>();
    double* ds = deriv_sum.has_value() ? deriv_sum->mutable_data_ptr<double>() : nullptr;
    double* st = score_total.has_value() ? score_total->mutable_data_ptr<double>() : nullptr;
    at::parallel_for(first, last + 1, std::max<int64_t>(1, 4096 / (m * C)), [&](int64_t b0, int64_t b1) {
      std::vector<double> p(C);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = std::max<int64_t>(0, b * m - row_start);
        const int64_t r1 = std::min<int64_t>(rows, (b + 1) * m - row_start);
        const int64_t bad =
            accumulate_input(lp, dp, sp, r0, r1, C, static_cast<double>(dim), probabilities, ps + b * C,
                             ds != nullptr ? ds + b * C : nullptr, st != nullptr ? st + b : nullptr, p);
        if (bad < r1) {
          int64_t cur = first_bad.load();
          while (bad < cur && !first_bad.compare_exchange_weak(cur, bad)) {
          }
        }
      }
    });
  });
  if (first_bad.load() < rows) fail_soft_vote(first_bad.load(), row_start, m, probabilities);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sigma_step_cpu(const at::Tensor& sigma, const at::Tensor& top2,
                                                              const at::Tensor& dtop2, const at::Tensor& bracket,
                                                              const std::optional<at::Tensor>& beyond, double lr, double clip_lo, double clip_hi,
                                                              double sigma_min, double sigma_max, int64_t rule,
                                                              double growth, int64_t gap) {
  check_sigma_step_args(sigma, top2, dtop2, bracket, beyond, lr, clip_lo, clip_hi, sigma_min, sigma_max, rule, growth,
                        gap);
  TORCH_INTERNAL_ASSERT(sigma.device().is_cpu());
  const int64_t B = sigma.size(0);
  const at::Tensor s = sigma.contiguous(), e = top2.contiguous(), de = dtop2.contiguous();
  const at::Tensor past = beyond.has_value() ? beyond->contiguous() : at::Tensor();
  const bool* pp = past.defined() ? past.const_data_ptr<bool>() : nullptr;
  at::Tensor next = at::empty({B}, sigma.options()), radius = at::empty({B}, sigma.options()),
             grad = at::empty({B}, sigma.options());
  const SigmaStepParams params{lr,     clip_lo, clip_hi, sigma_min, sigma_max, growth, static_cast<StepRule>(rule),
                               static_cast<StepGap>(gap)};
  const double* sp = s.const_data_ptr<double>();
  const double* ep = e.const_data_ptr<double>();
  const double* dp = de.const_data_ptr<double>();
  double* bp = bracket.mutable_data_ptr<double>();
  double *np = next.mutable_data_ptr<double>(), *rp = radius.mutable_data_ptr<double>(),
         *gp = grad.mutable_data_ptr<double>();
  at::parallel_for(0, B, 1024, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const SigmaStepOut o = sigma_step(sp[b], ep[2 * b], ep[2 * b + 1], dp[2 * b], dp[2 * b + 1], params,
                                        bp + 2 * b, pp != nullptr && pp[b]);
      np[b] = o.sigma;
      rp[b] = o.radius;
      gp[b] = o.grad;
    }
  });
  return {next, radius, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddrs_ext, CPU, m) {
  m.impl("soft_votes_", &soft_votes_cpu_);
  m.impl("sigma_step", &sigma_step_cpu);
}

}  // namespace ddrs
