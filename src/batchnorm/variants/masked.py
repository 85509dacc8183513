"""Masked / weighted batch statistics: padded positions excluded, or samples weighted.

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
from torch import Tensor, nn

from .. import ops, stats
from ..functional import _check_float, eval_normalize
from ..kernels.torch_backend import acc_dtype, channel_view, reduce_dims
from ..modules import _BatchNorm
from ._common import fill_doc, statistics_mode


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
    if mask.is_floating_point() and not bool(torch.isfinite(w).all() & (w >= 0).all()):
        raise ValueError("mask weights must be finite and >= 0")
    return w


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


def masked_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    mask: Tensor,
    num_batches_tracked: Tensor | None = None,
) -> Tensor:
    """``batchnorm.batch_norm`` with masked / weighted statistics (see the module docstring
    and ``MaskedBatchNorm1d``). In training the statistics come from the positions the
    mask selects (weights), and the running buffers, when given, are updated with them
    (``momentum`` weights the NEW batch; unbiased by n_eff; ``num_batches_tracked``, when
    given, counts applied updates, as ``momentum=None`` needs). With ``training=False``
    the running statistics normalise and the mask is only checked."""
    _check_float(input)
    w = mask_weights(input, mask)
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError(
                "masked batch_norm with training=False needs running_mean and running_var; "
                "got None. Pass training=True to normalise with the batch statistics."
            )
        return eval_normalize(input, running_mean, running_var, weight, bias, eps)
    count = selected_count(input, w)
    if count <= 1:
        raise ValueError(
            f"the mask selects {count} value(s) per channel of the input of shape "
            f"{tuple(input.shape)}; training statistics need more than 1"
        )
    return _train(input, w, running_mean, running_var, weight, bias, momentum, eps,
                  num_batches_tracked)


def _train(input, w, running_mean, running_var, weight, bias, momentum, eps, num_batches_tracked):
    y, mean, invstd = MaskedBatchNormTrain.apply(input, w, weight, bias, eps)
    if running_mean is not None and running_var is not None:
        stats.update_running(
            running_mean, running_var, mean, stats.var_from_invstd(invstd, eps),
            effective_count(input, w), momentum, num_batches_tracked,
        )
    return y


_DOC = r"""Batch Normalization over a {dims} input whose statistics skip padded positions
    or weight samples: ``forward(input, mask=None)``.

    With ``mask=None`` it is ``batchnorm.{plain}``. With a mask, in training, per channel,
    with weights :math:`w \ge 0` (a bool mask is 0/1) and :math:`W = \sum w`:

    .. math::

        \mu = \frac{{1}}{{W}}\sum w\,x, \qquad \sigma^2 = \frac{{1}}{{W}}\sum w\,(x - \mu)^2,
        \qquad y = \frac{{x - \mu}}{{\sqrt{{\sigma^2 + \epsilon}}}} * \gamma + \beta

    over N and the spatial axes. A bool mask gives exactly the statistics of the selected
    elements; every position is normalised with them (outputs at padded positions exist
    and are usually ignored). The running variance stores
    :math:`\sigma^2 \, n_{{eff}} / (n_{{eff}} - 1)` with Kish's effective count
    :math:`n_{{eff}} = W^2 / \sum w^2` (the number of selected elements for a bool mask;
    unchanged by rescaling the weights). {momentum} In evaluation the running statistics
    are used and the mask is only checked.

    Backward: an explicit closed form
    :math:`dx = \gamma\sigma^{{-1}}\,(dy - \tfrac{{w}}{{W}}(\sum dy + \hat x \sum dy\,\hat x))`
    (``batchnorm.variants.masked``); no gradient flows to the mask.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype, bias,
            single_value: as in ``batchnorm.BatchNorm2d`` (momentum default 0.1).

    Shape:
        - Input: {shape}, statistics over {reduced}.
        - mask: ``(N,)`` (per sample) or the input's shape without the channel axis
          (e.g. ``(N, L)`` for ``(N, C, L)``), axes of size 1 broadcast; bool (True = use)
          or floating-point weights (finite, >= 0).
        - Output: same shape as the input.

    Example::

        >>> import torch, batchnorm
        >>> bn = batchnorm.{name}({example_c})
        >>> x = torch.randn({example_shape})
        >>> y = bn(x, mask={example_mask})
    """


class _MaskedBatchNorm(_BatchNorm):
    """Shared body of MaskedBatchNorm1d/2d/3d."""

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is None:
            return super().forward(input)
        self.check_input(input)
        w = mask_weights(input, mask)
        count = selected_count(input, w)
        policy = self.single_value
        if self._uses_batch_stats() and (
            (count <= 1 and policy == "error") or (count == 0 and policy == "skip_update")
        ):
            raise ValueError(
                f"{type(self).__name__}: the mask selects {count} value(s) per channel of "
                f"the input of shape {tuple(input.shape)}; training statistics need more "
                "than 1 (or pass single_value='use_running' / 'skip_update')"
            )
        mode = statistics_mode(self, input, count)
        if mode == "running":
            return eval_normalize(
                input, self.running_mean, self.running_var, self.weight, self.bias, self.eps
            )
        if mode == "batch":
            return MaskedBatchNormTrain.apply(input, w, self.weight, self.bias, self.eps)[0]
        return _train(input, w, self.running_mean, self.running_var, self.weight, self.bias,
                      self.momentum, self.eps, self.num_batches_tracked)


def _doc(name: str, dims: tuple[int, ...], c: str, shape: str, mask: str) -> str:
    return fill_doc(_DOC, name, dims, c, shape, plain=name.replace("Masked", ""), example_mask=mask)


class MaskedBatchNorm1d(_MaskedBatchNorm, nn.BatchNorm1d):
    _expected_dims = (2, 3)
    _shape_text = "(N, C) or (N, C, L)"
    __doc__ = _doc("MaskedBatchNorm1d", _expected_dims, "8", "4, 8, 10",
                   "torch.arange(10) < torch.tensor([[10], [7], [3], [9]])")


class MaskedBatchNorm2d(_MaskedBatchNorm, nn.BatchNorm2d):
    _expected_dims = (4,)
    _shape_text = "(N, C, H, W)"
    __doc__ = _doc("MaskedBatchNorm2d", _expected_dims, "16", "8, 16, 5, 5",
                   "torch.rand(8)")


class MaskedBatchNorm3d(_MaskedBatchNorm, nn.BatchNorm3d):
    _expected_dims = (5,)
    _shape_text = "(N, C, D, H, W)"
    __doc__ = _doc("MaskedBatchNorm3d", _expected_dims, "4", "2, 4, 3, 3, 3",
                   "torch.tensor([True, False])")
