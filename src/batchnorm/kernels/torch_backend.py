"""Pure-torch backend: always available, always correct, any device, dtype and layout.

It implements every operation of ``interface.Backend`` but the two that are ATen's own
(``forward_train_update``, ``forward_eval``), and closes every list of the dispatcher.
Faster backends are tested against this one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .interface import ALL, Grads, Mask, Vector

from . import activations

name = "torch"
OPS = frozenset((
    "batch_stats", "normalize", "forward_train", "backward_reduce", "backward_elemt",
    "backward", "backward_eval", "forward_train_act", "forward_eval_act", "backward_act",
    "backward_act_input",
))
records_autograd = False
blends_running = False
takes_backup = False


def supports(x: Tensor) -> bool:
    """The pure-torch path takes everything."""
    return True


def prefers(op: str, x: Tensor) -> bool:
    """The last resort: never preferred, always there."""
    return False


def accepts_running(x: Tensor, running_mean: Tensor, running_var: Tensor) -> bool:
    return False


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def vectors_as(dtype: torch.dtype, *vectors: Tensor | None) -> tuple[Tensor | None, ...]:
    """The vectors in ``dtype``, as they are where they all have it already (no ``.to``
    dispatch per call: this runs on every call; ATen's CPU kernels want the vectors in x's
    dtype, and ``.to`` is differentiable, so a float32 weight on float64 input still gets
    its gradient)."""
    for v in vectors:
        if v is not None and v.dtype != dtype:
            return tuple(None if v is None else v.to(dtype) for v in vectors)
    return vectors


def reduce_dims(x: Tensor) -> list[int]:
    """Every axis except the channel axis 1."""
    return [0, *range(2, x.dim())]


def channel_view(v: Tensor, x: Tensor) -> Tensor:
    """A per-channel vector shaped to broadcast against ``x`` (1, C, 1, ...)."""
    return v.view(1, -1, *([1] * (x.dim() - 2)))


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance, accumulated in ``acc_dtype`` (two-pass, exact
    for large means: no E[x^2] - E[x]^2 cancellation)."""
    var, mean = torch.var_mean(x.to(acc_dtype(x.dtype)), dim=reduce_dims(x), correction=0)
    return mean, var


def _scale_shift(
    mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """y = x * scale + shift with scale = weight * invstd, shift = bias - mean * scale."""
    scale = invstd if weight is None else weight.to(invstd.dtype) * invstd
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(invstd.dtype)
    return scale, shift


def normalize(
    x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    """y = (x - mean) * invstd * weight + bias, computed in the accumulation dtype."""
    scale, shift = _scale_shift(mean, invstd, weight, bias)
    if x.dtype == scale.dtype:  # one pass: shift + x * scale
        return torch.addcmul(channel_view(shift, x), x, channel_view(scale, x))
    y = x.to(scale.dtype) * channel_view(scale, x) + channel_view(shift, x)
    return y.to(x.dtype)


def forward_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Training forward: batch statistics, then normalise. Returns (y, mean, invstd)."""
    mean, var = batch_stats(x)
    invstd = torch.rsqrt(var + eps)
    return normalize(x, mean, invstd, weight, bias), mean, invstd


def backward_reduce(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor) -> tuple[Tensor, Tensor]:
    """The two reductions of the backward: sum(dy) and sum(dy * x_hat) per channel."""
    acc = mean.dtype
    dims = reduce_dims(x)
    dyf = dy.to(acc)
    x_hat = (x.to(acc) - channel_view(mean, x)) * channel_view(invstd, x)
    return dyf.sum(dims), (dyf * x_hat).sum(dims)


def backward_elemt(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    sum_dy: Tensor,
    sum_dy_xhat: Tensor,
    count: float,
) -> Tensor:
    """dx = weight * invstd * (dy - sum_dy / m - x_hat * sum_dy_xhat / m), m = ``count``.

    The sums may come from more data than ``x`` (sync BN passes all-reduced sums and the
    global count)."""
    acc = mean.dtype
    k = invstd if weight is None else weight.to(acc) * invstd
    x_hat = (x.to(acc) - channel_view(mean, x)) * channel_view(invstd, x)
    dx = channel_view(k, x) * (
        dy.to(acc) - channel_view(sum_dy / count, x) - x_hat * channel_view(sum_dy_xhat / count, x)
    )
    return dx.to(x.dtype)


def backward(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Vector,
             output_mask: Mask = ALL) -> Grads:
    """Closed-form training backward. Returns (dx, dweight, dbias), None where masked off.

    dweight = sum(dy * x_hat), dbias = sum(dy) (in the accumulation dtype; the caller casts
    to the parameter dtype)."""
    return backward_by_parts(backward_reduce, backward_elemt, dy, x, mean, invstd, weight,
                             output_mask)


def backward_by_parts(reduce, elemt, dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor,
                      weight: Vector, output_mask: Mask) -> Grads:
    """The training backward from a backend's ``backward_reduce`` and ``backward_elemt``
    (two passes over (dy, x), then one for dx)."""
    sum_dy, sum_dy_xhat = reduce(dy, x, mean, invstd)
    dx = None
    if output_mask[0]:
        dx = elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, x.numel() // x.shape[1])
    return masked(output_mask, dx, sum_dy_xhat, sum_dy)


def masked(output_mask: Mask, dx: Tensor | None, dweight: Tensor, dbias: Tensor) -> Grads:
    """(dx, dweight, dbias) with None where ``output_mask`` is False."""
    return dx, dweight if output_mask[1] else None, dbias if output_mask[2] else None


def backward_eval(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Vector,
                  output_mask: Mask = ALL) -> Grads:
    """Backward of the eval forward (fixed statistics): dx = dy * weight * invstd."""
    acc = mean.dtype
    dims = reduce_dims(x)
    dx = dw = db = None
    if output_mask[0]:
        k = invstd if weight is None else weight.to(acc) * invstd
        dx = (dy.to(acc) * channel_view(k, x)).to(x.dtype)
    if output_mask[1]:
        x_hat = (x.to(acc) - channel_view(mean, x)) * channel_view(invstd, x)
        dw = (dy.to(acc) * x_hat).sum(dims)
    if output_mask[2]:
        db = dy.to(acc).sum(dims)
    return dx, dw, db


def forward_train_act(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, act: str, alpha: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Training forward of BN followed by an activation. Returns (z, mean, invstd)."""
    y, mean, invstd = forward_train(x, weight, bias, eps)
    return activations.apply(y.to(mean.dtype), act, alpha).to(x.dtype), mean, invstd


def forward_eval_act(
    x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None,
    act: str, alpha: float,
) -> Tensor:
    """Eval forward of BN (given statistics) followed by an activation."""
    y = normalize(x, mean, invstd, weight, bias)
    return activations.apply(y.to(mean.dtype), act, alpha).to(x.dtype)


def backward_act(
    dz: Tensor, z: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
    bias: Tensor | None, act: str, alpha: float, training: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of BN + invertible activation from the OUTPUT z alone (no input saved).

    y = act^-1(z); x_hat = (y - bias) / weight; dy = dz * act'(y); then the BN backward in
    terms of x_hat (training: closed form through the batch statistics; eval: fixed
    statistics). ``weight`` must have no zero entry (the layer keeps |weight| away from
    0). Returns (dx, dweight, dbias) in the accumulation dtype for dweight/dbias."""
    acc = mean.dtype
    dims = reduce_dims(z)
    zf = z.to(acc)
    y = activations.inverse(zf, act, alpha)
    dy = dz.to(acc) * activations.grad_from_output(zf, act, alpha)
    x_hat = y if bias is None else y - channel_view(bias.to(acc), z)
    if weight is not None:
        x_hat = x_hat / channel_view(weight.to(acc), z)
    sum_dy = dy.sum(dims)
    sum_dy_xhat = (dy * x_hat).sum(dims)
    k = invstd if weight is None else weight.to(acc) * invstd
    if training:
        m = z.numel() // z.shape[1]
        dx = channel_view(k, z) * (
            dy - channel_view(sum_dy / m, z) - x_hat * channel_view(sum_dy_xhat / m, z)
        )
    else:
        dx = dy * channel_view(k, z)
    return dx.to(z.dtype), sum_dy_xhat, sum_dy


def backward_act_by_bn(
    backward, backward_eval, dz: Tensor, z: Tensor, mean: Tensor, invstd: Tensor,
    weight: Tensor | None, bias: Tensor | None, act: str, alpha: float, training: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``backward_act`` through a backend's plain BN ``backward`` / ``backward_eval``:
    ``y = act^-1(z)`` and ``dy = dz * act'(y)`` (``activations``' vectorised ATen kernels),
    then BN's backward in ``x_hat = (y - bias) / weight``, given mean' = bias and
    invstd' = 1 / weight (so its x_hat is this one) and weight' = weight^2 * invstd (so its
    ``weight' * invstd'`` is this ``weight * invstd``). ``dz`` has z's dtype and layout.
    Returns (dx, dweight, dbias)."""
    acc = mean.dtype
    w, b = vectors_as(acc, weight, bias)
    w = torch.ones_like(mean) if w is None else w
    b = torch.zeros_like(mean) if b is None else b
    y = activations.inverse(z, act, alpha)
    dy = activations.backward_from_output(dz, z, act, alpha)
    grads = (backward if training else backward_eval)(dy, y, b, w.reciprocal(), w * w * invstd)
    return grads[0], grads[1], grads[2]


def backward_act_input(
    dz: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
    bias: Tensor | None, act: str, alpha: float, training: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of BN + activation from its INPUT x (the input-saving layer): y is
    recomputed, dy = dz * act'(y) (ATen's activation backward), then BN's closed form
    (``training``) or the fixed-statistics one. Returns (dx, dweight, dbias), the last two
    in the accumulation dtype."""
    return backward_act_input_by_bn(backward, backward_eval, dz, x, mean, invstd, weight,
                                    bias, act, alpha, training)


def backward_act_input_by_bn(
    backward, backward_eval, dz: Tensor, x: Tensor, mean: Tensor, invstd: Tensor,
    weight: Tensor | None, bias: Tensor | None, act: str, alpha: float, training: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``backward_act_input`` through a backend's plain BN ``backward`` / ``backward_eval``
    (y recomputed by this module's one-pass ``normalize``)."""
    acc = mean.dtype
    y = normalize(x, mean, invstd, weight, bias).to(acc)
    dy = activations.backward(dz.to(acc), y, act, alpha)
    dx, dw, db = (backward if training else backward_eval)(dy, x, mean, invstd, weight)
    return dx, dw, db
