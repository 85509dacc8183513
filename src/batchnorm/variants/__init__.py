"""BatchNorm variants, one concept per module, all drop-in shaped like torch.nn's BN.

- ``renorm``: Batch Renormalization (Ioffe 2017), ``BatchRenorm1d/2d/3d``.
- ``ghost``: Ghost BN (Hoffer et al. 2017), ``GhostBatchNorm1d/2d/3d``.
- ``masked``: masked / weighted statistics, ``MaskedBatchNorm1d/2d/3d`` and
  ``masked_batch_norm`` (also ``batchnorm.batch_norm(..., mask=...)``).
- ``frozen``: ``FrozenBatchNorm1d/2d/3d`` and ``freeze`` / ``unfreeze``.
- ``act``: BN + activation in one layer, ``BatchNormAct1d/2d/3d``, keeping only the output
  for invertible activations.

For converters: ``TRAINABLE`` holds the variant classes that compute batch statistics in
training (each subclasses ``batchnorm.modules._BatchNorm``: same parameters and buffers as
BatchNorm), ``FROZEN`` those that never do, ``ALL`` both; ``is_variant(m)`` tells whether a
module is one of them.
"""

from torch import nn

from .act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from .frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, freeze, unfreeze
from .ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from .masked import MaskedBatchNorm1d, MaskedBatchNorm2d, MaskedBatchNorm3d, masked_batch_norm
from .renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d

TRAINABLE = (
    BatchRenorm1d, BatchRenorm2d, BatchRenorm3d,
    GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d,
    MaskedBatchNorm1d, MaskedBatchNorm2d, MaskedBatchNorm3d,
    BatchNormAct1d, BatchNormAct2d, BatchNormAct3d,
)
FROZEN = (FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d)
ALL = TRAINABLE + FROZEN


def is_variant(m: nn.Module) -> bool:
    """Whether ``m`` is one of batchnorm's BN variants (any class in ``ALL``)."""
    return isinstance(m, ALL)


__all__ = [
    "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d",
    "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d",
    "MaskedBatchNorm1d", "MaskedBatchNorm2d", "MaskedBatchNorm3d", "masked_batch_norm",
    "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "freeze", "unfreeze",
    "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d",
    "TRAINABLE", "FROZEN", "ALL", "is_variant",
]
