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
from collections import deque
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import Tensor

from .. import kernels
from . import traced


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


class _Copy:
    """The running buffers' values kept aside in one tensor (``torch.cat``: one op), for
    buffers a layer's ``RunningBackup`` cannot view; the same ``commit``/``restore`` as it."""

    __slots__ = ("buffers", "saved")

    def __init__(self, running_mean: Tensor, running_var: Tensor) -> None:
        self.buffers = running_mean, running_var
        self.saved = torch.cat((running_mean, running_var))

    def commit(self) -> bool:
        return False  # no fast verdict: the batch statistics decide

    def restore(self) -> None:
        running_mean, running_var = self.buffers
        running_mean.copy_(self.saved[: running_mean.numel()])
        running_var.copy_(self.saved[running_mean.numel():])


def set_aside(running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor | None,
              backup=None):
    """Keep the running buffers' values before a kernel blends the batch into them
    (``update_running(..., aside=)`` then keeps the blend or puts them back): in the
    layer's ``kernels.cpu_backup.RunningBackup`` where it can view them, else a copy."""
    if backup is not None and backup.save(running_mean, running_var, num_batches_tracked):
        return backup
    return _Copy(running_mean, running_var)


def update_running(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor | None,
    count: float,
    momentum: float | None,
    num_batches_tracked: Tensor | None = None,
    *,
    invstd: Tensor | None = None,
    eps: float = 0.0,
    aside=None,
    inplace: bool = True,
    backup=None,
) -> tuple[Tensor, Tensor] | None:
    """Fold one batch's statistics into the running buffers: the one guarded update of
    every module, variant, SyncBatchNorm and functional form.

    PyTorch's convention: ``momentum`` weights the NEW batch,
    ``running = (1 - momentum) * running + momentum * stat``; ``momentum=None`` is the
    cumulative average (factor ``1 / num_batches_tracked`` after the increment). The
    stored variance is the unbiased one, ``var * count / (count - 1)``. The batch comes
    as its biased ``var``, or as ``invstd = 1/sqrt(var + eps)`` (what the kernels return;
    ``var=None``).

    Guard: if any batch statistic is non-finite (NaN/Inf input, fp16 overflow) nothing is
    updated, ``num_batches_tracked`` included, and a warning names the channels. In eager
    mode on the CPU one host read decides; on CUDA ``update_on_device`` (no host read: the
    warning comes when the GPU has got there, see ``report_pending``); under tracing
    (``torch.compile``, ``torch.export``, dispatch modes: ``traced.active``) the update is
    ``traced.update_running``'s ``torch.where``, which keeps the old values (no host read,
    no warning).

    ``aside`` (from ``set_aside``): the kernel has blended the batch into the buffers
    already (ATen's, for torch.nn's numbers bit for bit); the blend is kept if finite
    (and counted), else the buffers are put back. (Or the layer's RunningBackup after the
    numba kernels folded the batch in through it, guarded: ``commit`` gives that verdict,
    ``restore`` has nothing to put back.) ``inplace=False``: nothing is written;
    returns the new ``(running_mean, running_var)`` (for ``batch_norm_stateless``, under
    torch.func transforms: no host read, no warning, ``num_batches_tracked`` unused).
    ``backup``: the layer's ``kernels.cpu_backup.RunningBackup``, handed to the backend's
    fused update (the CPU one reaches the buffers through its views).
    """
    if running_mean.is_cuda and aside is None and inplace and not traced.active(mean):
        return update_on_device(running_mean, running_var, mean, var, count, momentum,
                                num_batches_tracked, invstd=invstd, eps=eps)
    if aside is not None:
        # Finite buffers after the blend imply a finite batch (``commit`` then counts it).
        # Otherwise ask the batch: buffers that were not finite before, or a blend that
        # overflowed, let a finite batch pass.
        if aside.commit():
            return None
        if finite_batch(mean, invstd, eps):
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
        else:
            aside.restore()
            warn_not_finite(mean, var_from_invstd(invstd, eps), stacklevel=4)
        return None
    correction = count / (count - 1) if count > 1 else 1.0
    if not inplace or traced.active(mean):
        if var is None:
            var = var_from_invstd(invstd, eps)
        with torch.no_grad():
            return traced.update_running(running_mean, running_var, mean, var * correction,
                                         momentum, num_batches_tracked, inplace)
    if invstd is not None:
        # the variance recovery, the check and both blends in one call of a backend (the
        # numba kernels on CPU) instead of a dozen small torch operations
        backend = kernels.updater(running_mean)
        verdict = None if backend is None else backend.update_running(
            running_mean, running_var, mean, invstd, eps, correction, momentum,
            num_batches_tracked, backup,
        )
        if verdict is not None and bool(verdict):  # (a device verdict: one host read)
            return None
    with torch.no_grad():
        unbiased = (var_from_invstd(invstd, eps) if var is None else var) * correction
        # Eager: one host read decides (a float64 sum is non-finite iff some statistic is).
        ok = math.isfinite(
            float(mean.sum(dtype=torch.float64) + unbiased.sum(dtype=torch.float64))
        )
        if ok:
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
            factor = blend_factor(momentum, num_batches_tracked)
            running_mean.lerp_(mean.to(running_mean.dtype), factor)
            running_var.lerp_(unbiased.to(running_var.dtype), factor)
    if not ok:
        warn_not_finite(mean, unbiased, stacklevel=3)
    return None


class _Pending(NamedTuple):
    """A guarded update on a GPU whose verdict the host has not read yet."""

    ok: Tensor | bool  # 0-d bool: pinned host memory (CUDA), or the verdict itself elsewhere
    event: object  # torch.cuda.Event recorded after the copy of ``ok``; None: ready
    mean: Tensor
    var: Tensor | None
    invstd: Tensor | None
    eps: float


#: Verdicts on their way from the GPU, oldest first (one stream: they finish in order).
_pending: deque[_Pending] = deque()


def update_on_device(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor | None,
    count: float, momentum: float | None, num_batches_tracked: Tensor | None = None, *,
    invstd: Tensor | None = None, eps: float = 0.0,
) -> None:
    """``update_running`` without a host read (eager CUDA; any device works): the same
    guard on the device, so that a training step never waits for the GPU (a host read per
    BN layer serialises the CPU and the GPU: several times slower steps, measured in
    benchmarks/gpu/). The verdict is copied to pinned host memory without blocking;
    ``report_pending`` warns (naming the channels) once the GPU has got there: at a later
    update, or at once with ``report_pending(wait=True)``.

    Each operation is a kernel launch and host time: the batch given as ``invstd`` goes to
    the backend's fused update (``kernels.updater``: Triton's, one launch) where there is
    one; otherwise (no Triton, a forced backend without one, the batch given as ``var``)
    torch operations do the same: the variance in float64, one verdict from float64 sums
    (finite iff every statistic is: float32 values cannot overflow them), and ``lerp_``
    towards ``where(ok, statistic, running)`` (exactly the old value when not ok)."""
    report_pending()
    correction = count / (count - 1) if count > 1 else 1.0
    with torch.no_grad():
        ok = None
        if var is None:
            backend = kernels.updater(running_mean)
            if backend is not None:
                ok = backend.update_running(running_mean, running_var, mean, invstd, eps,
                                            correction, momentum, num_batches_tracked)
        if ok is None:
            ok = _update_with_torch(running_mean, running_var, mean, var, correction,
                                    momentum, num_batches_tracked, invstd, eps)
        if isinstance(ok, Tensor) and ok.is_cuda:
            flag = torch.empty((), dtype=torch.bool, pin_memory=True)
            flag.copy_(ok, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            flag, event = ok, None
    _pending.append(_Pending(flag, event, _kept(mean), _kept(var), _kept(invstd), eps))


def _kept(t: Tensor | None) -> Tensor | None:
    """``t`` to keep for a later warning, without its autograd graph (a detach only where
    there is one: the kernels' statistics have none)."""
    return t.detach() if t is not None and t.requires_grad else t


def _update_with_torch(running_mean, running_var, mean, var, correction, momentum,
                       num_batches_tracked, invstd, eps) -> Tensor:
    """``update_on_device``'s update as torch operations; returns the 0-d bool verdict."""
    if var is None:
        var64 = invstd.double().pow_(-2).sub_(eps).clamp_(min=0)
    else:
        var64 = var.to(torch.float64, copy=True)
    total = mean.sum(dtype=torch.float64) + var64.sum()
    ok = (total - total) == 0  # False for NaN and +-inf
    unbiased = var64.mul_(correction)
    if momentum is None:
        traced.blend(running_mean, running_var, mean, unbiased, ok, None, num_batches_tracked)
    else:
        running_mean.lerp_(torch.where(ok, mean.to(running_mean.dtype), running_mean),
                           momentum)
        running_var.lerp_(torch.where(ok, unbiased.to(running_var.dtype), running_var),
                          momentum)
        if num_batches_tracked is not None:
            num_batches_tracked.add_(ok)
    return ok


def report_pending(wait: bool = False) -> None:
    """Warn for every update of ``update_on_device`` whose batch was not finite (the
    buffers were kept as they were), among those the GPU has finished; ``wait=True``
    waits for all of them (for example at the end of an epoch or in a test)."""
    while _pending:
        pending = _pending[0]
        if pending.event is not None and not pending.event.query():
            if not wait:
                return
            pending.event.synchronize()
        _pending.popleft()
        if not bool(pending.ok):
            var = pending.var
            if var is None:
                var = var_from_invstd(pending.invstd, pending.eps)
            warn_not_finite(pending.mean, var, stacklevel=3)


def warn_not_finite(
    mean: Tensor | None, var: Tensor | None, stacklevel: int = 3, *, running: str = ""
) -> None:
    """The warning for statistics that are not finite, naming the channels (``stacklevel``
    as for ``warnings.warn``, counted from the caller). Default: the guard's, for a batch
    whose statistics are not finite. ``running`` (e.g. ``"BatchNorm2d loaded"``): for
    running statistics a layer loaded or normalises with, where a negative variance is
    refused too (a None statistic has no bad channel; at least one is given)."""
    bad = torch.zeros((mean if mean is not None else var).shape, dtype=torch.bool)
    if mean is not None:
        bad = bad | ~torch.isfinite(mean).cpu()
    if var is not None:
        bad = bad | ~torch.isfinite(var).cpu()
        if running:
            bad = bad | (var < 0).cpu()
    bad = bad.nonzero().flatten().tolist()
    channels = f"channel(s) {bad[:20]}{' ...' if len(bad) > 20 else ''}"
    if running:
        message = (
            f"{running} running statistics that are not finite (NaN/Inf mean or variance, "
            f"or a negative variance) in {channels}: eval outputs of these channels are "
            "NaN/Inf. Recompute them (batchnorm.tools.calibrate.recalibrate) or call "
            "reset_running_stats()."
        )
    else:
        message = (
            f"batch statistics are not finite in {channels}: running statistics were NOT "
            "updated (the output follows IEEE arithmetic). Check the input for NaN/Inf or "
            "overflow."
        )
    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)


def running_finite(mean: Tensor | None, var: Tensor | None) -> bool:
    """Whether running statistics are usable: every mean and variance finite, every
    variance >= 0 (one host read)."""
    ok = torch.ones((), dtype=torch.bool, device=(mean if mean is not None else var).device)
    if mean is not None:
        ok = ok & torch.isfinite(mean).all()
    if var is not None:
        ok = ok & (torch.isfinite(var) & (var >= 0)).all()
    return bool(ok)


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
