// Argument checks shared by the CPU and CUDA implementations of each op, so
// both backends reject exactly the same inputs with the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>

namespace ddrs {

struct RowPlan {
  int64_t num_inputs;         // B
  int64_t sample_dim;         // D: elements per input
  int64_t samples_per_input;  // m
};

// How the noise ops name themselves and their scale argument in error messages.
struct NoiseOpNames {
  const char* op;       // "perturb_gaussian"
  const char* op_out;   // "perturb_gaussian_out"
  const char* scale;    // "sigma"
};
inline constexpr NoiseOpNames kGaussianNames{"perturb_gaussian", "perturb_gaussian_out", "sigma"};
inline constexpr NoiseOpNames kUniformNames{"perturb_uniform", "perturb_uniform_out", "theta"};

inline RowPlan check_perturb_args(const at::Tensor& x, const at::Tensor& sigma,
                                  const at::Tensor& stream, int64_t sample_offset,
                                  int64_t samples_per_input, int64_t row_start,
                                  int64_t num_rows, const NoiseOpNames& names = kGaussianNames) {
  const char* op = names.op;
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()),
                   op, ": x must be a floating-point tensor, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have a batch dimension, got a 0-d tensor");
  const int64_t B = x.size(0);
  TORCH_CHECK_TYPE(at::isFloatingType(sigma.scalar_type()),
                   op, ": ", names.scale, " must be a floating-point tensor");
  TORCH_CHECK_VALUE(sigma.dim() == 1 && sigma.size(0) == B,
                    op, ": ", names.scale, " must have shape (", B, ",), got ", sigma.sizes());
  TORCH_CHECK_TYPE(stream.scalar_type() == at::kLong,
                   op, ": stream must be an int64 tensor, got ", stream.scalar_type());
  TORCH_CHECK_VALUE(stream.dim() == 1 && stream.size(0) == B,
                    op, ": stream must have shape (", B, ",), got ", stream.sizes());
  TORCH_CHECK_VALUE(x.device() == sigma.device() && x.device() == stream.device(),
                    op, ": x, ", names.scale, " and stream must be on the same device");
  TORCH_CHECK_VALUE(samples_per_input >= 1, op, ": samples_per_input must be >= 1, got ",
                    samples_per_input);
  TORCH_CHECK_VALUE(sample_offset >= 0, op, ": sample_offset must be >= 0, got ",
                    sample_offset);
  TORCH_CHECK_VALUE(row_start >= 0 && num_rows >= 0,
                    op, ": row_start and num_rows must be >= 0");
  TORCH_CHECK_VALUE(B == 0 || samples_per_input <= (INT64_MAX / B),
                    op, ": num_inputs * samples_per_input overflows int64");
  TORCH_CHECK_VALUE(row_start + num_rows <= B * samples_per_input,
                    op, ": rows [", row_start, ", ", row_start + num_rows,
                    ") lie outside the ", B * samples_per_input, " rows of ", B, " inputs x ",
                    samples_per_input, " samples");
  const int64_t D = x.numel() / (B == 0 ? 1 : B);
  TORCH_CHECK_VALUE(D <= (int64_t{1} << 34), op, ": inputs may have at most 2^34 elements");
  return RowPlan{B, B == 0 ? 0 : D, samples_per_input};
}

inline void check_perturb_out(const at::Tensor& x, const at::Tensor& out,
                              const std::optional<at::Tensor>& sq_norm, int64_t num_rows,
                              const NoiseOpNames& names = kGaussianNames) {
  const char* op = names.op_out;
  TORCH_CHECK_VALUE(out.scalar_type() == x.scalar_type(), op, ": out must have x's dtype ",
                    x.scalar_type(), ", got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.device() == x.device(), op, ": out must be on x's device");
  TORCH_CHECK_VALUE(out.is_contiguous(), op, ": out must be contiguous");
  TORCH_CHECK_VALUE(out.dim() == x.dim() && out.size(0) == num_rows &&
                        out.sizes().slice(1) == x.sizes().slice(1),
                    op, ": out must have shape (num_rows, *x.shape[1:])");
  if (sq_norm.has_value()) {
    TORCH_CHECK_VALUE(sq_norm->scalar_type() == at::kDouble && sq_norm->dim() == 1 &&
                          sq_norm->size(0) == num_rows && sq_norm->is_contiguous() &&
                          sq_norm->device() == x.device(),
                      op, ": sq_norm must be a contiguous float64 tensor of shape (",
                      num_rows, ",) on x's device");
  }
}

inline void check_votes_args(const at::Tensor& logits, int64_t row_start, int64_t samples_per_input,
                             const at::Tensor& counts) {
  TORCH_CHECK_TYPE(at::isFloatingType(logits.scalar_type()),
                   "count_votes: logits must be floating point, got ", logits.scalar_type());
  TORCH_CHECK_VALUE(logits.dim() == 2 && logits.size(1) >= 1,
                    "count_votes: logits must have shape (rows, num_classes), got ", logits.sizes());
  TORCH_CHECK_TYPE(counts.scalar_type() == at::kLong, "count_votes: counts must be int64");
  TORCH_CHECK_VALUE(counts.dim() == 2 && counts.is_contiguous(),
                    "count_votes: counts must be a contiguous (num_inputs, num_classes) tensor");
  TORCH_CHECK_VALUE(counts.size(1) == logits.size(1), "count_votes: the model gave ", logits.size(1),
                    " classes but counts has ", counts.size(1), " columns");
  TORCH_CHECK_VALUE(logits.device() == counts.device(),
                    "count_votes: logits and counts must be on the same device");
  TORCH_CHECK_VALUE(samples_per_input >= 1, "count_votes: samples_per_input must be >= 1");
  TORCH_CHECK_VALUE(row_start >= 0, "count_votes: row_start must be >= 0");
  const int64_t B = counts.size(0);
  TORCH_CHECK_VALUE(B == 0 || samples_per_input <= INT64_MAX / B,
                    "count_votes: num_inputs * samples_per_input overflows int64");
  TORCH_CHECK_VALUE(row_start + logits.size(0) <= B * samples_per_input, "count_votes: rows [",
                    row_start, ", ", row_start + logits.size(0), ") lie outside the ",
                    B * samples_per_input, " rows of ", B, " inputs x ", samples_per_input, " samples");
}

inline void check_soft_votes_args(const at::Tensor& logits, const std::optional<at::Tensor>& dlogits,
                                  const std::optional<at::Tensor>& sq_norm, int64_t row_start,
                                  int64_t samples_per_input, int64_t dim, const at::Tensor& prob_sum,
                                  const std::optional<at::Tensor>& deriv_sum,
                                  const std::optional<at::Tensor>& score_total) {
  TORCH_CHECK_TYPE(at::isFloatingType(logits.scalar_type()), "soft_votes: logits must be floating point, got ",
                   logits.scalar_type());
  TORCH_CHECK_VALUE(logits.dim() == 2 && logits.size(1) >= 1,
                    "soft_votes: logits must have shape (rows, num_classes), got ", logits.sizes());
  const int64_t rows = logits.size(0), C = logits.size(1);
  const auto f64_matrix = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.scalar_type() == at::kDouble && t.dim() == 2 && t.size(1) == C && t.is_contiguous() &&
                          t.device() == logits.device(),
                      "soft_votes: ", name, " must be a contiguous float64 (num_inputs, ", C,
                      ") tensor on the logits' device");
  };
  f64_matrix(prob_sum, "prob_sum");
  const int64_t B = prob_sum.size(0);
  if (deriv_sum.has_value()) {
    f64_matrix(*deriv_sum, "deriv_sum");
    TORCH_CHECK_VALUE(deriv_sum->size(0) == B, "soft_votes: deriv_sum and prob_sum must have the same shape");
    TORCH_CHECK_VALUE(dlogits.has_value() != sq_norm.has_value(),
                      "soft_votes: deriv_sum needs exactly one of dlogits (forward-mode tangents) or sq_norm");
  }
  if (dlogits.has_value()) {
    TORCH_CHECK_VALUE(deriv_sum.has_value(), "soft_votes: dlogits given without deriv_sum");
    TORCH_CHECK_VALUE(at::isFloatingType(dlogits->scalar_type()) && dlogits->sizes() == logits.sizes() &&
                          dlogits->device() == logits.device(),
                      "soft_votes: dlogits must be a floating-point tensor shaped like logits");
  }
  if (sq_norm.has_value()) {
    TORCH_CHECK_VALUE(sq_norm->scalar_type() == at::kDouble && sq_norm->dim() == 1 && sq_norm->size(0) == rows &&
                          sq_norm->device() == logits.device(),
                      "soft_votes: sq_norm must be a float64 tensor of shape (", rows, ",)");
  }
  if (score_total.has_value()) {
    TORCH_CHECK_VALUE(sq_norm.has_value(), "soft_votes: score_total needs sq_norm");
    TORCH_CHECK_VALUE(score_total->scalar_type() == at::kDouble && score_total->dim() == 1 &&
                          score_total->size(0) == B && score_total->is_contiguous() &&
                          score_total->device() == logits.device(),
                      "soft_votes: score_total must be a contiguous float64 tensor of shape (", B, ",)");
  }
  TORCH_CHECK_VALUE(samples_per_input >= 1, "soft_votes: samples_per_input must be >= 1");
  TORCH_CHECK_VALUE(row_start >= 0, "soft_votes: row_start must be >= 0");
  TORCH_CHECK_VALUE(dim >= 0, "soft_votes: dim must be >= 0");
  TORCH_CHECK_VALUE(B == 0 || samples_per_input <= INT64_MAX / B,
                    "soft_votes: num_inputs * samples_per_input overflows int64");
  TORCH_CHECK_VALUE(row_start + rows <= B * samples_per_input, "soft_votes: rows [", row_start, ", ",
                    row_start + rows, ") lie outside the ", B * samples_per_input, " rows of ", B, " inputs x ",
                    samples_per_input, " samples");
}

inline void check_sigma_step_args(const at::Tensor& sigma, const at::Tensor& top2, const at::Tensor& dtop2,
                                  const at::Tensor& bracket, const std::optional<at::Tensor>& beyond, double lr, double clip_lo, double clip_hi,
                                  double sigma_min, double sigma_max, int64_t rule, double growth, int64_t gap) {
  TORCH_CHECK_VALUE(sigma.scalar_type() == at::kDouble && sigma.dim() == 1,
                    "sigma_step: sigma must be a float64 tensor of shape (B,)");
  const int64_t B = sigma.size(0);
  for (const at::Tensor* t : {&top2, &dtop2, &bracket}) {
    TORCH_CHECK_VALUE(t->scalar_type() == at::kDouble && t->dim() == 2 && t->size(0) == B && t->size(1) == 2 &&
                          t->device() == sigma.device(),
                      "sigma_step: top2, dtop2 and bracket must be float64 tensors of shape (", B,
                      ", 2) on sigma's device");
  }
  TORCH_CHECK_VALUE(bracket.is_contiguous(), "sigma_step: bracket must be contiguous");
  if (beyond.has_value()) {
    TORCH_CHECK_VALUE(beyond->scalar_type() == at::kBool && beyond->dim() == 1 && beyond->size(0) == B &&
                          beyond->device() == sigma.device(),
                      "sigma_step: beyond must be a bool tensor of shape (", B, ",) on sigma's device");
  }
  TORCH_CHECK_VALUE(gap == 0 || gap == 1, "sigma_step: gap must be 0 (probit, Gaussian) or 1 (linear, uniform), got ",
                    gap);
  // Phi^-1 needs the clip to stay inside (0, 1); the linear gap is finite on all of [0, 1].
  TORCH_CHECK_VALUE(gap == 0 ? (0.0 < clip_lo && clip_lo < clip_hi && clip_hi < 1.0)
                             : (0.0 <= clip_lo && clip_lo < clip_hi && clip_hi <= 1.0),
                    "sigma_step: the clip range must satisfy 0 ", gap == 0 ? "<" : "<=", " clip_lo < clip_hi ",
                    gap == 0 ? "<" : "<=", " 1, got (", clip_lo, ", ", clip_hi, ")");
  TORCH_CHECK_VALUE(0.0 < sigma_min && sigma_min <= sigma_max && std::isfinite(sigma_max),
                    "sigma_step: the sigma range must satisfy 0 < sigma_min <= sigma_max < inf");
  TORCH_CHECK_VALUE(rule == 0 || rule == 1, "sigma_step: rule must be 0 (ascent) or 1 (bisect), got ", rule);
  TORCH_CHECK_VALUE(rule != 0 || (std::isfinite(lr) && lr > 0.0), "sigma_step: lr must be finite and > 0");
  TORCH_CHECK_VALUE(rule != 1 || (std::isfinite(growth) && growth > 1.0),
                    "sigma_step: growth must be finite and > 1");
}

// Names the offending row after the vote kernel found a NaN logit.
[[noreturn]] inline void fail_nan_vote(int64_t bad_row, int64_t row_start, int64_t samples_per_input) {
  const int64_t g = row_start + bad_row;
  TORCH_CHECK_VALUE(false, "count_votes: the model returned NaN for input ", g / samples_per_input,
                    " (noise sample ", g % samples_per_input, ", logits row ", bad_row,
                    "); a NaN logit cannot be counted as a vote (+-Inf can: they are ordered values)");
  abort();  // unreachable; TORCH_CHECK_VALUE throws
}

// Names the offending row after the soft-vote kernel found a row it cannot turn into
// class probabilities.
[[noreturn]] inline void fail_soft_vote(int64_t bad_row, int64_t row_start, int64_t samples_per_input,
                                        bool probabilities) {
  const int64_t g = row_start + bad_row;
  TORCH_CHECK_VALUE(false, "soft_votes: the model returned ",
                    probabilities ? "a NaN or infinite probability" : "NaN, +Inf or only -Inf logits",
                    " (or a non-finite derivative of a ", probabilities ? "probability" : "finite logit",
                    ") for input ", g / samples_per_input, " (noise sample ", g % samples_per_input,
                    ", logits row ", bad_row, "); ",
                    probabilities ? "probabilities must be finite"
                                  : "softmax needs at least one finite logit and no NaN or +Inf (-Inf is "
                                    "allowed: a class of probability 0)");
  abort();  // unreachable; TORCH_CHECK_VALUE throws
}

}  // namespace ddrs
