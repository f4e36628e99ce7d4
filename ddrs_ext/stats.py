"""The statistics of certification and prediction (current SciPy API only)."""

from __future__ import annotations

import numpy as np
from scipy.stats import beta, binomtest, norm


def clopper_pearson_lower(successes: np.ndarray, trials: int, alpha: float) -> np.ndarray:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion."""
    k = np.asarray(successes, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        bound = beta.ppf(alpha, k, trials - k + 1)
    return np.where(k > 0, bound, 0.0)


def certified_radius(p_lower: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """sigma * Phi^-1(p_lower) where p_lower >= 1/2, else 0 (abstention)."""
    p = np.asarray(p_lower, dtype=np.float64)
    return np.where(p >= 0.5, np.asarray(sigma, dtype=np.float64) * norm.ppf(np.maximum(p, 0.5)), 0.0)


def top_two_pvalue(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: (class with the most votes, lowest index on ties; two-sided binomial p-value
    that the top two classes are equally likely, computed on their counts)."""
    counts = np.asarray(counts, dtype=np.int64)
    top = counts.argmax(axis=1)
    ordered = np.sort(counts, axis=1)
    c1 = ordered[:, -1]
    c2 = ordered[:, -2] if counts.shape[1] > 1 else np.zeros_like(c1)
    pvalue = np.array([binomtest(int(a), int(a + b), 0.5).pvalue for a, b in zip(c1, c2)], dtype=np.float64)
    return top, pvalue


def clopper_pearson_upper(successes: np.ndarray, trials: int, alpha: float) -> np.ndarray:
    """One-sided (1 - alpha) Clopper-Pearson upper bound on a binomial proportion (1 when all succeed)."""
    k = np.asarray(successes, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        bound = beta.isf(alpha, k + 1, trials - k)
    return np.where(k < trials, bound, 1.0)
