"""Fold eval-mode BN into the preceding convolution or linear layer, for inference.

In eval mode BN is a per-channel affine map of its input, ``y = s * z + t`` with
``s = gamma / sqrt(running_var + eps)`` and ``t = beta - s * running_mean``. When its
input ``z = W x + b`` comes straight from a Conv1d/2d/3d, ConvTranspose1d/2d/3d or
Linear layer that nothing else reads, the pair is one layer with

    W' = s * W   (scaled along the output channels),   b' = s * b + t.

The new weights are computed in float64 and cast back to the layer's dtype.

A BN layer that applies an activation after normalising (batchnorm's ``BatchNormAct*``,
timm's ``BatchNormAct2d`` / ``FrozenBatchNormAct2d``, ``from_torch``'s ``*Then`` layers)
folds its normalisation and leaves its activation (and dropout) in its place. Frozen
layers fold too: batchnorm's ``FrozenBatchNorm*``, torchvision's / timm's
``FrozenBatchNorm2d``, timm's ``FrozenBatchNormAct2d``.

Two passes, on a deep copy (the original model is untouched):
1. inside every ``nn.Sequential`` (structure kept, BN replaced by its activation or
   ``nn.Identity``);
2. if BN layers remain, over the ``torch.fx`` graph of the whole model (the result is a
   ``torch.fx.GraphModule``). A BN stays, and the report says why, when it is in
   training mode or has no running statistics, when what precedes it is not a foldable
   layer, when that layer's output is also used elsewhere (a convolution feeding two BN
   layers) or the layer is called more than once, or when the model cannot be traced and
   the BN is not in a Sequential.

Assumption for Linear: the BatchNorm1d after it sees the Linear's output as (N, C), the
only layout where BN's channel axis is the Linear's feature axis.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import fx, nn

from ..variants.act import activation_module
from .find_layers import is_batchnorm, is_frozen_batchnorm

FOLDABLE = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Linear,
)


@dataclass
class FoldReport:
    """Which BN layers were folded (into which layer) and which stayed (and why)."""

    folded: list[tuple[str, str]] = field(default_factory=list)  # (bn, into)
    kept: list[tuple[str, str]] = field(default_factory=list)  # (bn, reason)

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} BN layer(s), kept {len(self.kept)}"]
        lines += [f"  folded {bn} into {into}" for bn, into in self.folded]
        lines += [f"  kept   {bn}: {why}" for bn, why in self.kept]
        return "\n".join(lines)


class Folded(NamedTuple):
    model: nn.Module
    report: FoldReport


def _is_norm(m: nn.Module) -> bool:
    """A BN layer, trainable (torch.nn's, timm's, ours) or frozen."""
    return is_batchnorm(m) or is_frozen_batchnorm(m)


def _after(bn: nn.Module) -> nn.Module:
    """What stays in ``bn``'s place once its normalisation is folded: its dropout and
    activation (modules of timm's layers and ``from_torch``'s ``*Then`` layers, or
    batchnorm's ``act`` name), else ``nn.Identity``."""
    act = getattr(bn, "act", None)
    if isinstance(act, str):
        return nn.Identity() if act == "identity" else activation_module(act, bn.alpha)
    if act is None:
        return nn.Identity()
    drop = getattr(bn, "drop", None)
    return act if drop is None or type(drop) is nn.Identity else nn.Sequential(drop, act)


def _fold_pair(layer: nn.Module, bn: nn.Module) -> None:
    """Fold eval-mode ``bn`` into ``layer`` in place (new Parameters, same dtype/device)."""
    w = layer.weight.detach().double()
    var = bn.running_var.detach().double()
    scale = torch.rsqrt(var + bn.eps)
    gamma = bn.effective_weight() if hasattr(bn, "effective_weight") else bn.weight
    if gamma is not None:
        scale = scale * gamma.detach().double()
    shift = -bn.running_mean.detach().double() * scale
    if getattr(bn, "bias", None) is not None:
        shift = shift + bn.bias.detach().double()
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(scale)
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        g = layer.groups  # weight (in, out/g, k...): output channel = group * out/g + j
        shaped = w.reshape(g, w.shape[0] // g, w.shape[1], *w.shape[2:])
        view = (g, 1, w.shape[1]) + (1,) * (w.dim() - 2)
        new_w = (shaped * scale.reshape(view)).reshape(w.shape)
    else:  # weight (out, ...)
        new_w = w * scale.reshape((-1,) + (1,) * (w.dim() - 1))
    dtype = layer.weight.dtype
    layer.weight = nn.Parameter(new_w.to(dtype), layer.weight.requires_grad)
    layer.bias = nn.Parameter((bias * scale + shift).to(dtype), layer.weight.requires_grad)


def _not_eval_affine(bn: nn.Module) -> str | None:
    """Why ``bn``'s normalisation is not a fixed affine map now (None when it is)."""
    if is_frozen_batchnorm(bn):
        return None
    if bn.training:
        return "in training mode (folding applies to eval mode: call model.eval())"
    if bn.running_mean is None or bn.running_var is None:
        return "no running statistics (track_running_stats=False: it uses batch statistics)"
    return None


def _why_not(layer: nn.Module | str, bn: nn.Module) -> str | None:
    """Why ``bn`` cannot be folded into ``layer`` (a module, or a description of what
    produces its input), None when it can."""
    if _not_eval_affine(bn):
        return _not_eval_affine(bn)
    if not isinstance(layer, FOLDABLE):
        what = layer if isinstance(layer, str) else type(layer).__name__
        return f"follows {what}, not a Conv/ConvTranspose/Linear"
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    channels = bn.running_mean.numel()
    if out != channels:
        return f"{channels} channels after a layer with {out} outputs"
    return None


def _fold_sequentials(model: nn.Module, names: dict[int, str], report: FoldReport) -> None:
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    for seq in [m for m in model.modules() if type(m).forward is nn.Sequential.forward]:
        keys = list(seq._modules)
        for prev_key, key in zip(keys, keys[1:]):
            layer, bn = seq._modules[prev_key], seq._modules[key]
            if not _is_norm(bn) or _why_not(layer, bn) or uses[id(layer)] > 1:
                continue
            _fold_pair(layer, bn)
            report.folded.append((names[id(bn)], names[id(layer)]))
            seq._modules[key] = _after(bn)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _is_norm(m) or super().is_leaf_module(m, qualname)


def _fold_graph(model: nn.Module, names: dict[int, str], report: FoldReport) -> nn.Module:
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # tracing fails on data-dependent control flow and more
        untraced = (
            f"not after a foldable layer in an nn.Sequential, and torch.fx cannot trace "
            f"the model ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})"
        )
        report.kept += [
            (names[id(m)], _not_eval_affine(m) or untraced)
            for m in model.modules() if _is_norm(m)
        ]
        return model
    gm = fx.GraphModule(model, graph)
    gm.training = model.training
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    kept: dict[str, str] = {}
    for node in list(graph.nodes):
        if node.op != "call_module" or not _is_norm(gm.get_submodule(node.target)):
            continue
        bn = gm.get_submodule(node.target)
        src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if isinstance(src, fx.Node) and src.op == "call_module":
            layer = gm.get_submodule(src.target)
        elif isinstance(src, fx.Node):
            layer = f"{getattr(src.target, '__name__', src.target)} ({src.op})"
        else:
            layer = "a call with more than one argument"
        reason = _why_not(layer, bn)
        if reason is None and len(src.users) > 1:
            reason = f"its input, the output of {src.target}, is also used elsewhere"
        if reason is None and calls[src.target] > 1:
            reason = f"{src.target} is called more than once (shared weights)"
        if reason is not None:
            kept[names.get(id(bn), node.target)] = reason
            continue
        _fold_pair(layer, bn)
        report.folded.append((names.get(id(bn), node.target), names.get(id(layer), src.target)))
        after = _after(bn)
        if type(after) is nn.Identity:
            node.replace_all_uses_with(src)
            graph.erase_node(node)
        else:  # the activation takes the BN's place in the graph
            parent, _, leaf = node.target.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, leaf, after)
    report.kept += list(kept.items())
    graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm


def fold(model: nn.Module) -> Folded:
    """Fold every eval-mode BN layer of ``model`` into the layer before it.

    Works on torch.nn's, timm's, torchvision's and batchnorm's BN layers (with an
    activation: the activation stays; frozen ones too), in ``nn.Sequential`` and in any
    model ``torch.fx`` can trace (residuals, branches). The original model is not changed.
    In float32 the folded model's outputs equal the original's to about 1e-6 relative.

    Returns ``Folded(model, report)``: the folded copy (a ``torch.fx.GraphModule`` when
    BN layers outside Sequentials had to be folded, else the same classes as the input)
    and a ``FoldReport`` listing what was folded and what was kept and why. A warning
    names the kept layers.

    Example::

        >>> folded, report = batchnorm.fold(model.eval())
        >>> print(report)
    """
    work = copy.deepcopy(model)
    names = {id(w): name or "<model>" for (name, _), (_, w) in zip(model.named_modules(), work.named_modules())}
    report = FoldReport()
    _fold_sequentials(work, names, report)
    left = [m for m in work.modules() if _is_norm(m)]
    if any(_not_eval_affine(m) is None for m in left):
        work = _fold_graph(work, names, report)
    else:  # nothing left that could fold: keep the model's classes
        report.kept += [(names[id(m)], _not_eval_affine(m)) for m in left]
    if report.kept:
        warnings.warn(
            "fold kept BN layer(s): " + "; ".join(f"{bn} ({why})" for bn, why in report.kept),
            UserWarning,
            stacklevel=2,
        )
    return Folded(work, report)
