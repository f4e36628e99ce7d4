// CUDA kernels of the sigma optimisation: soft votes and the sigma step, with the
// CPU kernels' maths (csrc/cpu/sigma_kernel.cpp, csrc/sigma.h).
//
// Soft votes are float64 sums that callers accumulate chunk by chunk, so they are
// added strictly in row order, one thread per (input, class), and never with
// floating-point atomics: the sums are then the same whatever the launch shape and
// however the rows were chunked across calls.
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "../sigma.h"
#include "launchers.h"

namespace ddrs {
namespace cuda {
namespace {

constexpr int kThreads = 256;
static_assert(sizeof(long long) == sizeof(int64_t), "atomics on int64 go through long long");

// A value of the model's dtype as the CPU kernel reads it: promoted to float
// (double for double), then to double.
template <typename scalar_t>
__device__ __forceinline__ double to_double(scalar_t v) {
  return static_cast<double>(static_cast<typename OpMath<scalar_t>::type>(v));
}

// Butterfly reductions over the `width` lanes (a power of two <= 32) of an aligned
// lane group. Every lane takes part (the mask is the whole warp) and every lane of
// a group ends with the same bits, since IEEE addition is commutative.
__device__ __forceinline__ double group_sum(double v, int width) {
  for (int o = width / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  return v;
}
__device__ __forceinline__ double group_max(double v, int width) {
  for (int o = width / 2; o > 0; o /= 2) {
    const double w = __shfl_xor_sync(0xFFFFFFFFu, v, o);
    v = w > v ? w : v;
  }
  return v;
}
__device__ __forceinline__ bool group_all(bool v, int width) {
  int i = v ? 1 : 0;
  for (int o = width / 2; o > 0; o /= 2) i &= __shfl_xor_sync(0xFFFFFFFFu, i, o);
  return i != 0;
}

// Per-row statistics, one aligned group of `width` lanes per row (width depends on
// C only, so the summation order is a function of the row alone): lane j of the
// group reads columns j, j + width, ... in order, then the group reduces.
//   stats[3r] = max of the row, stats[3r + 1] = sum of exp(v - max),
//   stats[3r + 2] = <p, d> with p = softmax(row), d = the row's tangents.
// Only what the mode needs is computed. A row that SoftRowCheck (sigma.h) refuses
// lowers *first_bad to r.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    row_stats_kernel(const scalar_t* __restrict__ logits, const scalar_t* __restrict__ dlogits, int64_t rows,
                     int64_t C, int width, bool softmax, double* __restrict__ stats,
                     int64_t* __restrict__ first_bad) {
  const int lane = threadIdx.x % 32;
  const int group = lane / width, sub = lane % width;
  const int64_t per_warp = 32 / width;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kThreads / 32);
  // The loop bound is uniform over the warp, so every lane reaches the shuffles.
  for (int64_t base = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / 32 * per_warp; base < rows;
       base += warps * per_warp) {
    const int64_t r = base + group;
    const bool active = r < rows;
    const scalar_t* row = logits + (active ? r : 0) * C;
    const scalar_t* d = dlogits != nullptr ? dlogits + (active ? r : 0) * C : nullptr;
    SoftRowCheck check;
    if (active) {
      for (int64_t c = sub; c < C; c += width) check.value(to_double(row[c]), !softmax);
      if (d != nullptr) {
        for (int64_t c = sub; c < C; c += width) check.tangent(to_double(row[c]), to_double(d[c]));
      }
    }
    double top = group_max(check.top, width);
    const bool finite = group_all(check.good, width) && (!softmax || top > -INFINITY);
    double total = 0.0, mean = 0.0;
    if (softmax) {
      if (active && finite) {
        for (int64_t c = sub; c < C; c += width) total += exp(to_double(row[c]) - top);
      }
      total = group_sum(total, width);
      if (d != nullptr) {
        if (active && finite) {
          for (int64_t c = sub; c < C; c += width) {
            const double v = to_double(row[c]);
            mean += exp(v - top) / total * tangent_of(v, to_double(d[c]));
          }
        }
        mean = group_sum(mean, width);
      }
    }
    if (active && sub == 0) {
      stats[3 * r] = top;
      stats[3 * r + 1] = total;
      stats[3 * r + 2] = mean;
      if (!finite) atomicMin(reinterpret_cast<long long*>(first_bad), static_cast<long long>(r));
    }
  }
}

// One thread per (input b, class c) of the inputs the chunk touches: adds the
// chunk's rows of b into prob_sum[b, c] (and deriv_sum[b, c]; score_total[b] by
// the c = 0 thread) in row order, from registers that start at the stored sums,
// which is exactly the CPU kernel's sequence of += . Skipped entirely if any row
// was bad, so that an error leaves every sum untouched.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    accumulate_kernel(const scalar_t* __restrict__ logits, const scalar_t* __restrict__ dlogits,
                      const double* __restrict__ sq_norm, const double* __restrict__ stats, int64_t rows,
                      int64_t C, int64_t row_start, int64_t m, double dim, bool softmax,
                      const int64_t* __restrict__ first_bad, double* __restrict__ prob_sum,
                      double* __restrict__ deriv_sum, double* __restrict__ score_total) {
  if (*first_bad != rows) return;
  const int64_t first = row_start / m;
  const int64_t items = ((row_start + rows - 1) / m - first + 1) * C;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; item < items; item += stride) {
    const int64_t b = first + item / C, c = item % C;
    const int64_t r0 = b * m - row_start > 0 ? b * m - row_start : 0;
    const int64_t r1 = (b + 1) * m - row_start < rows ? (b + 1) * m - row_start : rows;
    const bool total_here = score_total != nullptr && c == 0;
    double ps = prob_sum[b * C + c];
    double ds = deriv_sum != nullptr ? deriv_sum[b * C + c] : 0.0;
    double st = total_here ? score_total[b] : 0.0;
    for (int64_t r = r0; r < r1; ++r) {
      const double v = to_double(logits[r * C + c]);
      const double p = softmax ? exp(v - stats[3 * r]) / stats[3 * r + 1] : v;
      ps += p;
      if (dlogits != nullptr) {
        const double dv = tangent_of(v, to_double(dlogits[r * C + c]));
        ds += softmax ? p * (dv - stats[3 * r + 2]) : dv;  // d softmax = p * (d - <p, d>)
      } else if (sq_norm != nullptr) {
        const double s = sq_norm[r] - dim;
        if (deriv_sum != nullptr) ds += p * s;
        if (total_here) st += s;
      }
    }
    prob_sum[b * C + c] = ps;
    if (deriv_sum != nullptr) deriv_sum[b * C + c] = ds;
    if (total_here) score_total[b] = st;
  }
}

__global__ void __launch_bounds__(kThreads)
    sigma_step_kernel(const double* __restrict__ sigma, const double* __restrict__ top2,
                      const double* __restrict__ dtop2, const bool* __restrict__ beyond, SigmaStepParams params,
                      int64_t B, double* __restrict__ bracket, double* __restrict__ next, double* __restrict__ radius,
                      double* __restrict__ grad) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; b < B; b += stride) {
    const SigmaStepOut o =
        sigma_step(sigma[b], top2[2 * b], top2[2 * b + 1], dtop2[2 * b], dtop2[2 * b + 1], params, bracket + 2 * b,
                   beyond != nullptr && beyond[b]);
    next[b] = o.sigma;
    radius[b] = o.radius;
    grad[b] = o.grad;
  }
}

}  // namespace

cudaError_t launch_soft_votes(DType dtype, const void* logits, const void* dlogits, const double* sq_norm,
                              int64_t rows, int64_t C, int64_t row_start, int64_t m, int64_t dim,
                              bool probabilities, double* prob_sum, double* deriv_sum, double* score_total,
                              double* stats, int64_t* first_bad, cudaStream_t cu_stream) {
  if (rows <= 0) return cudaSuccess;
  int width = 1;
  while (width < 32 && width < C) width *= 2;
  const int64_t rows_per_block = kThreads / width;
  const int64_t items = ((row_start + rows - 1) / m - row_start / m + 1) * C;
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const scalar_t* lp = static_cast<const scalar_t*>(logits);
    const scalar_t* dp = static_cast<const scalar_t*>(dlogits);
    row_stats_kernel<scalar_t><<<grid_size((rows + rows_per_block - 1) / rows_per_block, 8), kThreads, 0,
                                 cu_stream>>>(lp, dp, rows, C, width, !probabilities, stats, first_bad);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    accumulate_kernel<scalar_t><<<grid_size((items + kThreads - 1) / kThreads, 8), kThreads, 0, cu_stream>>>(
        lp, dp, sq_norm, stats, rows, C, row_start, m, static_cast<double>(dim), !probabilities, first_bad,
        prob_sum, deriv_sum, score_total);
    return cudaGetLastError();
  });
}

cudaError_t launch_sigma_step(const double* sigma, const double* top2, const double* dtop2, const bool* beyond,
                              int64_t B, double lr,
                              double clip_lo, double clip_hi, double sigma_min, double sigma_max, int64_t rule,
                              double growth, int64_t gap, double* bracket, double* next, double* radius, double* grad,
                              cudaStream_t cu_stream) {
  if (B <= 0) return cudaSuccess;
  const SigmaStepParams params{lr,     clip_lo, clip_hi, sigma_min, sigma_max, growth, static_cast<StepRule>(rule),
                               static_cast<StepGap>(gap)};
  sigma_step_kernel<<<grid_size((B + kThreads - 1) / kThreads, 4), kThreads, 0, cu_stream>>>(
      sigma, top2, dtop2, beyond, params, B, bracket, next, radius, grad);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace ddrs
