// CUDA vote kernel: per-row argmax with votes.h's row_argmax (the CPU kernel's
// logic), then integer atomics into the counts, which are therefore exact and
// independent of the launch.
#include <cuda_runtime.h>
#include <stdint.h>

#include "../votes.h"
#include "launchers.h"

namespace ddrs {
namespace cuda {
namespace {

constexpr int kThreads = 256;
static_assert(sizeof(long long) == sizeof(int64_t), "atomics on int64 go through long long");

// One warp per row. Lane l runs row_argmax on its contiguous segment of the row;
// the lanes' (value, index) pairs are then merged, larger value first and lower
// index among equal values, which is exactly the sequential rule (first maximum).
// Any non-finite logit in the row makes the row's class -1.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    argmax_kernel(const scalar_t* __restrict__ logits, int64_t rows, int64_t C, int32_t* __restrict__ cls,
                  int64_t* __restrict__ first_bad) {
  using acc_t = typename OpMath<scalar_t>::type;
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kThreads / 32);
  const int64_t seg = (C + 31) / 32;
  const int64_t begin = lane * seg < C ? lane * seg : C;
  const int64_t len = (C - begin < seg ? C - begin : seg);
  for (int64_t r = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / 32; r < rows; r += warps) {
    const scalar_t* row = logits + r * C;
    bool finite = true, have = len > 0;
    int64_t best = INT64_MAX;
    acc_t best_v = 0;
    if (have) {
      const int32_t i = row_argmax(row + begin, len);
      finite = i >= 0;
      best = begin + (finite ? i : 0);
      best_v = static_cast<acc_t>(row[best]);
    }
    for (int offset = 16; offset > 0; offset /= 2) {
      const bool o_have = __shfl_xor_sync(0xFFFFFFFFu, have, offset);
      const bool o_finite = __shfl_xor_sync(0xFFFFFFFFu, finite, offset);
      const int64_t o_best = __shfl_xor_sync(0xFFFFFFFFu, best, offset);
      const acc_t o_v = __shfl_xor_sync(0xFFFFFFFFu, best_v, offset);
      finite = finite && o_finite;
      if (o_have && (!have || o_v > best_v || (o_v == best_v && o_best < best))) {
        best = o_best;
        best_v = o_v;
      }
      have = have || o_have;
    }
    if (lane == 0) {
      cls[r] = finite ? static_cast<int32_t>(best) : -1;
      if (!finite) atomicMin(reinterpret_cast<long long*>(first_bad), static_cast<long long>(r));
    }
  }
}

// counts[(row_start + r) / m, cls[r]] += 1, skipped entirely if any row was bad.
// Lanes of a warp that vote for the same (input, class), the common case, add
// their votes with one atomic.
__global__ void __launch_bounds__(kThreads)
    add_votes_kernel(const int32_t* __restrict__ cls, int64_t rows, int64_t C, int64_t row_start, int64_t m,
                     const int64_t* __restrict__ first_bad, int64_t* __restrict__ counts) {
  if (*first_bad != rows) return;
  const int lane = threadIdx.x % 32;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  // The loop bound is uniform over the warp, so every lane reaches the __match_any_sync.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x - lane; base < rows;
       base += stride) {
    const int64_t r = base + lane;
    const long long slot = r < rows ? ((row_start + r) / m) * C + cls[r] : -1;
    const unsigned same = __match_any_sync(0xFFFFFFFFu, slot);
    if (slot >= 0 && lane == __ffs(same) - 1) {
      atomicAdd(reinterpret_cast<unsigned long long*>(counts + slot),
                static_cast<unsigned long long>(__popc(same)));
    }
  }
}

}  // namespace

cudaError_t launch_count_votes(DType dtype, const void* logits, int64_t rows, int64_t C, int64_t row_start,
                               int64_t m, int64_t* counts, int32_t* cls, int64_t* first_bad,
                               cudaStream_t cu_stream) {
  if (rows <= 0) return cudaSuccess;
  constexpr int kRowsPerBlock = kThreads / 32;
  const cudaError_t err = dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    argmax_kernel<scalar_t><<<grid_size((rows + kRowsPerBlock - 1) / kRowsPerBlock, 8), kThreads, 0,
                              cu_stream>>>(static_cast<const scalar_t*>(logits), rows, C, cls, first_bad);
    return cudaGetLastError();
  });
  if (err != cudaSuccess) return err;
  add_votes_kernel<<<grid_size((rows + kThreads - 1) / kThreads, 8), kThreads, 0, cu_stream>>>(
      cls, rows, C, row_start, m, first_bad, counts);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace ddrs
