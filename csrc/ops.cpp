// The one place where ddrs_ext's operator schemas live. Kernels register
// against these names in cpu/*.cpp and cuda/*.cpp.
#include <Python.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"

extern "C" {
// `import ddrs_ext._C` only has to load this library so that the
// TORCH_LIBRARY blocks below run; the ops are reached via torch.ops.ddrs_ext.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(ddrs_ext, m) {
  // Rows [row_start, row_start + num_rows) of the virtual (B * samples_per_input)
  // batch, row g = b * samples_per_input + k holding x[b] + sigma[b] * eps with eps
  // drawn for (seed, stream[b], sample_offset + k). sq_norm[r] = ||eps||^2 (float64).
  m.def(
      "perturb_gaussian(Tensor x, Tensor sigma, Tensor stream, int seed, int sample_offset, "
      "int samples_per_input, int row_start, int num_rows, bool with_sq_norm) -> (Tensor, Tensor)");
  m.def(
      "perturb_gaussian_out(Tensor x, Tensor sigma, Tensor stream, int seed, int sample_offset, "
      "int samples_per_input, int row_start, Tensor(a!) out, Tensor(b!)? sq_norm) -> ()");
  // The same with uniform noise: row g holds x[b] + theta[b] * u, u uniform on [-1, 1]^D drawn for
  // (seed, stream[b], sample_offset + k) (csrc/uniform.h); the l1 certificate's noise.
  m.def(
      "perturb_uniform(Tensor x, Tensor theta, Tensor stream, int seed, int sample_offset, "
      "int samples_per_input, int row_start, int num_rows) -> Tensor");
  m.def(
      "perturb_uniform_out(Tensor x, Tensor theta, Tensor stream, int seed, int sample_offset, "
      "int samples_per_input, int row_start, Tensor(a!) out) -> ()");
  // Hard votes: counts[g // samples_per_input, argmax(logits[r])] += 1 for g = row_start + r.
  // Ties go to the lowest class; a NaN/Inf logit raises ValueError naming the input.
  // Raw Philox4x32-10 words for counters (N, 4) and the 64-bit key `seed`: the
  // generator behind every Gaussian, exposed so tests can hold it to reference streams.
  m.def("philox4x32_10(Tensor counters, int seed) -> Tensor");
  m.def("count_votes(Tensor logits, int row_start, int samples_per_input, int num_inputs) -> Tensor");
  m.def("count_votes_(Tensor logits, int row_start, int samples_per_input, Tensor(a!) counts) -> ()");
  // Soft votes for sigma optimisation, accumulated per input in row order (float64):
  //   prob_sum[b] += p_r with p_r = softmax(logits[r]) (or logits[r] itself if probabilities);
  //   deriv_sum[b] += dp_r, the forward-mode derivative of p_r along the tangent dlogits[r], or,
  //   with sq_norm instead, += p_r * (sq_norm[r] - dim) (the score-function weight);
  //   score_total[b] += sq_norm[r] - dim.
  m.def(
      "soft_votes_(Tensor logits, Tensor? dlogits, Tensor? sq_norm, int row_start, int samples_per_input, "
      "int dim, bool probabilities, Tensor(a!) prob_sum, Tensor(b!)? deriv_sum, Tensor(c!)? score_total) -> ()");
  // One data-dependent sigma step for every input (csrc/sigma.h): from the two largest mean
  // probabilities top2 (B, 2) and their sigma-derivatives dtop2 (B, 2), returns (new sigma,
  // surrogate radius, its derivative). rule 0: ascent with lr; rule 1: bisection with the
  // per-input bracket (B, 2), updated in place; beyond (B,) bool, optional, marks inputs whose
  // current sigma the bisection must treat as past the optimum whatever the gradient says.
  // gap 0: the Gaussian surrogate sigma/2 (Phi^-1 E_A - Phi^-1 E_B); gap 1: uniform noise's
  // theta (E_A - E_B), the l1 certificate's.
  m.def(
      "sigma_step(Tensor sigma, Tensor top2, Tensor dtop2, Tensor(a!) bracket, Tensor? beyond, float lr, "
      "float clip_lo, float clip_hi, float sigma_min, float sigma_max, int rule, float growth, int gap=0) "
      "-> (Tensor, Tensor, Tensor)");
}

namespace ddrs {
namespace {

// The functional ops allocate their outputs and call the in-place ones through the
// dispatcher, so each backend implements only the in-place kernel.
std::tuple<at::Tensor, at::Tensor> perturb_gaussian(const at::Tensor& x, const at::Tensor& sigma,
                                                    const at::Tensor& stream, int64_t seed, int64_t sample_offset,
                                                    int64_t samples_per_input, int64_t row_start, int64_t num_rows,
                                                    bool with_sq_norm) {
  check_perturb_args(x, sigma, stream, sample_offset, samples_per_input, row_start, num_rows);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[0] = num_rows;
  at::Tensor out = at::empty(shape, x.options());
  at::Tensor sq = at::empty({with_sq_norm ? num_rows : 0}, x.options().dtype(at::kDouble));
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ddrs_ext::perturb_gaussian_out", "")
                             .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                                         int64_t, int64_t, const at::Tensor&, const std::optional<at::Tensor>&)>();
  op.call(x, sigma, stream, seed, sample_offset, samples_per_input, row_start, out,
          with_sq_norm ? std::optional<at::Tensor>(sq) : std::nullopt);
  return {out, sq};
}

at::Tensor perturb_uniform(const at::Tensor& x, const at::Tensor& theta, const at::Tensor& stream, int64_t seed,
                           int64_t sample_offset, int64_t samples_per_input, int64_t row_start, int64_t num_rows) {
  check_perturb_args(x, theta, stream, sample_offset, samples_per_input, row_start, num_rows, kUniformNames);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[0] = num_rows;
  at::Tensor out = at::empty(shape, x.options());
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ddrs_ext::perturb_uniform_out", "")
                             .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                                         int64_t, int64_t, const at::Tensor&)>();
  op.call(x, theta, stream, seed, sample_offset, samples_per_input, row_start, out);
  return out;
}

at::Tensor count_votes(const at::Tensor& logits, int64_t row_start, int64_t samples_per_input, int64_t num_inputs) {
  TORCH_CHECK_VALUE(num_inputs >= 0, "count_votes: num_inputs must be >= 0");
  TORCH_CHECK_VALUE(logits.dim() == 2, "count_votes: logits must have shape (rows, num_classes), got ",
                    logits.sizes());
  at::Tensor counts = at::zeros({num_inputs, logits.size(1)}, logits.options().dtype(at::kLong));
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ddrs_ext::count_votes_", "")
                             .typed<void(const at::Tensor&, int64_t, int64_t, const at::Tensor&)>();
  op.call(logits, row_start, samples_per_input, counts);
  return counts;
}

}  // namespace
}  // namespace ddrs

TORCH_LIBRARY_IMPL(ddrs_ext, CompositeExplicitAutograd, m) {
  m.impl("perturb_gaussian", &ddrs::perturb_gaussian);
  m.impl("perturb_uniform", &ddrs::perturb_uniform);
  m.impl("count_votes", &ddrs::count_votes);
}
