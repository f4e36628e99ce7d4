"""Seeds and noise streams (docs/reproducibility.md; the contract: docs/mathematics.md, "Random numbers").

Every Gaussian value is addressed by ``(seed, stream, sample, element)``. A
procedure draws its samples from its own range of sample indices, so that, for
example, certification's selection and estimation noise never overlap.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np
import torch

SAMPLE_SPACE = 1 << 40  # sample indices available to each phase
PHASE_SELECTION = 0 * SAMPLE_SPACE  # certify, step 1 (n0 samples)
PHASE_ESTIMATION = 1 * SAMPLE_SPACE  # certify, step 2 (n samples)
PHASE_PREDICT = 2 * SAMPLE_SPACE  # predict (n samples)
PHASE_SIGMA = 3 * SAMPLE_SPACE  # optimize_sigma: iteration t uses [t * m, (t + 1) * m)
PHASE_SURROGATE = 4 * SAMPLE_SPACE  # surrogate_radius
MAX_STREAM = 2**32


def resolve_seed(seed: int | None) -> int:
    """An explicit seed in [0, 2**64), or one drawn from torch's default generator."""
    if seed is None:
        return int(torch.empty((), dtype=torch.int64).random_().item())
    if isinstance(seed, bool):
        raise TypeError("seed must be an int or None, got a bool")
    try:
        value = operator.index(seed)
    except TypeError:
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}") from None
    if not 0 <= value < 2**64:
        raise ValueError(f"seed must lie in [0, 2**64), got {value}")
    return value


def resolve_streams(
    index: torch.Tensor | Sequence[int] | np.ndarray | None, num_inputs: int, device: torch.device
) -> torch.Tensor:
    """Per-input stream ids: ``index`` if given (e.g. dataset indices), else 0 .. B-1."""
    if index is None:
        return torch.arange(num_inputs, dtype=torch.int64, device=device)
    stream = torch.as_tensor(index)
    if stream.dtype == torch.bool or stream.is_floating_point() or stream.is_complex():
        raise TypeError(f"index must hold integers, got dtype {stream.dtype}")
    stream = stream.to(device=device, dtype=torch.int64).reshape(-1)
    if stream.shape[0] != num_inputs:
        raise ValueError(f"index must have one entry per input ({num_inputs}), got {stream.shape[0]}")
    if num_inputs and (int(stream.min()) < 0 or int(stream.max()) >= MAX_STREAM):
        raise ValueError("index entries must lie in [0, 2**32)")
    return stream
