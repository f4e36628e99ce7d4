// CUDA implementations of the ddrs_ext ops: the torch glue around the kernels of
// noise_kernel.cu, votes_kernel.cu and sigma_kernel.cu. Same checks (checks.h) and the same
// results as the CPU kernels in csrc/cpu/.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "launchers.h"

namespace ddrs {
namespace {

// The dtypes of the CPU kernels' AT_DISPATCH_FLOATING_TYPES_AND2(kHalf, kBFloat16),
// with the same error (NotImplementedError) for the others.
cuda::DType kernel_dtype(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kDouble: return cuda::DType::kFloat64;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: break;
  }
  TORCH_CHECK_NOT_IMPLEMENTED(false, '"', name, "\" not implemented for '", t, "'");
  return cuda::DType::kFloat32;  // unreachable
}

void check_stream_ids(const at::Tensor& stream, cudaStream_t cu_stream, const char* op) {
  const int64_t B = stream.size(0);
  at::Tensor found = at::empty({2}, stream.options());
  C10_CUDA_CHECK(cuda::launch_find_bad_stream(stream.const_data_ptr<int64_t>(), B,
                                              found.mutable_data_ptr<int64_t>(), cu_stream));
  const at::Tensor host = found.cpu();  // waits for the kernel
  const int64_t b = host.const_data_ptr<int64_t>()[0];
  TORCH_CHECK_VALUE(b >= B, op, ": stream ids must lie in [0, 2^32), got ",
                    host.const_data_ptr<int64_t>()[1], " for input ", b);
}

void perturb_gaussian_out_cuda(const at::Tensor& x, const at::Tensor& sigma, const at::Tensor& stream,
                               int64_t seed, int64_t sample_offset, int64_t samples_per_input,
                               int64_t row_start, const at::Tensor& out,
                               const std::optional<at::Tensor>& sq_norm) {
  const int64_t num_rows = out.dim() >= 1 ? out.size(0) : 0;
  const RowPlan plan = check_perturb_args(x, sigma, stream, sample_offset, samples_per_input, row_start,
                                          num_rows);
  check_perturb_out(x, out, sq_norm, num_rows);
  TORCH_INTERNAL_ASSERT(x.is_cuda());
  const c10::cuda::CUDAGuard guard(x.device());
  if (num_rows == 0 || plan.sample_dim == 0) {
    if (sq_norm.has_value()) sq_norm->zero_();
    return;
  }
  const cudaStream_t cu_stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const at::Tensor xc = x.contiguous();
  const at::Tensor sc = sigma.to(at::kDouble).contiguous();
  const at::Tensor stc = stream.contiguous();
  check_stream_ids(stc, cu_stream, kGaussianNames.op);
  const int64_t scratch_size =
      sq_norm.has_value() ? cuda::perturb_gaussian_scratch_size(num_rows, plan.sample_dim) : 0;
  at::Tensor scratch;
  if (scratch_size > 0) scratch = at::empty({scratch_size}, x.options().dtype(at::kDouble));
  const cuda::DType dtype = kernel_dtype(x.scalar_type(), "perturb_gaussian_cuda");
  C10_CUDA_CHECK(cuda::launch_perturb_gaussian(
      dtype, xc.const_data_ptr(), sc.const_data_ptr<double>(), stc.const_data_ptr<int64_t>(),
      static_cast<uint64_t>(seed), sample_offset, samples_per_input, row_start, num_rows, plan.sample_dim,
      out.mutable_data_ptr(), sq_norm.has_value() ? sq_norm->mutable_data_ptr<double>() : nullptr,
      scratch_size > 0 ? scratch.mutable_data_ptr<double>() : nullptr, cu_stream));
}

void perturb_uniform_out_cuda(const at::Tensor& x, const at::Tensor& theta, const at::Tensor& stream, int64_t seed,
                              int64_t sample_offset, int64_t samples_per_input, int64_t row_start,
                              const at::Tensor& out) {
  const int64_t num_rows = out.dim() >= 1 ? out.size(0) : 0;
  const RowPlan plan = check_perturb_args(x, theta, stream, sample_offset, samples_per_input, row_start,
                                          num_rows, kUniformNames);
  check_perturb_out(x, out, std::nullopt, num_rows, kUniformNames);
  TORCH_INTERNAL_ASSERT(x.is_cuda());
  const c10::cuda::CUDAGuard guard(x.device());
  if (num_rows == 0 || plan.sample_dim == 0) return;
  const cudaStream_t cu_stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const at::Tensor xc = x.contiguous();
  const at::Tensor tc = theta.to(at::kDouble).contiguous();
  const at::Tensor stc = stream.contiguous();
  check_stream_ids(stc, cu_stream, kUniformNames.op);
  const cuda::DType dtype = kernel_dtype(x.scalar_type(), "perturb_uniform_cuda");
  C10_CUDA_CHECK(cuda::launch_perturb_uniform(dtype, xc.const_data_ptr(), tc.const_data_ptr<double>(),
                                              stc.const_data_ptr<int64_t>(), static_cast<uint64_t>(seed),
                                              sample_offset, samples_per_input, row_start, num_rows,
                                              plan.sample_dim, out.mutable_data_ptr(), cu_stream));
}

void count_votes_cuda_(const at::Tensor& logits, int64_t row_start, int64_t samples_per_input,
                       const at::Tensor& counts) {
  check_votes_args(logits, row_start, samples_per_input, counts);
  TORCH_INTERNAL_ASSERT(logits.is_cuda());
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0), C = logits.size(1);
  if (rows == 0) return;
  const cudaStream_t cu_stream = c10::cuda::getCurrentCUDAStream(logits.device().index()).stream();
  const at::Tensor lc = logits.contiguous();
  at::Tensor cls = at::empty({rows}, logits.options().dtype(at::kInt));
  at::Tensor first_bad = at::full({1}, rows, logits.options().dtype(at::kLong));
  const cuda::DType dtype = kernel_dtype(lc.scalar_type(), "count_votes_cuda");
  C10_CUDA_CHECK(cuda::launch_count_votes(dtype, lc.const_data_ptr(), rows, C, row_start, samples_per_input,
                                          counts.mutable_data_ptr<int64_t>(), cls.mutable_data_ptr<int32_t>(),
                                          first_bad.mutable_data_ptr<int64_t>(), cu_stream));
  // The kernels leave counts untouched when a row is bad; only the error needs the host.
  const int64_t bad = first_bad.item<int64_t>();
  if (bad < rows) fail_nan_vote(bad, row_start, samples_per_input);
}

void soft_votes_cuda_(const at::Tensor& logits, const std::optional<at::Tensor>& dlogits,
                      const std::optional<at::Tensor>& sq_norm, int64_t row_start, int64_t samples_per_input,
                      int64_t dim, bool probabilities, const at::Tensor& prob_sum,
                      const std::optional<at::Tensor>& deriv_sum, const std::optional<at::Tensor>& score_total) {
  check_soft_votes_args(logits, dlogits, sq_norm, row_start, samples_per_input, dim, prob_sum, deriv_sum,
                        score_total);
  TORCH_INTERNAL_ASSERT(logits.is_cuda());
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0), C = logits.size(1);
  if (rows == 0) return;
  const cudaStream_t cu_stream = c10::cuda::getCurrentCUDAStream(logits.device().index()).stream();
  const at::Tensor lc = logits.contiguous();
  // As on the CPU, the tangents are read in the logits' dtype.
  const at::Tensor dc = dlogits.has_value() ? dlogits->to(logits.scalar_type()).contiguous() : at::Tensor();
  const at::Tensor sc = sq_norm.has_value() ? sq_norm->contiguous() : at::Tensor();
  at::Tensor stats = at::empty({3 * rows}, logits.options().dtype(at::kDouble));
  at::Tensor first_bad = at::full({1}, rows, logits.options().dtype(at::kLong));
  const cuda::DType dtype = kernel_dtype(lc.scalar_type(), "soft_votes_cuda");
  C10_CUDA_CHECK(cuda::launch_soft_votes(
      dtype, lc.const_data_ptr(), dc.defined() ? dc.const_data_ptr() : nullptr,
      sc.defined() ? sc.const_data_ptr<double>() : nullptr, rows, C, row_start, samples_per_input, dim,
      probabilities, prob_sum.mutable_data_ptr<double>(),
      deriv_sum.has_value() ? deriv_sum->mutable_data_ptr<double>() : nullptr,
      score_total.has_value() ? score_total->mutable_data_ptr<double>() : nullptr, stats.mutable_data_ptr<double>(),
      first_bad.mutable_data_ptr<int64_t>(), cu_stream));
  // Unlike the CPU kernel, which may have added other inputs' rows by then, the
  // kernels leave every sum untouched when a row is bad.
  const int64_t bad = first_bad.item<int64_t>();
  if (bad < rows) fail_soft_vote(bad, row_start, samples_per_input, probabilities);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sigma_step_cuda(const at::Tensor& sigma, const at::Tensor& top2,
                                                               const at::Tensor& dtop2, const at::Tensor& bracket,
                                                               const std::optional<at::Tensor>& beyond, double lr, double clip_lo, double clip_hi,
                                                               double sigma_min, double sigma_max, int64_t rule,
                                                               double growth, int64_t gap) {
  check_sigma_step_args(sigma, top2, dtop2, bracket, beyond, lr, clip_lo, clip_hi, sigma_min, sigma_max, rule, growth,
                        gap);
  TORCH_INTERNAL_ASSERT(sigma.is_cuda());
  const c10::cuda::CUDAGuard guard(sigma.device());
  const int64_t B = sigma.size(0);
  at::Tensor next = at::empty({B}, sigma.options()), radius = at::empty({B}, sigma.options()),
             grad = at::empty({B}, sigma.options());
  if (B == 0) return {next, radius, grad};
  const cudaStream_t cu_stream = c10::cuda::getCurrentCUDAStream(sigma.device().index()).stream();
  const at::Tensor s = sigma.contiguous(), e = top2.contiguous(), de = dtop2.contiguous();
  const at::Tensor past = beyond.has_value() ? beyond->contiguous() : at::Tensor();
  C10_CUDA_CHECK(cuda::launch_sigma_step(s.const_data_ptr<double>(), e.const_data_ptr<double>(),
                                         de.const_data_ptr<double>(),
                                         past.defined() ? past.const_data_ptr<bool>() : nullptr, B, lr, clip_lo, clip_hi, sigma_min, sigma_max,
                                         rule, growth, gap, bracket.mutable_data_ptr<double>(),
                                         next.mutable_data_ptr<double>(), radius.mutable_data_ptr<double>(),
                                         grad.mutable_data_ptr<double>(), cu_stream));
  return {next, radius, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddrs_ext, CUDA, m) {
  m.impl("perturb_gaussian_out", &perturb_gaussian_out_cuda);
  m.impl("perturb_uniform_out", &perturb_uniform_out_cuda);
  m.impl("count_votes_", &count_votes_cuda_);
  m.impl("soft_votes_", &soft_votes_cuda_);
  m.impl("sigma_step", &sigma_step_cuda);
}

}  // namespace ddrs
