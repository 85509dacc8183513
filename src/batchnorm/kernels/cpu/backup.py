"""A layer's running buffers set aside before ATen updates them in place, and put back if
the update was not finite: the non-finite guard of the ATen path (what it saves over a
torch copy and check: benchmarks/README.md).

ATen's training kernel blends the batch into ``running_mean``/``running_var`` itself (so
the buffers are torch.nn's bit for bit). A non-finite batch must leave them untouched, so
the layer keeps their values before the call and restores them afterwards if needed
(``batchnorm.core.stats.set_aside``; a ``torch.cat`` copy where this cannot). Here numpy views of the buffers are made once
per layer and kept (re-made when a buffer is replaced or moves, e.g. ``.to()`` or
``share_memory_()``), the copy and the check (which also counts the batch in
``num_batches_tracked``) are one compiled call each, and the check reads the updated
buffers: ATen computes ``(1 - f) * running + f * stat``, which is
finite only if the batch statistic is (``0 * nan`` is nan even for ``f = 0``).

On the numba kernels' route the same views carry the guarded update itself: the
training forward folds the batch in right after its kernel (``prepare``, then ``blend``
from ``cpu_backend.forward_train``), and ``cpu_backend.update_running`` goes through them
(``update``): one identity check of the buffers instead of checking every tensor again on
every training step.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit
from torch import Tensor

from ._params import running_update

_DTYPES = (torch.float32, torch.float64)


@njit(cache=True)
def _save(mean, var, backup):
    c = mean.shape[0]
    for i in range(c):
        backup[i] = mean[i]
        backup[c + i] = var[i]


@njit(cache=True)
def _restore(mean, var, backup):
    c = mean.shape[0]
    for i in range(c):
        mean[i] = backup[i]
        var[i] = backup[c + i]


@njit(cache=True)
def _finite(mean, var, counter):
    """Whether every value of both is finite (a count without early exit: vectorises);
    if so, add 1 to ``counter`` (one element, or empty for none)."""
    bad = 0
    for i in range(mean.shape[0]):
        m = mean[i]
        v = var[i]
        bad += (m - m != 0.0) | (v - v != 0.0)
    if bad == 0 and counter.size:
        counter[0] += 1
    return bad == 0


@njit(error_model="numpy", cache=True)
def _update(mean, var, counter, batch_mean, invstd, eps, correction, momentum, cumulative):
    """``_params.running_update`` of the buffers (views) with the batch (mean, invstd), the
    factor ``momentum`` or, ``cumulative``, 1 / the count after its increment; a finite
    batch adds 1 to ``counter`` (one element, or empty for none). Returns the verdict."""
    factor = 1.0 / max(counter[0] + 1, 1) if cumulative else momentum
    ok = running_update(mean, var, batch_mean, invstd, eps, correction, factor)
    if ok and counter.size:
        counter[0] += 1
    return ok


def viewable(t: Tensor, dtypes: tuple[torch.dtype, ...], dim: int) -> bool:
    """A plain contiguous CPU tensor of ``dim`` dimensions and one of ``dtypes`` that numpy
    may view: not wrapped by torch.func, not an inference tensor, not requiring grad. (On
    every training step: cheap attribute reads first; ``is_cpu`` rather than
    ``device.type``, which builds an object.)"""
    return (
        type(t) is Tensor and not t.requires_grad and t.is_cpu and t.dtype in dtypes
        and t.dim() == dim and t.is_contiguous() and not t.is_inference()
        and not torch._C._functorch.is_functorch_wrapped_tensor(t)
    )


_NO_COUNTER = np.empty(0, np.int64)


class RunningBackup:
    """``save(mean, var, counter)`` before the update, ``commit()`` after it (True: the
    buffers are finite and the counter went up by one), ``restore()`` if it said False;
    or the guarded update itself through the same views: ``update(...)`` from tensors, or
    ``prepare(...)`` and then a kernel's ``blend(...)`` of its fresh statistics (``commit``
    then gives its verdict, ``restore`` has nothing to do).

    ``counter`` is ``num_batches_tracked`` (or None): counted here, through its numpy view
    (cheaper than a torch ``add_``; its version counter, which nothing saves for backward,
    is left as it is). One per layer (``batchnorm.BatchNorm*d`` keep one); it holds views
    of the last buffers it saved or updated, so copies of a layer (``copy.deepcopy``,
    pickling) start with a fresh one.
    """

    __slots__ = ("_buffers", "_pointers", "_views", "_backup", "_momentum", "_verdict")

    def __init__(self) -> None:
        self._buffers: tuple[Tensor | None, ...] = ()
        self._pointers: tuple[int, ...] = ()
        self._views: tuple[np.ndarray, ...] = ()
        self._backup = np.empty(0)
        self._momentum: float | None = None
        self._verdict: bool | None = None  # ``blend``'s, until the next save or prepare

    def __reduce__(self):
        return (type(self), ())

    def save(
        self, running_mean: Tensor, running_var: Tensor, counter: Tensor | None
    ) -> bool:
        """Copy both buffers aside; False (nothing kept) where numpy cannot view them."""
        self._verdict = None
        if not self._holds(running_mean, running_var, counter):
            return False
        views = self._views
        _save(views[0], views[1], self._backup)
        return True

    def update(
        self, running_mean: Tensor, running_var: Tensor, counter: Tensor | None,
        mean: Tensor, invstd: Tensor, eps: float, correction: float, momentum: float | None,
    ) -> bool | None:
        """``cpu_backend.update_running`` through the views kept of these buffers (one
        identity check instead of checking four tensors again on every step): the verdict,
        or None where numpy cannot view the buffers or the batch's statistics are not CPU
        float vectors of their length (the caller then checks and updates the usual way)."""
        if mean.dtype not in _DTYPES or invstd.dtype not in _DTYPES or not self.prepare(
            running_mean, running_var, counter, momentum
        ):
            return None
        try:  # refuses tensors that require grad, live elsewhere or are wrapped by torch.func
            m, s = mean.numpy(), invstd.numpy()
        except (RuntimeError, TypeError):
            return None
        return self._apply(m, s, eps, correction)

    def prepare(self, running_mean: Tensor, running_var: Tensor, counter: Tensor | None,
                momentum: float | None) -> bool:
        """Make ready for ``blend`` in this step (views of these buffers, the step's
        momentum: None for the cumulative average); False where numpy cannot view them or
        momentum=None comes without a counter (the caller then updates the usual way)."""
        self._verdict = None
        if (momentum is None and counter is None) or not self._holds(
            running_mean, running_var, counter
        ):
            return False
        self._momentum = momentum
        return True

    def blend(self, mean: np.ndarray, invstd: np.ndarray, eps: float, count: int) -> None:
        """The guarded update of the prepared buffers with a batch of ``count`` values per
        channel, from the (mean, invstd) a kernel has just returned (numpy vectors, in the
        dtype the contract returns them in), right where they were made; the verdict is
        kept for ``commit`` (``blended``). Vectors of another length than the buffers' are
        left to the caller's update, which refuses them."""
        self._verdict = self._apply(mean, invstd, eps, count / (count - 1) if count > 1 else 1.0)

    def blended(self) -> bool:
        """Whether ``blend`` ran since ``prepare``."""
        return self._verdict is not None

    def _apply(self, mean: np.ndarray, invstd: np.ndarray, eps: float,
               correction: float) -> bool | None:
        """The prepared update with these statistics: the verdict, or None (nothing done)
        for vectors of another length than the buffers'."""
        views = self._views
        if mean.shape != views[0].shape or invstd.shape != views[0].shape:
            return None
        momentum = self._momentum
        ok = _update(views[0], views[1], views[2], mean, invstd, float(eps), float(correction),
                     0.0 if momentum is None else float(momentum), momentum is None)
        if ok:  # written through numpy: tell autograd the buffers changed, as an add_ would
            torch.autograd.graph.increment_version(self._buffers[:2])
        return ok

    def _holds(self, running_mean: Tensor, running_var: Tensor, counter: Tensor | None) -> bool:
        """Whether the views are of these buffers, made again if need be; False where numpy
        cannot view them."""
        buffers = self._buffers
        if (
            not buffers or running_mean is not buffers[0] or running_var is not buffers[1]
            or counter is not buffers[2]
            or self._pointers != _pointers(running_mean, running_var, counter)
        ):
            return self._bind(running_mean, running_var, counter)
        return True

    def _bind(self, running_mean: Tensor, running_var: Tensor, counter: Tensor | None) -> bool:
        self._buffers = ()
        if not (
            viewable(running_mean, _DTYPES, 1) and viewable(running_var, _DTYPES, 1)
            and running_mean.dtype == running_var.dtype
            and running_mean.numel() == running_var.numel()
            and (counter is None or viewable(counter, (torch.int64,), 0))
        ):
            return False
        count = _NO_COUNTER if counter is None else counter.numpy().reshape(1)
        self._views = (running_mean.numpy(), running_var.numpy(), count)
        self._backup = np.empty(2 * running_mean.numel(), self._views[0].dtype)
        self._pointers = _pointers(running_mean, running_var, counter)
        self._buffers = (running_mean, running_var, counter)
        return True

    def commit(self) -> bool:
        """Whether both buffers (as they are now) hold only finite values; if so, the
        counter goes up by one. After ``blend``: its verdict (the count went up with it)."""
        if self._verdict is not None:
            return self._verdict
        return bool(_finite(*self._views))

    def restore(self) -> None:
        """Put the saved values back (and tell autograd the buffers changed); nothing after
        ``blend``, which writes nothing for a non-finite batch."""
        if self._verdict is not None:
            return
        _restore(self._views[0], self._views[1], self._backup)
        torch.autograd.graph.increment_version(self._buffers[:2])


def _pointers(
    running_mean: Tensor, running_var: Tensor, counter: Tensor | None
) -> tuple[int, ...]:
    return (
        running_mean.data_ptr(), running_var.data_ptr(),
        0 if counter is None else counter.data_ptr(),
    )
