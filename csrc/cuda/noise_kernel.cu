// CUDA noise kernels: the same Gaussian (philox.h) and uniform (uniform.h) values as
// csrc/cpu/noise_kernel.cpp, bit for bit (built with --fmad=false), and the same float
// ops per element.
#include <cuda_runtime.h>
#include <stdint.h>

#include "../philox.h"
#include "../uniform.h"
#include "launchers.h"

namespace ddrs {
namespace cuda {
namespace {

// One CUDA block handles one tile of a row: each thread one Philox counter block
// (4 elements). The tile size fixes the sq_norm summation order, so it is a
// constant of the algorithm, not a launch parameter.
constexpr int kThreads = 256;
constexpr int kTile = 4 * kThreads;
constexpr int kWarps = kThreads / 32;

// Sum of `v` over the block in a fixed tree order; the result is valid in thread 0.
__device__ double block_sum(double v, double* warp_sums) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xFFFFFFFFu, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? warp_sums[lane] : 0.0;
    for (int offset = kWarps / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xFFFFFFFFu, v, offset);
  }
  return v;
}

// The two noise families: four values of one counter block, under the family's key.
struct GaussianNoise {
  static __device__ __forceinline__ float4 block(PhiloxKey key, uint32_t stream, uint64_t sample, uint32_t b) {
    const Gauss4 w = gaussian_block(key, stream, sample, b);
    return make_float4(w.z0, w.z1, w.z2, w.z3);
  }
};
struct UniformNoise {
  static __device__ __forceinline__ float4 block(PhiloxKey key, uint32_t stream, uint64_t sample, uint32_t b) {
    const Uniform4 w = uniform_block(key, stream, sample, b);
    return make_float4(w.z0, w.z1, w.z2, w.z3);
  }
};

// Grid-stride loop over the (row, tile) items of the output. The noise values of a
// tile go through shared memory so that the x loads and out stores are
// coalesced element by element whatever D's alignment. partial[item] gets the
// tile's sum of eps^2 (with one tile per row, partial is sq_norm itself).
template <typename scalar_t, typename Family, bool kSqNorm>
__global__ void __launch_bounds__(kThreads)
    perturb_kernel(const scalar_t* __restrict__ x, const double* __restrict__ sigma,
                   const int64_t* __restrict__ stream, PhiloxKey key, uint64_t sample_offset, int64_t m,
                   int64_t row_start, int64_t num_rows, int64_t D, int64_t tiles_per_row,
                   scalar_t* __restrict__ out, double* __restrict__ partial) {
  using opmath_t = typename OpMath<scalar_t>::type;
  __shared__ float4 z4[kThreads];
  __shared__ double warp_sums[kWarps];
  const float* z = reinterpret_cast<const float*>(z4);
  const int tid = threadIdx.x;
  const int64_t items = num_rows * tiles_per_row;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t r = item / tiles_per_row, t = item - r * tiles_per_row;
    const int64_t g = row_start + r, b = g / m;
    const uint64_t sample = sample_offset + static_cast<uint64_t>(g - b * m);
    const int64_t j0 = t * kTile;
    const int len = static_cast<int>(D - j0 < kTile ? D - j0 : kTile);
    double sq = 0.0;
    if (4 * tid < len) {
      const float4 w = Family::block(key, static_cast<uint32_t>(stream[b]), sample,
                                     static_cast<uint32_t>(j0 / 4 + tid));
      z4[tid] = w;
      if (kSqNorm) {
        const float v[4] = {w.x, w.y, w.z, w.w};
        for (int k = 0; k < 4 && 4 * tid + k < len; ++k) sq += static_cast<double>(v[k]) * v[k];
      }
    }
    __syncthreads();
    const scalar_t* xb = x + b * D + j0;
    scalar_t* o = out + r * D + j0;
    const opmath_t s = static_cast<opmath_t>(sigma[b]);
    for (int e = tid; e < len; e += kThreads) {
      o[e] = from_opmath<scalar_t>(static_cast<opmath_t>(xb[e]) + s * static_cast<opmath_t>(z[e]));
    }
    if (kSqNorm) {
      sq = block_sum(sq, warp_sums);
      if (tid == 0) partial[item] = sq;
    }
    __syncthreads();  // z4 and warp_sums are reused by the next item
  }
}

// sq_norm[r] = sum of the row's tile partials, in tile order.
__global__ void sum_tiles_kernel(const double* __restrict__ partial, int64_t num_rows, int64_t tiles_per_row,
                                 double* __restrict__ sq_norm) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < num_rows; r += stride) {
    const double* p = partial + r * tiles_per_row;
    double acc = 0.0;
    for (int64_t t = 0; t < tiles_per_row; ++t) acc += p[t];
    sq_norm[r] = acc;
  }
}

__global__ void __launch_bounds__(kThreads)
    find_bad_stream_kernel(const int64_t* __restrict__ stream, int64_t B, int64_t* __restrict__ result) {
  __shared__ int64_t lowest[kThreads];
  int64_t mine = B;
  for (int64_t b = threadIdx.x; b < B && mine == B; b += kThreads) {
    if (stream[b] < 0 || stream[b] > int64_t{0xFFFFFFFF}) mine = b;
  }
  lowest[threadIdx.x] = mine;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half && lowest[threadIdx.x + half] < lowest[threadIdx.x]) {
      lowest[threadIdx.x] = lowest[threadIdx.x + half];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    result[0] = lowest[0];
    result[1] = lowest[0] < B ? stream[lowest[0]] : 0;
  }
}

}  // namespace

int64_t perturb_gaussian_scratch_size(int64_t num_rows, int64_t D) {
  const int64_t tiles_per_row = (D + kTile - 1) / kTile;
  return tiles_per_row > 1 ? num_rows * tiles_per_row : 0;
}

cudaError_t launch_perturb_gaussian(DType dtype, const void* x, const double* sigma, const int64_t* stream,
                                    uint64_t seed, int64_t sample_offset, int64_t m, int64_t row_start,
                                    int64_t num_rows, int64_t D, void* out, double* sq_norm, double* scratch,
                                    cudaStream_t cu_stream) {
  if (num_rows <= 0 || D <= 0) return cudaSuccess;
  const int64_t tiles_per_row = (D + kTile - 1) / kTile;
  const int64_t items = num_rows * tiles_per_row;
  // 32-48 registers a thread: 8 blocks of 256 threads fill an SM.
  const int grid = grid_size(items, 8);
  const PhiloxKey key = philox_key(seed);
  double* partial = tiles_per_row > 1 ? scratch : sq_norm;
  if (sq_norm != nullptr && partial == nullptr) return cudaErrorInvalidValue;
  const cudaError_t err = dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const scalar_t* xs = static_cast<const scalar_t*>(x);
    scalar_t* os = static_cast<scalar_t*>(out);
    if (sq_norm != nullptr) {
      perturb_kernel<scalar_t, GaussianNoise, true><<<grid, kThreads, 0, cu_stream>>>(
          xs, sigma, stream, key, static_cast<uint64_t>(sample_offset), m, row_start, num_rows, D,
          tiles_per_row, os, partial);
    } else {
      perturb_kernel<scalar_t, GaussianNoise, false><<<grid, kThreads, 0, cu_stream>>>(
          xs, sigma, stream, key, static_cast<uint64_t>(sample_offset), m, row_start, num_rows, D,
          tiles_per_row, os, nullptr);
    }
    return cudaGetLastError();
  });
  if (err != cudaSuccess || sq_norm == nullptr || tiles_per_row == 1) return err;
  constexpr int kSumThreads = 128;
  sum_tiles_kernel<<<grid_size((num_rows + kSumThreads - 1) / kSumThreads, 4), kSumThreads, 0, cu_stream>>>(
      scratch, num_rows, tiles_per_row, sq_norm);
  return cudaGetLastError();
}

cudaError_t launch_perturb_uniform(DType dtype, const void* x, const double* theta, const int64_t* stream,
                                   uint64_t seed, int64_t sample_offset, int64_t m, int64_t row_start,
                                   int64_t num_rows, int64_t D, void* out, cudaStream_t cu_stream) {
  if (num_rows <= 0 || D <= 0) return cudaSuccess;
  const int64_t tiles_per_row = (D + kTile - 1) / kTile;
  const int grid = grid_size(num_rows * tiles_per_row, 8);
  const PhiloxKey key = uniform_key(seed);
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    perturb_kernel<scalar_t, UniformNoise, false><<<grid, kThreads, 0, cu_stream>>>(
        static_cast<const scalar_t*>(x), theta, stream, key, static_cast<uint64_t>(sample_offset), m, row_start,
        num_rows, D, tiles_per_row, static_cast<scalar_t*>(out), nullptr);
    return cudaGetLastError();
  });
}

cudaError_t launch_find_bad_stream(const int64_t* stream, int64_t B, int64_t* result,
                                   cudaStream_t cu_stream) {
  find_bad_stream_kernel<<<1, kThreads, 0, cu_stream>>>(stream, B, result);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace ddrs
