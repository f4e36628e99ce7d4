"""ddrs_ext: Data Dependent Randomized Smoothing as fused PyTorch C++/CUDA kernels.

from ddrs_ext import certify
result = certify(model, x, sigma=0.25, n0=100, n=100_000, alpha=0.001)
"""

from ddrs_ext import distributed, noise, ops  # noqa: F401  (ops: loads and registers the kernels)
from ddrs_ext.certification import ABSTAIN, CertifyResult, certify, predict
from ddrs_ext.dual import DualCertifyResult, certify_dual
from ddrs_ext.memory import CertificationMemory
from ddrs_ext.precision import Evaluated
from ddrs_ext.sequential import certify_sequential
from ddrs_ext.sigma import (
    PAPER_DATASET_SETTINGS,
    PAPER_L1_SETTINGS,
    PAPER_SETTINGS,
    SigmaStep,
    optimize_sigma,
    optimize_theta,
    surrogate_radius,
)
from ddrs_ext.smooth import Smooth

__version__ = "0.1.0"
__all__ = [
    "ABSTAIN",
    "PAPER_DATASET_SETTINGS",
    "PAPER_L1_SETTINGS",
    "PAPER_SETTINGS",
    "CertifyResult",
    "CertificationMemory",
    "DualCertifyResult",
    "Evaluated",
    "SigmaStep",
    "Smooth",
    "certify",
    "certify_dual",
    "certify_sequential",
    "distributed",
    "noise",
    "ops",
    "optimize_sigma",
    "optimize_theta",
    "predict",
    "surrogate_radius",
]
