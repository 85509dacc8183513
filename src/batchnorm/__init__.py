"""batchnorm: Batch Normalization, exact and fast.

The public API; see README.md and docs/ for a tour.
"""

from . import functional, kernels, reference, stats
from .convert import from_torch, to_torch
from .functional import batch_norm, batch_norm_stateless, batch_stats, normalize
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "batch_norm",
    "batch_norm_stateless",
    "batch_stats",
    "normalize",
    "from_torch",
    "to_torch",
    "functional",
    "kernels",
    "reference",
    "stats",
]
