// Host entry points of the CUDA kernels. Raw pointers and a stream only: the .cu
// files that define them include no torch header (nvcc then takes seconds, not
// minutes); ops_cuda.cpp turns tensors into these arguments.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../philox.h"  // DDRS_HD
#endif

namespace ddrs {
namespace cuda {

// The element types the kernels handle; the half types have the layout of
// at::Half / at::BFloat16 (and of __half / __nv_bfloat16 on the device).
enum class DType : int { kFloat32, kFloat64, kFloat16, kBFloat16 };

// Scratch (float64 elements) that launch_perturb_gaussian needs for the sq_norm
// partial sums of rows of D elements; 0 when each row is one tile.
int64_t perturb_gaussian_scratch_size(int64_t num_rows, int64_t D);

// out[r, j] = x[b, j] + sigma[b] * eps, rows r of [0, num_rows) being rows
// g = row_start + r of the virtual batch, b = g / m (see ops.cpp). x and out
// contiguous, sigma float64, stream ids already checked to lie in [0, 2^32).
// sq_norm (may be null) gets ||eps||^2 per row; it then needs `scratch` of
// perturb_gaussian_scratch_size(num_rows, D) doubles (may be null when that is 0).
cudaError_t launch_perturb_gaussian(DType dtype, const void* x, const double* sigma,
                                    const int64_t* stream, uint64_t seed, int64_t sample_offset,
                                    int64_t m, int64_t row_start, int64_t num_rows, int64_t D,
                                    void* out, double* sq_norm, double* scratch, cudaStream_t cu_stream);

// out[r, j] = x[b, j] + theta[b] * u, u uniform on [-1, 1] (uniform.h), rows as for
// launch_perturb_gaussian; theta float64.
cudaError_t launch_perturb_uniform(DType dtype, const void* x, const double* theta, const int64_t* stream,
                                   uint64_t seed, int64_t sample_offset, int64_t m, int64_t row_start,
                                   int64_t num_rows, int64_t D, void* out, cudaStream_t cu_stream);

// result[0] = the lowest b with stream[b] outside [0, 2^32) (B if none),
// result[1] = that stream id (0 if none). One block; result is device memory.
cudaError_t launch_find_bad_stream(const int64_t* stream, int64_t B, int64_t* result,
                                   cudaStream_t cu_stream);

// counts[(row_start + r) / m, argmax(logits[r])] += 1 for the `rows` rows of the
// contiguous (rows, C) logits, unless some row has a NaN/Inf logit: then counts
// is left untouched and *first_bad (device memory, which the caller sets to
// `rows`) ends up holding the lowest such row. `cls` is scratch for `rows` int32.
cudaError_t launch_count_votes(DType dtype, const void* logits, int64_t rows, int64_t C,
                               int64_t row_start, int64_t m, int64_t* counts, int32_t* cls,
                               int64_t* first_bad, cudaStream_t cu_stream);

// Soft votes (see ops.cpp) for the `rows` rows of the contiguous (rows, C) logits
// (and tangents dlogits of the same dtype, may be null; sq_norm may be null):
// prob_sum, deriv_sum, score_total ((B, C), (B, C), (B,) float64, the last two may
// be null) get the rows of each input added in row order, unless some row has a
// NaN/Inf logit or tangent: then nothing is added and *first_bad (device memory,
// which the caller sets to `rows`) ends up holding the lowest such row. `stats` is
// scratch for 3 * rows doubles.
cudaError_t launch_soft_votes(DType dtype, const void* logits, const void* dlogits, const double* sq_norm,
                              int64_t rows, int64_t C, int64_t row_start, int64_t m, int64_t dim,
                              bool probabilities, double* prob_sum, double* deriv_sum, double* score_total,
                              double* stats, int64_t* first_bad, cudaStream_t cu_stream);

// ddrs::sigma_step (sigma.h) for each of the B inputs: sigma (B,), top2, dtop2 and
// bracket (B, 2), all contiguous float64; beyond (B,) bool or null; bracket is updated
// in place, next, radius and grad (B,) are written. rule is a StepRule, gap a StepGap.
cudaError_t launch_sigma_step(const double* sigma, const double* top2, const double* dtop2, const bool* beyond,
                              int64_t B, double lr,
                              double clip_lo, double clip_hi, double sigma_min, double sigma_max, int64_t rule,
                              double growth, int64_t gap, double* bracket, double* next, double* radius, double* grad,
                              cudaStream_t cu_stream);

#if defined(__CUDACC__)
// Device-side element types, shared by the .cu files. The half types wrap
// __half / __nv_bfloat16 with explicit conversions so that the shared headers'
// static_cast<float>(v) works even though torch builds with
// -D__CUDA_NO_HALF_CONVERSIONS__ (and so that no implicit conversion sneaks in).
struct Half {
  __half v;
  DDRS_HD explicit operator float() const { return __half2float(v); }
};
struct BFloat16 {
  __nv_bfloat16 v;
  DDRS_HD explicit operator float() const { return __bfloat162float(v); }
};
static_assert(sizeof(Half) == 2 && alignof(Half) == 2, "Half must have at::Half's layout");
static_assert(sizeof(BFloat16) == 2 && alignof(BFloat16) == 2, "BFloat16 must have at::BFloat16's layout");

// at::opmath_type: float for the reduced-precision types and float, double for double.
template <typename T>
struct OpMath {
  using type = float;
};
template <>
struct OpMath<double> {
  using type = double;
};

// Round-to-nearest-even, as at::Half(float) and at::BFloat16(float) do.
template <typename T>
DDRS_HD T from_opmath(typename OpMath<T>::type v) {
  return v;
}
template <>
DDRS_HD Half from_opmath<Half>(float v) {
  return Half{__float2half_rn(v)};
}
template <>
DDRS_HD BFloat16 from_opmath<BFloat16>(float v) {
  return BFloat16{__float2bfloat16_rn(v)};
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with the device type of `dtype`.
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(TypeTag<float>{});
    case DType::kFloat64: return f(TypeTag<double>{});
    case DType::kFloat16: return f(TypeTag<Half>{});
    case DType::kBFloat16: return f(TypeTag<BFloat16>{});
  }
  return cudaErrorInvalidValue;
}

// Blocks for a grid-stride loop over `items` work items: enough to fill the GPU,
// never more than the work.
inline int grid_size(int64_t items, int blocks_per_sm) {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) {
    sms = 132;
  }
  const int64_t cap = static_cast<int64_t>(sms) * blocks_per_sm;
  return static_cast<int>(items < cap ? (items > 0 ? items : 1) : cap);
}
#endif  // __CUDACC__

}  // namespace cuda
}  // namespace ddrs
