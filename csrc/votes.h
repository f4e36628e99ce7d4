// Per-row vote logic shared by the CPU and CUDA kernels.
#pragma once

#include <stdint.h>

#include "philox.h"  // DDRS_HD

namespace ddrs {

// Index of the largest logit (lowest index among ties), or -1 if any logit is
// NaN. +-Inf are ordinary ordered values (a model returning log-probabilities
// gives -Inf for classes of probability 0). Reads each value once, in the
// model's dtype promoted to float or double.
template <typename scalar_t, typename acc_t = float>
DDRS_HD int32_t row_argmax_as(const scalar_t* row, int64_t C) {
  int32_t best = 0;
  acc_t best_v = static_cast<acc_t>(row[0]);
  bool ordered = true;
  for (int64_t c = 0; c < C; ++c) {
    const acc_t v = static_cast<acc_t>(row[c]);
    ordered = ordered && (v == v);  // false for NaN only
    if (v > best_v) {
      best_v = v;
      best = static_cast<int32_t>(c);
    }
  }
  return ordered ? best : -1;
}

template <typename scalar_t>
DDRS_HD int32_t row_argmax(const scalar_t* row, int64_t C) {
  return row_argmax_as<scalar_t, float>(row, C);
}

template <>
DDRS_HD int32_t row_argmax<double>(const double* row, int64_t C) {
  return row_argmax_as<double, double>(row, C);
}

// The same argmax for rows already known to hold no NaN: branch-free selects,
// which the CPU runs faster than the data-dependent branch above.
template <typename scalar_t, typename acc_t>
DDRS_HD int32_t finite_row_argmax(const scalar_t* row, int64_t C) {
  int32_t best = 0;
  acc_t best_v = static_cast<acc_t>(row[0]);
  for (int64_t c = 1; c < C; ++c) {
    const acc_t v = static_cast<acc_t>(row[c]);
    const bool greater = v > best_v;
    best = greater ? static_cast<int32_t>(c) : best;
    best_v = greater ? v : best_v;
  }
  return best;
}

}  // namespace ddrs
