"""Guards for the running statistics: once per step under activation checkpointing,
exact over the micro-batches of gradient accumulation, never non-finite.

batchnorm's own layers need nothing for two of them: they never update their running
statistics during a checkpoint recomputation (a forward run while autograd runs a
backward, see ``batchnorm.modules.in_backward``) and never let non-finite batch
statistics reach them (``batchnorm.stats.update_running``). ``guard(model)`` gives
torch.nn's layers the same two behaviours with hooks (``batchnorm.from_torch`` is the
other way: it swaps them for ours). ``accumulate(model)`` is opt-in and works on both.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.autograd import Variable

from ..core import modules, stats
from .find_layers import InputMoments, batchnorm_layers, empty_moments, tracks_running_stats
from ..core.modules import in_backward


class GuardHandle:
    """The hooks ``guard`` installed; ``remove()`` takes them off."""

    def __init__(self, layers: list[str], handles: list) -> None:
        self.layers = layers  # names of the guarded torch.nn layers
        self._handles = handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _updates(m: nn.Module) -> bool:
    return m.training and tracks_running_stats(m)


def _buffers(m: nn.Module) -> tuple[torch.Tensor, ...]:
    return m.running_mean, m.running_var, m.num_batches_tracked


def _guard_layer(name: str, m: nn.Module) -> list:
    pending: list[tuple[torch.Tensor, ...]] = []  # values before a recomputation
    saved: list[tuple[torch.Tensor, ...]] = []  # values before a training forward

    @torch.no_grad()
    def put_back(values: tuple[torch.Tensor, ...]) -> None:
        for buf, old in zip(_buffers(m), values):
            buf.copy_(old)

    def undo_recomputation() -> None:
        put_back(pending.pop())

    def before(module: nn.Module, args: tuple) -> None:
        saved.clear()
        if not _updates(m):
            return
        if in_backward():  # checkpoint recomputation: this batch was already counted
            # torch.nn must run as in the first forward (checkpoint checks what it saves),
            # so let it update and put the values back when the backward ends (the
            # recomputation may stop inside this layer and skip `after`).
            if not pending:
                pending.append(tuple(b.clone() for b in _buffers(m)))
                Variable._execution_engine.queue_callback(undo_recomputation)
            return
        saved.append(tuple(b.clone() for b in _buffers(m)))

    def after(module: nn.Module, args: tuple, output) -> None:
        if not saved:
            return
        if torch.isfinite(m.running_mean).all() and torch.isfinite(m.running_var).all():
            return
        put_back(saved[0])
        warnings.warn(
            f"{name} ({type(m).__name__}): batch statistics were not finite; running "
            "statistics were NOT updated. Check the input for NaN/Inf or overflow.",
            RuntimeWarning,
            stacklevel=2,
        )

    return [m.register_forward_pre_hook(before), m.register_forward_hook(after)]


def guard(model: nn.Module) -> GuardHandle:
    """Give every torch.nn BN layer of ``model`` batchnorm's guards, with hooks:

    - no running-statistics update during an activation-checkpoint recomputation
      (``torch.utils.checkpoint``, reentrant or not), so statistics and
      ``num_batches_tracked`` advance once per step, as without checkpointing;
    - a batch whose statistics are not finite (NaN/Inf input, fp16 overflow) leaves the
      running statistics and ``num_batches_tracked`` as they were, with a warning.

    batchnorm's layers have both built in and get no hook. The second guard costs a copy
    of the buffers and one device-to-host sync per training forward. Returns a handle;
    ``handle.remove()`` takes the hooks off.
    """
    handles, names = [], []
    for name, m in batchnorm_layers(model):
        if isinstance(m, modules._BatchNorm):
            continue
        handles += _guard_layer(name, m)
        names.append(name)
    return GuardHandle(names, handles)


def _synchronised(m: nn.Module) -> bool:
    """Whether ``m`` is a SyncBatchNorm (torch's or ours) and torch.distributed runs."""
    running = torch.distributed.is_available() and torch.distributed.is_initialized()
    return running and hasattr(m, "process_group")


@contextmanager
def accumulate(model: nn.Module) -> Iterator[None]:
    """Update the running statistics once per step, exactly, under gradient accumulation.

    Inside the block the BN layers of ``model`` (torch.nn's and batchnorm's) normalise
    each micro-batch with its own statistics as usual, but do not update their running
    statistics; each layer's inputs are pooled exactly (``Moments``, Chan's merge). On
    leaving the block each layer that ran in training mode makes ONE update, with the
    momentum rule, from the pooled mean and variance (unbiased with the total count): the
    same running statistics as one forward of the concatenated micro-batches through
    that layer (exact for the first BN layer of a network; deeper layers see inputs
    normalised per micro-batch, as they did in the forward passes). ``num_batches_tracked``
    advances by one. Micro-batches may differ in size. SyncBatchNorm layers pool across
    their process group. Recomputations under activation checkpointing are not counted.
    If the block raises, nothing is updated. Inside the block the layers'
    ``track_running_stats`` reads False.

    Example::

        >>> with batchnorm.accumulate(model):
        ...     for micro in batch.chunk(4):
        ...         loss_fn(model(micro)).backward()
        >>> optimizer.step()
    """
    layers = [(name, m) for name, m in batchnorm_layers(model) if tracks_running_stats(m)]
    recorder = InputMoments(layers, when=lambda m: m.training and not in_backward())
    for _, m in layers:
        m.track_running_stats = False
    try:
        with recorder:
            yield
    finally:
        for _, m in layers:
            m.track_running_stats = True
    for name, m in layers:
        total = recorder.moments.get(name)
        if _synchronised(m):
            from ..distributed import all_reduce_moments

            total = all_reduce_moments(total or empty_moments(m), m.process_group)
        if total is None or float(total.count[0]) == 0:
            continue
        stats.update_running(
            m.running_mean, m.running_var, total.mean, total.var, float(total.count[0]),
            m.momentum, m.num_batches_tracked,
        )
