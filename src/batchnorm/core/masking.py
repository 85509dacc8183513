"""Masked / weighted batch statistics: padded positions excluded, or samples weighted
(``batchnorm.functional.masked_batch_norm``, ``batchnorm.MaskedBatchNorm1d/2d/3d``).

With per-position weights ``w >= 0`` (a bool mask is 0/1) and ``W = sum(w)`` over the
reduced axes (N and the spatial ones), per channel::

    mean   = sum(w * x) / W
    var    = sum(w * (x - mean)^2) / W                       (biased: normalises)
    n_eff  = W^2 / sum(w^2)                                  (Kish's effective count)
    stored = var * n_eff / (n_eff - 1)                       (unbiased: running_var)

For a 0/1 mask these are exactly the statistics of the selected elements alone (n_eff is
their number); an integer weight k counts a sample k times in mean and var. Every
position is normalised with these statistics, padded ones included (their outputs are
well defined and usually ignored).

Backward: an explicit closed form (this module's ``MaskedBatchNormTrain``), with
``x_hat = (x - mean) * invstd`` and ``k = gamma * invstd``::

    dbias   = sum(dy)            dweight = sum(dy * x_hat)          (over all positions)
    dx      = k * (dy - (w / W) * (sum(dy) + x_hat * sum(dy * x_hat)))

(the mean and variance see x only through the weighted positions, hence the w / W; with
w = 1 it is BN's formula). The weights are constants: no gradient flows to the mask.
"""

from __future__ import annotations

import torch
from torch import Tensor
from . import ops, traced
from ..kernels.torch_backend import acc_dtype, channel_view, reduce_dims


def mask_weights(input: Tensor, mask: Tensor) -> Tensor:
    """The mask as weights of shape (N, 1, *spatial) in the statistics' dtype.

    Accepted: shape (N,) (one weight per sample) or the input's shape without the channel
    axis, (N, *spatial), where any axis may be 1 (broadcast); bool (True = use) or
    floating point (finite, >= 0). Raises ValueError/TypeError otherwise."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a tensor, got {type(mask).__name__}")
    n, spatial = input.shape[0], tuple(input.shape[2:])
    if mask.dim() == 1 and mask.shape[0] == n:
        shaped = mask.reshape(n, 1, *([1] * len(spatial)))
    elif mask.dim() == 1 + len(spatial) and all(
        m in (1, s) for m, s in zip(mask.shape, (n, *spatial))
    ):
        shaped = mask.unsqueeze(1)
    else:
        raise ValueError(
            f"mask must have shape (N,) = ({n},) or the input's shape without the channel "
            f"axis, {(n, *spatial)} (axes of size 1 broadcast); got {tuple(mask.shape)} for "
            f"input {tuple(input.shape)}"
        )
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(
            f"mask must be bool (True = use the position) or floating point (weights), "
            f"got {mask.dtype}"
        )
    w = shaped.to(device=input.device, dtype=acc_dtype(input.dtype))
    if mask.is_floating_point():
        valid = torch.isfinite(w).all() & (w >= 0).all()
        if traced.active(w):  # no host read: the traced program checks when it runs
            traced.check(valid, "mask weights must be finite and >= 0")
        elif not bool(valid):
            raise ValueError("mask weights must be finite and >= 0")
    return w.detach()  # constants: no gradient flows to the mask


def _full(w: Tensor, input: Tensor) -> Tensor:
    """The weights broadcast over (N, 1, *spatial) (a view)."""
    return w.expand(input.shape[0], 1, *input.shape[2:])


def selected_count(input: Tensor, w: Tensor) -> int:
    """How many positions per channel have a non-zero weight."""
    return int(torch.count_nonzero(_full(w, input)))


def effective_count(input: Tensor, w: Tensor) -> float:
    """Kish's effective number of values per channel, ``W^2 / sum(w^2)``."""
    full = _full(w, input)
    return float(full.sum() ** 2 / (full * full).sum())


def masked_moments(input: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Weighted per-channel (mean, biased var), differentiable in ``input`` (two-pass, in
    the statistics' dtype)."""
    dims = reduce_dims(input)
    total = _full(w, input).sum()
    xf = input.to(w.dtype)
    mean = (xf * w).sum(dims) / total
    var = (w * (xf - channel_view(mean, input)) ** 2).sum(dims) / total
    return mean, var


def weighted_backward(
    dy: Tensor, input: Tensor, w: Tensor, weight: Tensor | None,
    mean: Tensor, invstd: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """The closed form of the module docstring: (dx, dweight, dbias), differentiable ops."""
    dims = reduce_dims(input)
    x_hat = (input.to(mean.dtype) - channel_view(mean, input)) * channel_view(invstd, input)
    dyf = dy.to(mean.dtype)
    sum_dy = dyf.sum(dims)
    sum_dy_xhat = (dyf * x_hat).sum(dims)
    k = invstd if weight is None else weight.to(mean.dtype) * invstd
    share = w / _full(w, input).sum()
    dx = channel_view(k, input) * (
        dyf - share * (channel_view(sum_dy, input) + x_hat * channel_view(sum_dy_xhat, input))
    )
    return dx.to(input.dtype), sum_dy_xhat, sum_dy


class MaskedBatchNormTrain(torch.autograd.Function):
    """y, mean, invstd = BN with weighted statistics; mean/invstd not differentiable."""

    @staticmethod
    def forward(x: Tensor, w: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        with torch.no_grad():
            mean, var = masked_moments(x, w)
            invstd = torch.rsqrt(var + eps)
        return ops.normalize(x, mean, invstd, weight, bias), mean, invstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, weight, _bias, eps = inputs
        _y, mean, invstd = output
        ctx.save_for_backward(x, w, weight, mean, invstd)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, invstd)

    @staticmethod
    def backward(ctx, dy, _dmean, _dinvstd):
        x, w, weight, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: the statistics depend on x too
            mean, var = masked_moments(x, w)
            invstd = torch.rsqrt(var + ctx.eps)
        dx, dw, db = weighted_backward(dy, x, w, weight, mean, invstd)
        need = ctx.needs_input_grad
        cast = (lambda g: g.to(weight.dtype)) if weight is not None else (lambda g: g)
        return (
            dx if need[0] else None,
            None,
            cast(dw) if need[2] else None,
            cast(db) if need[3] else None,
            None,
        )
