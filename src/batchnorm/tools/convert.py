"""Converters that walk a model's module tree and swap normalisation layers.

``from_torch`` / ``to_torch`` swap torch.nn.BatchNorm1d/2d/3d and ours both ways, keeping
module names, the very same parameter and buffer tensors (so an optimizer built before the
swap keeps working and the state_dict is unchanged) and the train/eval flag.
"""

from __future__ import annotations

from torch import nn

from ..core import modules
from ..core.tree import bn_args as _bn_args
from ..core.tree import replace_modules, transplant
from ..variants.export import variant_to_torch
from ..variants.frozen import freeze, unfreeze

__all__ = [
    "replace_modules", "transplant", "from_torch", "to_torch", "freeze", "unfreeze",
    "convert_sync_batchnorm",
]

_TORCH_TO_OURS: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: modules.BatchNorm1d,
    nn.BatchNorm2d: modules.BatchNorm2d,
    nn.BatchNorm3d: modules.BatchNorm3d,
}
_OURS_TO_TORCH = {ours: theirs for theirs, ours in _TORCH_TO_OURS.items()}


def _swap_with(table: dict[type[nn.Module], type[nn.Module]]):
    def swap(m: nn.Module) -> nn.Module | None:
        cls = table.get(type(m))
        if cls is None:
            return None
        return transplant(m, cls(**_bn_args(m), device="meta"))

    return swap


def from_torch(model: nn.Module) -> nn.Module:
    """Swap every torch.nn.BatchNorm1d/2d/3d in ``model`` for batchnorm's.

    Only exact torch.nn classes are swapped (a user subclass may override forward).
    Names, parameters, buffers and the train/eval flag are kept. Returns the model (the
    swapped module when ``model`` itself is a BatchNorm)."""
    return replace_modules(model, _swap_with(_TORCH_TO_OURS))


def to_torch(model: nn.Module) -> nn.Module:
    """Swap batchnorm's BatchNorm1d/2d/3d back to torch.nn's (for export or sharing).

    The variants become the torch.nn modules closest to them (what is kept and what is
    lost: ``batchnorm.variants.export``)."""
    plain = _swap_with(_OURS_TO_TORCH)

    def swap(m: nn.Module) -> nn.Module | None:
        replaced = variant_to_torch(m)
        return plain(m) if replaced is None else replaced

    return replace_modules(model, swap)


# Sync conversion lives with SyncBatchNorm; re-exported here with the other converters.
from ..distributed import convert_sync_batchnorm  # noqa: E402
