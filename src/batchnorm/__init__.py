"""batchnorm: Batch Normalization, exact and fast.

The public API; see README.md and docs/ for a tour.
"""

import sys

from . import kernels
from .core import autograd, functional, modules, ops, reference, stats
from .core.functional import batch_norm, batch_norm_stateless, batch_stats, normalize
from .core.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from . import variants
from .variants import (
    BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, BatchRenorm1d, BatchRenorm2d,
    BatchRenorm3d, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d,
    GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d, MaskedBatchNorm1d,
    MaskedBatchNorm2d, MaskedBatchNorm3d, freeze, unfreeze,
)
from .distributed import SyncBatchNorm
from .tools import adapt as _adapt
from .tools import calibrate as _calibrate
from .tools import convert, diagnostics, fold as _fold, guards, keras_flax
from .tools import _data, find_layers
from .tools.adapt import adapt
from .tools.calibrate import recalibrate
from .tools.convert import from_torch, to_torch
from .tools.diagnostics import diagnose, watch
from .tools.find_layers import is_batchnorm
from .tools.fold import fold
from .tools.guards import accumulate, guard

#: Modules of earlier releases' flat layout, importable under their old paths (the very
#: same module objects, so ``from batchnorm.functional import batch_norm`` and
#: ``batchnorm.layers.is_batchnorm`` keep working). ``batchnorm.kernels`` does the same
#: for its backends' old paths.
_OLD_PATHS = {
    "functional": functional, "modules": modules, "stats": stats, "reference": reference,
    "autograd": autograd, "ops": ops, "convert": convert, "diagnostics": diagnostics,
    "guards": guards, "fold": _fold, "calibrate": _calibrate, "adapt": _adapt,
    "_data": _data, "layers": find_layers, "checkpoints": keras_flax,
}
for _name, _module in _OLD_PATHS.items():
    sys.modules[f"{__name__}.{_name}"] = _module
layers, checkpoints = find_layers, keras_flax

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
