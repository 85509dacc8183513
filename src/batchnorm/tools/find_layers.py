"""Finding the batch-norm layers of any model, torch.nn's and ours, and pooling exactly
the statistics of what they receive.

Everything that works on a trained model (fold, recalibrate, adapt, guards, diagnostics)
finds its layers with ``batchnorm_layers`` and, where it needs population statistics,
records them with ``InputMoments``: a forward pre-hook per layer that summarises each
input as per-channel ``Moments`` and merges them exactly (Chan et al.), in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..core import modules, stats
from ..core.stats import Moments
from ..variants.frozen import _FrozenBatchNorm


def is_batchnorm(m: nn.Module) -> bool:
    """Whether ``m`` is a batch-norm layer: torch.nn's (BatchNorm1d/2d/3d, SyncBatchNorm,
    the lazy ones) or batchnorm's (BatchNorm1d/2d/3d, its variants, SyncBatchNorm)."""
    return isinstance(m, (nn.modules.batchnorm._BatchNorm, modules._BatchNorm))


#: (module, class name) of other libraries' frozen BN layers (fixed statistics and affine
#: buffers ``weight``, ``bias``, ``running_mean``, ``running_var``, attribute ``eps``):
#: torchvision's FrozenBatchNorm2d (timm's FrozenBatchNorm2d is the same class) and
#: timm's FrozenBatchNormAct2d. Named, never imported.
FOREIGN_FROZEN = {
    ("torchvision.ops.misc", "FrozenBatchNorm2d"),
    ("timm.layers.norm_act", "FrozenBatchNormAct2d"),
}


def is_frozen_batchnorm(m: nn.Module) -> bool:
    """Whether ``m`` is a frozen BN layer: batchnorm's ``FrozenBatchNorm1d/2d/3d`` or a
    class of ``FOREIGN_FROZEN`` (or a subclass)."""
    return isinstance(m, _FrozenBatchNorm) or any(
        (c.__module__, c.__name__) in FOREIGN_FROZEN for c in type(m).__mro__
    )


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, layer)`` for every batch-norm layer of ``model``, each once, in
    module order (the model itself is named ``""``)."""
    return [(name, m) for name, m in model.named_modules() if is_batchnorm(m)]


def tracks_running_stats(m: nn.Module) -> bool:
    """Whether batch-norm layer ``m`` keeps running statistics (buffers present)."""
    return bool(m.track_running_stats) and m.running_mean is not None


def empty_moments(m: nn.Module) -> Moments:
    """A neutral (count 0) float64 summary with ``m``'s number of channels and device."""
    zeros = torch.zeros(m.num_features, dtype=torch.float64, device=m.running_mean.device)
    return Moments(zeros, zeros.clone(), zeros.clone())


class InputMoments:
    """Context manager pooling, per layer, the exact per-channel moments of its inputs.

    While active, every call of a layer in ``layers`` for which ``when(layer)`` is true
    adds its input's (count, mean, M2) to ``moments[name]`` (float64, Chan's merge, so
    the result is the moments of all inputs concatenated along the batch axis, whatever
    the batch sizes) and counts the call in ``batches[name]``. Empty inputs are skipped.

    A layer called with more than its input (e.g. a mask) raises ValueError: its
    statistics are not those of its input alone, so they cannot be pooled this way.
    """

    def __init__(
        self,
        layers: Iterable[tuple[str, nn.Module]],
        when: Callable[[nn.Module], bool] = lambda m: True,
    ) -> None:
        self.layers = list(layers)
        self.when = when
        self.moments: dict[str, Moments] = {}
        self.batches: dict[str, int] = {}
        self._handles: list = []

    def _hook(self, name: str):
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not self.when(module):
                return
            extra = [a for a in (*args[1:], *kwargs.values()) if a is not None]
            if len(args) != 1 or extra:
                raise ValueError(
                    f"batch-norm layer {name!r} ({type(module).__name__}) was called with "
                    "arguments besides its input (e.g. a mask): its statistics cannot be "
                    "pooled from its input alone"
                )
            x = args[0]
            if x.numel() == 0:
                return
            with torch.no_grad():
                part = Moments(*(t.double() for t in stats.moments(x.detach())))
            old = self.moments.get(name)
            self.moments[name] = part if old is None else stats.merge(old, part)
            self.batches[name] = self.batches.get(name, 0) + 1

        return record

    def __enter__(self) -> InputMoments:
        for name, m in self.layers:
            self._handles.append(
                m.register_forward_pre_hook(self._hook(name), with_kwargs=True)
            )
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
