// The data-dependent sigma step (docs/mathematics.md, "Data-dependent sigma"; the paper's Algorithm 1),
// shared by the CPU and CUDA kernels: the surrogate certified radius
//     R(sigma) = sigma / 2 * (Phi^-1(clip E_A) - Phi^-1(clip E_B))      (Gaussian noise, L2), or
//     R(theta) = theta * (clip E_A - clip E_B)                          (uniform noise, L1),
// its closed-form derivative in sigma (theta) and one update of sigma (theta).
#pragma once

#include <math.h>
#include <stdint.h>

#include "philox.h"  // DDRS_HD

namespace ddrs {

// What the soft votes accept of a model's output row. With logits (softmax mode),
// -Inf is an ordinary value (a class of probability 0, as from log(softmax(z)));
// NaN, +Inf and rows of only -Inf have no softmax. Probabilities must be finite.
// A tangent (d logit / d sigma) must be finite wherever the logit is finite.
struct SoftRowCheck {
  double top = -INFINITY;
  bool good = true;
  DDRS_HD void value(double v, bool probabilities) {
    const bool finite = v - v == 0.0;
    good = good && (finite || (!probabilities && v == -INFINITY));
    top = v > top ? v : top;
  }
  DDRS_HD void tangent(double v, double d) { good = good && (v == -INFINITY || d - d == 0.0); }
  DDRS_HD bool ok(bool probabilities) const { return good && (probabilities || top > -INFINITY); }
};

// The tangent a class contributes: none for a -Inf logit, whose probability is 0 nearby.
DDRS_HD double tangent_of(double v, double d) { return v == -INFINITY ? 0.0 : d; }

constexpr double kSqrt2Pi = 2.50662827463100050242;
constexpr double kInvSqrt2 = 0.70710678118654752440;

DDRS_HD double normal_pdf(double z) { return exp(-0.5 * z * z) / kSqrt2Pi; }

DDRS_HD double normal_cdf(double z) { return 0.5 * erfc(-z * kInvSqrt2); }

// Phi^-1(p) for p in (0, 1): a rational first guess (Abramowitz & Stegun 26.2.23,
// error below 4.5e-4) refined by three Halley steps on Phi(z) - p, each of which
// cubes the relative error, so the result is as accurate as erfc (~1e-16).
// The lower tail is solved directly, the upper one by symmetry.
DDRS_HD double normal_icdf(double p) {
  if (!(p > 0.0 && p < 1.0)) {
    return p == 0.0 ? -INFINITY : (p == 1.0 ? INFINITY : NAN);
  }
  const bool upper = p > 0.5;
  const double q = upper ? 1.0 - p : p;  // exact for p >= 1/2
  const double t = sqrt(-2.0 * log(q));
  double z = -(t - (2.515517 + t * (0.802853 + t * 0.010328)) /
                       (1.0 + t * (1.432788 + t * (0.189269 + t * 0.001308))));
  for (int step = 0; step < 3; ++step) {
    const double e = normal_cdf(z) - q;
    const double u = e * kSqrt2Pi * exp(0.5 * z * z);
    z -= u / (1.0 + 0.5 * z * u);
  }
  return upper ? -z : z;
}

enum class StepRule : int64_t {
  kAscent = 0,  // sigma += lr * dR/dsigma (the paper's)
  kBisect = 1,  // bracket the zero of dR/dsigma geometrically, then bisect it
};

// Which surrogate: the gap between the top two classes that the radius scales.
enum class StepGap : int64_t {
  kProbit = 0,  // sigma / 2 * (Phi^-1(E_A) - Phi^-1(E_B)): Gaussian noise's L2 radius
  kLinear = 1,  // theta * (E_A - E_B): uniform noise's L1 radius (Yang et al. 2020)
};

struct SigmaStepParams {
  double lr, clip_lo, clip_hi, sigma_min, sigma_max, growth;
  StepRule rule;
  StepGap gap = StepGap::kProbit;
};

struct SigmaStepOut {
  double sigma, radius, grad;
};

DDRS_HD double clamp_to(double v, double lo, double hi) { return v < lo ? lo : (v > hi ? hi : v); }

// One step for one input. e_a >= e_b are the two largest entries of psi(sigma),
// de_a and de_b their derivatives in sigma. A clipped entry contributes no
// derivative (like torch.clamp, whose gradient passes on the closed interval).
// bracket = (lo, hi): sigmas known to lie below / above the optimum (0: none yet),
// read and updated by the bisection rule only, which also takes `beyond` (treat this
// sigma as above the optimum whatever the gradient) as an outside verdict.
DDRS_HD SigmaStepOut sigma_step(double sigma, double e_a, double e_b, double de_a, double de_b,
                                const SigmaStepParams& p, double* bracket, bool beyond = false) {
  const double ca = clamp_to(e_a, p.clip_lo, p.clip_hi);
  const double cb = clamp_to(e_b, p.clip_lo, p.clip_hi);
  const bool free_a = e_a >= p.clip_lo && e_a <= p.clip_hi;
  const bool free_b = e_b >= p.clip_lo && e_b <= p.clip_hi;
  SigmaStepOut out;
  if (p.gap == StepGap::kLinear) {
    const double slope_a = free_a ? de_a : 0.0;
    const double slope_b = free_b ? de_b : 0.0;
    out.radius = sigma * (ca - cb);
    out.grad = (ca - cb) + sigma * (slope_a - slope_b);
  } else {
    const double qa = normal_icdf(ca);
    const double qb = normal_icdf(cb);
    const double slope_a = free_a ? de_a / normal_pdf(qa) : 0.0;
    const double slope_b = free_b ? de_b / normal_pdf(qb) : 0.0;
    out.radius = 0.5 * sigma * (qa - qb);
    out.grad = 0.5 * (qa - qb) + 0.5 * sigma * (slope_a - slope_b);
  }
  double next;
  if (p.rule == StepRule::kAscent) {
    next = sigma + p.lr * out.grad;
  } else {
    double& lo = bracket[0];
    double& hi = bracket[1];
    if (out.grad > 0.0 && !beyond) {
      lo = sigma;
    } else {
      hi = sigma;
    }
    if (lo > 0.0 && hi > 0.0) {
      next = sqrt(lo * hi);
    } else {
      next = lo > 0.0 ? sigma * p.growth : sigma / p.growth;
    }
  }
  // NaN (from NaN inputs) stays NaN so that the caller can report it.
  out.sigma = next != next ? next : clamp_to(next, p.sigma_min, p.sigma_max);
  return out;
}

}  // namespace ddrs
