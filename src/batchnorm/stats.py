"""Statistics helpers shared by every variant: moments, their exact merge, running updates.

Design: a batch is summarised per channel by ``Moments(count, mean, m2)`` where
``m2 = sum((x - mean)^2)``. Two summaries merge exactly (Chan, Golub & LeVeque 1979):

    n = n_a + n_b,  delta = mean_b - mean_a
    mean = mean_a + delta * n_b / n
    m2   = m2_a + m2_b + delta^2 * n_a * n_b / n

Ghost BN, sync BN, PreciseBN and micro-batch accumulation all reduce to this merge.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import Tensor

from . import kernels, traced


class Moments(NamedTuple):
    """Per-channel count, mean and sum of squared deviations (float32 or float64)."""

    count: Tensor
    mean: Tensor
    m2: Tensor

    @property
    def var(self) -> Tensor:
        """Biased variance m2 / count (what BN normalises with); 0 where count is 0."""
        return self.m2 / self.count.clamp(min=1)

    @property
    def unbiased_var(self) -> Tensor:
        """Unbiased variance m2 / (count - 1) (what BN stores); inf where count <= 1."""
        return self.m2 / (self.count - 1)


def moments(x: Tensor) -> Moments:
    """Moments of ``x`` (N, C, *) per channel, from the fastest applicable kernel
    (``torch.var_mean`` under tracing)."""
    if traced.active(x):
        mean, var = kernels.torch_backend.batch_stats(x)
    else:
        mean, var = kernels.call("batch_stats", x)
    count = torch.full_like(mean, x.numel() // max(x.shape[1], 1))
    return Moments(count, mean, var * count)


def merge(a: Moments, b: Moments) -> Moments:
    """Chan's exact merge of two summaries; empty summaries (count 0) are neutral."""
    n = a.count + b.count
    safe_n = n.clamp(min=1)
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.count / safe_n)
    m2 = a.m2 + b.m2 + delta * delta * (a.count * b.count / safe_n)
    return Moments(n, mean, m2)


def merge_all(parts: Iterable[Moments]) -> Moments:
    """Merge any number of summaries (at least one)."""
    parts = iter(parts)
    total = next(parts)
    for part in parts:
        total = merge(total, part)
    return total


def var_from_invstd(invstd: Tensor, eps: float) -> Tensor:
    """The biased variance behind ``invstd = 1/sqrt(var + eps)``, recovered in float64."""
    return invstd.to(torch.float64, copy=True).pow_(-2).sub_(eps).clamp(min=0).to(invstd.dtype)


@torch.no_grad()
def update_running(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    count: float,
    momentum: float | None,
    num_batches_tracked: Tensor | None = None,
    warn: bool = True,
) -> None:
    """Fold one batch's statistics into the running buffers, in place.

    PyTorch's convention: ``momentum`` weights the NEW batch,
    ``running = (1 - momentum) * running + momentum * stat``; ``momentum=None`` is the
    cumulative average (factor ``1 / num_batches_tracked`` after the increment). The
    stored variance is the unbiased one, ``var * count / (count - 1)``.

    Guard: if any batch statistic is non-finite (NaN/Inf input, fp16 overflow) nothing is
    updated, ``num_batches_tracked`` included, and a warning names the channels. In eager
    mode one host read decides; under tracing (``torch.compile``, ``torch.export``) the
    update is ``traced.update_running``'s ``torch.where`` (no host read, no warning).
    """
    unbiased = var * (count / (count - 1)) if count > 1 else var
    if traced.active(mean):
        traced.update_running(running_mean, running_var, mean, unbiased, momentum,
                              num_batches_tracked)
        return
    # Eager: one host read decides (a float64 sum is non-finite iff some statistic is).
    ok = math.isfinite(float(mean.sum(dtype=torch.float64) + unbiased.sum(dtype=torch.float64)))
    if ok:
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        factor = blend_factor(momentum, num_batches_tracked)
        running_mean.lerp_(mean.to(running_mean.dtype), factor)
        running_var.lerp_(unbiased.to(running_var.dtype), factor)
    elif warn:
        warn_not_finite(mean, unbiased, stacklevel=4)


def warn_not_finite(mean: Tensor, var: Tensor, stacklevel: int = 3) -> None:
    """The guard's warning for a batch whose statistics are not finite, naming the
    channels (``stacklevel`` as for ``warnings.warn``, counted from the caller)."""
    bad = (~(torch.isfinite(mean) & torch.isfinite(var))).nonzero().flatten().tolist()
    warnings.warn(
        f"batch statistics are not finite in channel(s) {bad[:20]}"
        f"{' ...' if len(bad) > 20 else ''}: running statistics were NOT updated "
        "(the output follows IEEE arithmetic). Check the input for NaN/Inf or overflow.",
        RuntimeWarning,
        stacklevel=stacklevel,
    )


def update_running_from_invstd(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    invstd: Tensor,
    eps: float,
    count: float,
    momentum: float | None,
    num_batches_tracked: Tensor | None = None,
) -> None:
    """``update_running`` given the batch's ``invstd = 1/sqrt(var + eps)`` (what the
    kernels return) instead of its variance. On CPU buffers the CPU kernels do the whole
    update (variance recovery, finiteness check, both blends) in one compiled call instead
    of a dozen small torch operations; a non-finite batch, other devices and dtypes, and
    tracing take ``update_running`` itself."""
    cpu = None
    if not torch.compiler.is_compiling() and kernels.get_backend() in ("auto", "cpu"):
        cpu = kernels.load("cpu")
    if cpu is not None:
        correction = count / (count - 1) if count > 1 else 1.0
        factor = blend_factor(momentum, num_batches_tracked, pending=1)
        if cpu.update_running(running_mean, running_var, mean, invstd, eps, correction, factor):
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)  # an integer buffer: autograd never records it
            return
    update_running(running_mean, running_var, mean, var_from_invstd(invstd, eps), count,
                   momentum, num_batches_tracked, warn=True)


def finite_batch(mean: Tensor, invstd: Tensor, eps: float) -> bool:
    """Whether a batch's statistics pass the running-update guard: every mean finite and
    every variance ``invstd^-2 - eps`` finite (invstd neither 0 nor NaN). One compiled
    call on CPU, a few torch operations and a host read elsewhere."""
    cpu = kernels.load("cpu") if not torch.compiler.is_compiling() else None
    if cpu is not None:
        verdict = cpu.finite_batch(mean, invstd, eps)
        if verdict is not None:
            return verdict
    var = var_from_invstd(invstd, eps)
    return math.isfinite(float(mean.sum(dtype=torch.float64) + var.sum(dtype=torch.float64)))


def blend_factor(
    momentum: float | None, num_batches_tracked: Tensor | None, pending: int = 0
) -> float:
    """The blend weight of the new batch; ``pending`` counts an increment of
    ``num_batches_tracked`` not yet applied."""
    if momentum is not None:
        return momentum
    if num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    return 1.0 / max(int(num_batches_tracked) + pending, 1)
