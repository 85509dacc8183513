"""SyncBatchNorm on ``torch.distributed``: batch statistics over every rank's batch.

Any backend (gloo on CPU, nccl on GPU), uneven and empty per-rank batches, process
subgroups; plain BN when ``torch.distributed`` is not initialised, in eval, or when the
group has one rank.

Communication (collectives of ``torch.distributed`` only), per training step and layer:

- forward: ONE ``all_gather_single`` (formerly ``all_gather_into_tensor``) of each rank's
  packed float64 row ``[status, count(C), mean(C), m2(C)]`` (local centred moments), then
  every rank merges the rows with Chan's exact formula (``batchnorm.stats.merge``) in rank
  order. Why a gather and not a SUM all-reduce: summing ``count``, ``count * mean`` and
  ``m2 + count * mean^2`` gives the centred second moment only as a difference of large
  sums, which cancels catastrophically when |mean| >> std; the pairwise merge of centred
  moments never subtracts large numbers. The rows are a few C floats per rank, so the
  gather costs the same as a reduce at BN sizes, and every rank does the same float
  operations in the same order: the statistics (hence running buffers) are identical on
  every rank. ``status`` lets a rank whose input is malformed tell the others, so every
  rank raises a clear error instead of waiting for the timeout.
- backward: ONE ``all_reduce`` (SUM, float64) of the packed ``[sum(dy), sum(dy * x_hat)]``
  (only when the input needs a gradient), then the fused ``backward_elemt`` kernel with
  the global count. Parameter gradients are the rank's own sums: summed over ranks (as
  DistributedDataParallel does) they are the gradients of BN on the concatenated batch.
- once per module and process group (first training forward): an ``all_gather`` of
  ``num_features``, so a model that differs across ranks raises a clear error on every
  rank (gloo aborts the process on collectives of mismatched sizes).

A rank that dies makes the collectives of the others raise (at the latest after the
process group's ``timeout``), never hang forever.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .core import modules, ops, plan, stats
from .core.autograd import like_layout
from .kernels.torch_backend import acc_dtype
from .core.modules import RUNNING, UPDATE, _BatchNorm
from .core.stats import Moments
from .core.tree import bn_args, replace_modules, transplant

try:
    import torch.distributed as dist
except ImportError:  # torch built without distributed support
    dist = None
# torch >= 2.13 names it all_gather_single (all_gather_into_tensor is deprecated there)
_all_gather_single = dist and getattr(dist, "all_gather_single", dist.all_gather_into_tensor)

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm", "all_reduce_moments"]


# -- communication helpers ---------------------------------------------------------------
def _group_or_none(group) -> object | None:
    """The process group to synchronise over, or None when there is nothing to sync with
    (torch.distributed missing or not initialised, or a group of one rank)."""
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    group = dist.group.WORLD if group is None else group
    if group == dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(
            f"rank {dist.get_rank()} is not a member of the process group given to "
            "batchnorm's SyncBatchNorm / all_reduce_moments; pass a group this rank belongs to"
        )
    return group if dist.get_world_size(group) > 1 else None


@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    """Name the layer and the likely cause when a collective fails (a peer died, stalled
    past the group's timeout, or called a different collective)."""
    try:
        yield
    except RuntimeError as exc:
        raise RuntimeError(
            f"{what}: the collective with the other ranks of the process group "
            f"failed: {exc}. A rank has probably crashed, stalled past the group's timeout, or "
            "run a different sequence of SyncBatchNorm layers."
        ) from exc


def _gather(row: Tensor, group, what: str) -> Tensor:
    """Every rank's ``row`` (same length everywhere), stacked in rank order: (world, k)."""
    world = dist.get_world_size(group)
    row = row.detach().contiguous()
    out = row.new_empty(world * row.numel())
    with torch.no_grad(), _collective(what):
        _all_gather_single(out, row, group=group)
    return out.view(world, -1)


def _check_same_channels(channels: int, group, what: str, device: torch.device) -> None:
    """Raise the same clear error on every rank when the channel counts differ."""
    header = torch.tensor([channels], dtype=torch.int64, device=device)
    everyone = _gather(header, group, what)
    counts = everyone.flatten().tolist()
    if any(c != channels for c in counts):
        raise ValueError(
            f"{what}: the number of channels differs across the ranks of the process group: "
            f"{counts} (one per rank); every rank must build the same model"
        )


def _pack(m: Moments, status: float) -> Tensor:
    """One float64 row ``[status, count(C), mean(C), m2(C)]``."""
    mean = m.mean.to(torch.float64)
    count = torch.broadcast_to(m.count.to(torch.float64), mean.shape)
    return torch.cat([mean.new_full((1,), status), count, mean, m.m2.to(torch.float64)])


def _gather_merge(m: Moments, group, what: str, status: float = 0.0) -> tuple[Moments, list[int]]:
    """All ranks' moments merged exactly in rank order (float64), and the ranks whose
    status is not 0. One collective."""
    channels = m.mean.numel()
    rows = _gather(_pack(m, status), group, what)
    bad = [r for r, s in enumerate(rows[:, 0].tolist()) if s != 0]
    parts = rows[:, 1:].view(-1, 3, channels).unbind(0)
    return stats.merge_all(Moments(*p.unbind(0)) for p in parts), bad


def _local_moments(x: Tensor | None, channels: int) -> Moments:
    """Float64 moments of the local batch (zeros for an empty or rejected one), with the
    count exact (a float32 count is not, beyond 2^24 values per channel)."""
    count = 0 if x is None else x.numel() // channels
    if count == 0:
        zeros = torch.zeros(channels, dtype=torch.float64, device=None if x is None else x.device)
        return Moments(zeros, zeros, zeros)
    mean, var = ops.batch_stats(x)
    mean = mean.to(torch.float64)
    return Moments(torch.full_like(mean, count), mean, var.to(torch.float64) * count)


def all_reduce_moments(m: Moments, group=None) -> Moments:
    """Pool per-channel ``Moments`` exactly across the ranks of ``group`` (default: all).

    The result is what ``batchnorm.stats.moments`` would give on every rank's data
    concatenated (empty ranks, count 0, are neutral), identical on every rank and in the
    dtype of ``m.mean``. A no-op (returns ``m``) when torch.distributed is not
    initialised or the group has one rank. Every rank of the group must call it with the
    same number of channels (checked: a clear error on every rank otherwise). Used for
    PreciseBN across ranks: merge a rank's batches with ``stats.merge_all``, then pool.
    """
    group = _group_or_none(group)
    if group is None:
        return m
    _check_same_channels(m.mean.numel(), group, "all_reduce_moments", m.mean.device)
    total, _ = _gather_merge(m, group, "all_reduce_moments")
    dtype = m.mean.dtype
    return Moments(total.count.to(dtype), total.mean.to(dtype), total.m2.to(dtype))


# -- autograd ------------------------------------------------------------------------------
class SyncBatchNormFunction(torch.autograd.Function):
    """y = BN of ``x`` with the GLOBAL statistics (mean, invstd over ``count`` values per
    channel, all ranks together); the backward all-reduces its two per-channel sums."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, count: int, group):
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.count, ctx.group = count, group
        if x.numel() == 0:
            return torch.empty_like(x)
        return ops.normalize(x, mean, invstd, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dy = like_layout(dy, x)
        if x.numel():
            sum_dy, sum_dy_xhat = ops.backward_reduce(dy, x, mean, invstd)
        else:
            sum_dy, sum_dy_xhat = torch.zeros_like(mean), torch.zeros_like(mean)
        dx = None
        if need_x:
            packed = torch.cat([sum_dy, sum_dy_xhat]).to(torch.float64)
            with _collective("SyncBatchNorm (backward)"):
                dist.all_reduce(packed, group=ctx.group)
            all_dy, all_dy_xhat = packed.to(mean.dtype).chunk(2)
            dx = (
                ops.backward_elemt(dy, x, mean, invstd, weight, all_dy, all_dy_xhat, ctx.count)
                if x.numel()
                else torch.zeros_like(x)
            )
        dw = sum_dy_xhat.to(weight.dtype) if need_w else None
        db = sum_dy.to(weight.dtype) if need_b else None
        return dx, dw, db, None, None, None, None


# -- module ----------------------------------------------------------------------------------
class SyncBatchNorm(_BatchNorm):
    r"""Batch normalization over the union of every rank's batch, drop-in for
    ``torch.nn.SyncBatchNorm`` and working on CPU (gloo) as well as GPU (nccl).

    In training, with ``torch.distributed`` initialised and a process group of more than
    one rank, the input is normalised with the mean and biased variance of all ranks'
    inputs together, weighted by each rank's number of values (uneven batches are exact;
    a rank with an empty batch, shape (0, C, *), takes part and returns an empty output),
    and the running statistics are updated with the global ones, identically on every
    rank. Otherwise (not initialised, one rank, eval) it is ``batchnorm.BatchNorm*d``.
    Outputs, input gradients, summed parameter gradients and running statistics equal
    single-process BN on the concatenated batch.

    Every rank of the group must call the layer in the same order (it takes part in
    collectives). Double backward is not supported.

    Args:
        num_features: number of channels `C` of the (N, C, *) input.
        eps, momentum, affine, track_running_stats, device, dtype, bias, single_value:
            as for ``batchnorm.BatchNorm2d``. ``single_value`` applies when the whole
            group holds one value per channel.
        process_group: the group whose batches are pooled; ``None`` (default) for all
            ranks. Each rank belongs to the group given to its own modules.

    Examples::

        >>> model = batchnorm.convert.convert_sync_batchnorm(model)   # all BN layers
        >>> model = torch.nn.parallel.DistributedDataParallel(model)
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None, **kwargs) -> None:
        # torch.nn.SyncBatchNorm's order: process_group before device and dtype
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device,
                         dtype, **kwargs)
        self.process_group = process_group
        self._checked_group: int | None = None  # id of the group num_features was checked on

    def _sync_group(self):
        """The group to pool statistics over now, or None for plain BN."""
        return _group_or_none(self.process_group) if self.training else None

    def check_input(self, input: Tensor) -> None:
        """As ``_BatchNorm.check_input``, except that an empty local batch is allowed while
        synchronising (the other ranks provide the statistics)."""
        malformed = (
            input.dim() < 2 or input.shape[1] != self.num_features
            or not input.is_floating_point()
        )
        if input.numel() != 0 or malformed or self._sync_group() is None:
            super().check_input(input)

    def _check_num_features(self, group, device: torch.device) -> None:
        if self._checked_group != id(group):
            _check_same_channels(self.num_features, group, "SyncBatchNorm", device)
            self._checked_group = id(group)

    def forward(self, input: Tensor) -> Tensor:
        group = self._sync_group()
        if group is None:
            return super().forward(input)
        try:
            self.check_input(input)
            error = None
        except (TypeError, ValueError) as exc:  # still take part, so the others stop too
            error = exc
        self._check_num_features(group, input.device)
        with torch.no_grad():  # the statistics enter the autograd Function as constants
            local = _local_moments(None if error is not None else input, self.num_features)
            total, bad = _gather_merge(local, group, "SyncBatchNorm", float(error is not None))
        if error is not None:
            raise error
        if bad:
            raise RuntimeError(
                f"SyncBatchNorm: rank(s) {bad} of the process group rejected their input "
                "(see the error raised there); every rank stops at this layer"
            )
        return self._normalize(input, total, group)

    def _normalize(self, input: Tensor, total: Moments, group) -> Tensor:
        """Normalise with the pooled statistics and update the running ones."""
        count = int(total.count[0]) if total.count.numel() else 0
        if count == 0:
            raise ValueError(
                "SyncBatchNorm got an empty batch on every rank of the process group: "
                "statistics of no values are undefined. Skip empty steps on all ranks."
            )
        mode = self._rule(
            input, count, f"{count} value(s) per channel over all ranks of the process group "
            f"(local input size {list(input.shape)})",
        )
        if mode == RUNNING:
            return plan.evaluate(
                input, self.running_mean, self.running_var, self.weight, self.bias, self.eps
            )
        acc = acc_dtype(input.dtype)
        var = total.var
        invstd = torch.rsqrt(var + self.eps).to(acc)
        y = SyncBatchNormFunction.apply(
            input, self.weight, self.bias, total.mean.to(acc), invstd, count, group
        )
        if mode == UPDATE:
            stats.update_running(
                self.running_mean, self.running_var, total.mean, var, count,
                self.momentum, self.num_batches_tracked,
            )
        return y


# -- conversion ----------------------------------------------------------------------------------
def _sync_classes() -> tuple[type[nn.Module], ...]:
    return (
        nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
        modules.BatchNorm1d, modules.BatchNorm2d, modules.BatchNorm3d, SyncBatchNorm,
    )


def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """Swap every BatchNorm layer of ``model`` for batchnorm's ``SyncBatchNorm``.

    Drop-in for ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``. Converted: the exact
    classes torch.nn.BatchNorm1d/2d/3d and torch.nn.SyncBatchNorm, and batchnorm's
    BatchNorm1d/2d/3d and SyncBatchNorm (re-bound to ``process_group``). Not converted:
    user subclasses (they may override ``forward``) and batchnorm's variants (batch
    renorm, ghost, ...): their statistics rule is not plain BN's, and pooling it across
    ranks would silently change the method. Names, the very same parameter and buffer
    tensors (an optimizer built before keeps working; the state_dict is unchanged), the
    train/eval flag and ``single_value`` are kept. Returns the model (the new layer when
    ``model`` itself is a BatchNorm)."""
    classes = _sync_classes()

    def swap(m: nn.Module) -> nn.Module | None:
        if type(m) not in classes:
            return None
        new = SyncBatchNorm(
            **bn_args(m), process_group=process_group, device="meta",
            single_value=getattr(m, "single_value", "error"),
        )
        return transplant(m, new)

    return replace_modules(model, swap)
