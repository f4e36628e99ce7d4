"""ddrs_ext: Data Dependent Randomized Smoothing as fused PyTorch C++/CUDA kernels.

from ddrs_ext import certify
result = certify(model, x, sigma=0.25, n0=100, n=100_000, alpha=0.001)
"""

# First, before anything imports torch: OpenMP's idle threads wait passively unless the environment
# chooses (ddrs_ext._threads; set OMP_WAIT_POLICY=ACTIVE to keep OpenMP's default).
from ddrs_ext._threads import prefer_passive_wait as _prefer_passive_wait

_prefer_passive_wait()

from ddrs_ext import distributed, noise, ops  # noqa: E402, F401  (ops: loads and registers the kernels)
from ddrs_ext.certification import ABSTAIN, CertifyResult, certify, predict  # noqa: E402
from ddrs_ext.dual import DualCertifyResult, certify_dual  # noqa: E402
from ddrs_ext.memory import CertificationMemory  # noqa: E402
from ddrs_ext.precision import Evaluated  # noqa: E402
from ddrs_ext.routing import CascadeCertifyResult, certify_cascade  # noqa: E402
from ddrs_ext.sequential import certify_sequential  # noqa: E402
from ddrs_ext.sigma import (  # noqa: E402
    PAPER_DATASET_SETTINGS,
    PAPER_L1_SETTINGS,
    PAPER_SETTINGS,
    SigmaStep,
    optimize_sigma,
    optimize_theta,
    surrogate_radius,
)
from ddrs_ext.smooth import Smooth  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "ABSTAIN",
    "CascadeCertifyResult",
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
    "certify_cascade",
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
