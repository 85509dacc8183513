"""Each variant as plain torch.nn modules, for ``batchnorm.to_torch`` (export, sharing).

torch.nn has none of the variants, so the conversion keeps what torch can express:

- BatchRenorm / GhostBatchNorm / MaskedBatchNorm -> ``torch.nn.BatchNorm{1,2,3}d`` with the
  very same parameter and buffer tensors. Evaluation is identical; training loses the
  r/d correction (renorm), the virtual sub-batches (ghost) or the ``mask`` argument.
- BatchNormAct -> ``torch.nn.Sequential(BatchNorm{1,2,3}d, activation)``: the same
  numbers, but state_dict keys gain a ``0.`` (e.g. ``bn.weight`` -> ``bn.0.weight``) and
  the memory saving is gone.
- FrozenBatchNorm -> ``torch.nn.BatchNorm{1,2,3}d`` in eval mode with parameters that do
  not require grad, the same statistics and state_dict keys. torch.nn has no frozen BN:
  calling ``.train()`` on the model makes it use batch statistics again.
"""

from __future__ import annotations

from torch import nn

from ..core.modules import TORCH_CLASSES
from ..core.tree import bn_args, transplant
from .act import _BatchNormAct, activation_module
from .frozen import _FrozenBatchNorm
from .ghost import _GhostBatchNorm
from .masked import _MaskedBatchNorm
from .renorm import _BatchRenorm


def _plain_torch(m: nn.Module) -> nn.Module:
    """torch.nn BN sharing ``m``'s parameter and buffer tensors and its train flag."""
    return transplant(m, TORCH_CLASSES[m._dims_key](**bn_args(m), device="meta"))


def _frozen_torch(m: _FrozenBatchNorm) -> nn.Module:
    bn = TORCH_CLASSES[m._dims_key](
        m.num_features, m.eps, device=m.running_mean.device, dtype=m.running_mean.dtype
    )
    bn.load_state_dict(m.state_dict())
    bn.weight.requires_grad_(False)
    bn.bias.requires_grad_(False)
    return bn.eval()


def variant_to_torch(m: nn.Module) -> nn.Module | None:
    """torch.nn module(s) standing in for variant ``m`` (see the module docstring), or
    None when ``m`` is not a variant."""
    if isinstance(m, _FrozenBatchNorm):
        if m.act == "identity":
            return _frozen_torch(m)
        return nn.Sequential(_frozen_torch(m), activation_module(m.act, m.alpha)).eval()
    if isinstance(m, _BatchNormAct):
        return nn.Sequential(_plain_torch(m), m.activation_module()).train(m.training)
    if isinstance(m, (_BatchRenorm, _GhostBatchNorm, _MaskedBatchNorm)):
        return _plain_torch(m)
    return None

