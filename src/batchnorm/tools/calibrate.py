"""PreciseBN: recompute the running statistics of every BN layer exactly over data.

The running statistics of a trained model are an exponential moving average of batch
statistics taken while the weights were still moving, so they lag the final weights
(Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021). ``recalibrate`` replaces them by
the population statistics of the final model over ``data``:

    mean = E[x],   var = E[(x - E[x])^2] * n / (n - 1)   (n values per channel, stored unbiased)

pooled exactly: each batch a layer receives is summarised per channel as
``Moments(count, mean, M2)`` and the summaries merged with Chan's formula (float64), so
the result is the statistic of all batches concatenated. For equal-size batches this is
the issue's formula, mean of batch means and ``E[mu_B^2 + var_B] - E[mu_B]^2``; for
unequal batches every value (not every batch) weighs the same. It is not what running the
model with ``momentum=None`` gives: that averages per-batch *unbiased* variances and
omits the spread of the batch means.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn
from . import _data
from .find_layers import InputMoments, batchnorm_layers, empty_moments, tracks_running_stats
from ..core.stats import Moments


def _all_reduce(parts: list[Moments]) -> list[Moments]:
    """Pool every layer's moments across ranks when torch.distributed is running."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return parts
    from ..distributed import all_reduce_moments

    return [all_reduce_moments(p) for p in parts]


@torch.no_grad()
def recalibrate(
    model: nn.Module,
    data: Iterable,
    num_samples: int | None = None,
    *,
    progress: bool = True,
) -> nn.Module:
    """Set every BN layer's running statistics to their exact value over ``data``.

    Args:
        model: any model with BN layers (torch.nn's or batchnorm's); layers without
            running statistics (``track_running_stats=False``) are left alone.
        data: an iterable of input batches, or of ``(input, target, ...)`` tuples (only
            the input is used), e.g. a DataLoader over training data. Inputs are moved
            to the device of the BN buffers.
        num_samples: stop after the batch that brings the number of samples (rows of
            dim 0) to at least this many; whole batches are used so each one is
            normalised as in training. Default: all of ``data``. Counted per rank.
        progress: show a progress line on stderr.

    The pass runs in training mode (each BN layer normalises with batch statistics, as
    it did in training, so every layer sees the inputs it saw in training; dropout is
    active as in training) without gradients and without touching the running
    statistics; they are written once at the end: ``running_mean`` the pooled mean,
    ``running_var`` the pooled unbiased variance, ``num_batches_tracked`` the number of
    batches the layer received. When torch.distributed is initialised every rank must
    call it: the statistics are pooled over all ranks' data (each rank gets the same);
    with SyncBatchNorm layers, which synchronise every training forward, every rank must
    also pass the same number of batches.
    A layer no batch reached, or whose pooled statistics are not finite, keeps its
    statistics and a warning names it. The model is left in eval mode (in its previous
    modes if ``data`` raised).

    Returns ``model``.
    """
    layers = [(name, m) for name, m in batchnorm_layers(model) if tracks_running_stats(m)]
    if not layers:
        raise ValueError(
            "recalibrate found no batch-norm layer with running statistics in the model "
            "(none, or all with track_running_stats=False)"
        )
    modes = [(m, m.training) for m in model.modules()]
    model.train()
    for _, m in layers:
        m.track_running_stats = False  # normalise with batch statistics, update nothing
    device = layers[0][1].running_mean.device
    try:
        with InputMoments(layers) as recorder:
            for x in _data.inputs(data, device, num_samples, "recalibrate", progress):
                model(x)
    except BaseException:
        for m, training in modes:
            m.training = training
        raise
    finally:
        for _, m in layers:
            m.track_running_stats = True
    model.eval()
    local = [recorder.moments.get(name) or empty_moments(m) for name, m in layers]
    skipped = []
    for (name, m), total in zip(layers, _all_reduce(local)):
        n = float(total.count[0])
        var = total.m2 / (n - 1) if n > 1 else total.m2
        if n == 0 or not (torch.isfinite(total.mean).all() and torch.isfinite(var).all()):
            skipped.append(name or type(m).__name__)
            continue
        m.running_mean.copy_(total.mean)
        m.running_var.copy_(var)
        m.num_batches_tracked.fill_(recorder.batches.get(name, 0))
    if skipped:
        warnings.warn(
            f"recalibrate left the running statistics of {skipped} unchanged: no batch "
            "reached them or their statistics were not finite (NaN/Inf in the data or an "
            "overflow)",
            RuntimeWarning,
            stacklevel=2,
        )
    return model
