"""batchnorm: Batch Normalization, exact and fast.

The public API; see README.md and docs/ for a tour.
"""

from . import functional, kernels, reference, stats
from .convert import from_torch, to_torch
from .functional import batch_norm, batch_norm_stateless, batch_stats, normalize
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from . import checkpoints, variants
from .variants import (
    BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, BatchRenorm1d, BatchRenorm2d,
    BatchRenorm3d, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d,
    GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d, MaskedBatchNorm1d,
    MaskedBatchNorm2d, MaskedBatchNorm3d, freeze, unfreeze,
)
from .distributed import SyncBatchNorm
from . import diagnostics, layers
from .adapt import adapt
from .calibrate import recalibrate
from .diagnostics import diagnose, watch
from .fold import fold
from .guards import accumulate, guard
from .layers import is_batchnorm

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "SyncBatchNorm",
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
    "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d",
    "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d",
    "MaskedBatchNorm1d", "MaskedBatchNorm2d", "MaskedBatchNorm3d",
    "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d",
    "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d",
    "freeze", "unfreeze", "variants", "checkpoints",
    "fold", "recalibrate", "adapt", "diagnose", "watch", "guard", "accumulate",
    "is_batchnorm", "diagnostics", "layers",
]
