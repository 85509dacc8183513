"""Walking a model's module tree: swap submodules, move a layer's tensors onto another.

The pieces every whole-model tool builds on (``convert``, ``freeze``, sync conversion).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def replace_named(
    model: nn.Module, swap: Callable[[str, nn.Module], nn.Module | None], prefix: str = ""
) -> nn.Module:
    """``replace_modules`` whose ``swap(name, m)`` also gets the qualified name of ``m``
    (``"<model>"`` for the model itself)."""
    new = swap(prefix or "<model>", model)
    if new is not None:
        return new
    for name, child in model.named_children():
        replaced = replace_named(child, swap, f"{prefix}.{name}" if prefix else name)
        if replaced is not child:
            setattr(model, name, replaced)
    return model


def replace_modules(model: nn.Module, swap: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    """Return ``model`` with every submodule ``m`` for which ``swap(m)`` is not None
    replaced by that result (the model itself too). Children are swapped in place."""
    return replace_named(model, lambda _name, m: swap(m))


def transplant(old: nn.Module, new: nn.Module) -> nn.Module:
    """Move ``old``'s parameters and buffers (the same tensors) and train flag onto ``new``.
    A buffer ``new`` has and ``old`` lacks (num_batches_tracked of a frozen layer from
    torchvision) becomes None: the state_dict keeps ``old``'s keys."""
    old_params = dict(old.named_parameters(recurse=False))
    for name in new._parameters:  # a parameter ``old`` lacks (bias=False) becomes None
        if name not in old_params:
            new.register_parameter(name, None)
    for name, param in old_params.items():
        setattr(new, name, param)
    old_buffers = dict(old.named_buffers(recurse=False))
    for name in new._buffers:
        new._buffers[name] = None
    new._buffers.update(old_buffers)
    return new.train(old.training)


def bn_args(m: nn.Module) -> dict:
    """The constructor arguments of a BatchNorm layer like ``m`` (torch.nn's or ours).
    Not ``bias``: torch.nn's classes take it only from torch 2.13 on; ``transplant``
    drops the bias of a layer that has none."""
    return dict(
        num_features=m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
        track_running_stats=m.track_running_stats,
    )
