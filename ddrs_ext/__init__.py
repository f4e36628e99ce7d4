"""ddrs_ext: Data Dependent Randomized Smoothing as fused PyTorch C++/CUDA kernels."""
from ddrs_ext import ops  # noqa: F401  (registers the kernels)
