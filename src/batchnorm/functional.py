"""Functional batch normalization: statistics, normalisation, and ``batch_norm``.

The pieces, testable alone (compute statistics apart from applying them)::

    mean, var = batch_stats(x)                       # per channel, biased variance
    y = normalize(x, mean, var, weight, bias, eps)   # (x - mean) / sqrt(var + eps) * w + b

``batch_norm`` has the semantics of ``torch.nn.functional.batch_norm`` and runs on the
fused kernels with the explicit closed-form backward (see ``batchnorm.autograd``).
``batch_norm_stateless`` returns new running statistics instead of mutating buffers, so it
composes with ``torch.func.vmap`` and ``torch.func.grad``.

Conventions (PyTorch's): ``momentum`` is the weight of the NEW batch (Keras/Flax "0.99
decay" is PyTorch momentum 0.01); batches are normalised with the biased variance, the
running variance stores the unbiased one. See ``batchnorm.BatchNorm2d`` for the formula.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import kernels, stats, traced
from .autograd import (
    eval_forward, needs_function, train_forward, train_forward_updating, transformed,
)
from .kernels.torch_backend import acc_dtype, channel_view, reduce_dims

__all__ = ["batch_stats", "normalize", "batch_norm", "batch_norm_stateless"]


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` (N, C, *), differentiable.

    Accumulated in float32 for half inputs (float64 for float64), centred (two-pass), so
    a float32 channel with mean 1e4 and std 1 keeps full precision."""
    _check_float(x)
    var, mean = torch.var_mean(x.to(acc_dtype(x.dtype)), dim=reduce_dims(x), correction=0)
    return mean, var


def normalize(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` per channel, differentiable in all
    arguments; computed in the statistics' dtype and returned in ``x``'s."""
    acc = mean.dtype
    y = (x.to(acc) - channel_view(mean, x)) * channel_view(torch.rsqrt(var + eps), x)
    if weight is not None:
        y = y * channel_view(weight.to(acc), x)
    if bias is not None:
        y = y + channel_view(bias.to(acc), x)
    return y.to(x.dtype)


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    mask: Tensor | None = None,
) -> Tensor:
    """Batch normalization with the semantics of ``torch.nn.functional.batch_norm``.

    In training, normalises with the batch statistics and, when running buffers are given,
    updates them in place (``momentum`` weights the new batch; the unbiased variance is
    stored; non-finite statistics are never written). Otherwise normalises with the
    running statistics. See ``batchnorm.BatchNorm2d`` for the formula and shapes.

    ``mask`` (keyword): statistics from the selected / weighted positions only, shape
    ``(N,)`` or the input's shape without the channel axis, bool or float weights; see
    ``batchnorm.variants.masked.masked_batch_norm`` and ``batchnorm.MaskedBatchNorm1d``.
    """
    if mask is not None:
        from .variants.masked import masked_batch_norm  # the variant builds on this module

        return masked_batch_norm(input, running_mean, running_var, weight, bias, training,
                                 momentum, eps, mask=mask)
    _check_float(input)
    if training:
        count = _values_per_channel(input)
        if running_mean is not None and running_var is not None:
            return train_forward_updating(
                input, weight, bias, eps, running_mean, running_var, count, momentum
            )[0]
        return train_forward(input, weight, bias, eps)[0]
    if running_mean is None or running_var is None:
        raise ValueError(
            "batch_norm with training=False needs running_mean and running_var; got None. "
            "Pass training=True to normalise with the batch statistics."
        )
    return eval_normalize(input, running_mean, running_var, weight, bias, eps)


def batch_norm_stateless(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor, Tensor]:
    """Like ``batch_norm`` but mutates nothing: returns ``(output, new_running_mean,
    new_running_var)``. In eval the running statistics come back unchanged.

    Pure, so it works under ``torch.func.vmap`` (a batch of models) and ``torch.func.grad``.
    Non-finite batch statistics leave the returned running statistics equal to the old
    ones (no warning: values are not inspected, which transforms forbid). For PyTorch's
    cumulative average (momentum=None), pass ``momentum=1/num_batches_tracked``.
    """
    _check_float(input)
    if not training:
        return eval_normalize(input, running_mean, running_var, weight, bias, eps), running_mean, running_var
    count = _values_per_channel(input)
    y, mean, invstd = train_forward(input, weight, bias, eps)
    var = stats.var_from_invstd(invstd, eps) * (count / (count - 1))
    ok = (torch.isfinite(mean) & torch.isfinite(var)).all()
    factor = torch.where(ok, momentum, 0.0).to(running_mean.dtype)
    new_mean = running_mean + factor * (torch.where(ok, mean, 0.0).to(running_mean.dtype) - running_mean)
    new_var = running_var + factor * (torch.where(ok, var, 0.0).to(running_var.dtype) - running_var)
    return y, new_mean, new_var


def eval_normalize(
    input: Tensor, running_mean: Tensor, running_var: Tensor,
    weight: Tensor | None, bias: Tensor | None, eps: float,
) -> Tensor:
    """Normalise with fixed statistics through the fused eval kernel.

    A backend with ``forward_eval`` (ATen's own eval kernel, ``native``: the same numbers
    as ``torch.nn``, one pass) takes the running variance as it is, where no gradient is
    needed or where ATen's autograd may record the call (eager, no torch.func transform,
    running statistics that do not require grad): its backward is the same affine map, in
    C++ rather than in ``BatchNormEval``'s Python. Otherwise ``invstd`` is formed here and
    the ``normalize`` kernel runs. Under tracing: ``traced.eval`` (ATen's eval BN)."""
    if traced.active(input):
        return traced.eval(input, running_mean, running_var, weight, bias, eps)
    backend = kernels.pick("forward_eval", input)
    if hasattr(backend, "forward_eval") and (
        not needs_function(input, running_mean, running_var, weight, bias)
        or _recordable(backend, input, running_mean, running_var, weight, bias)
    ):
        return backend.forward_eval(input, running_mean, running_var, weight, bias, eps)
    acc = acc_dtype(input.dtype)
    invstd = torch.rsqrt(running_var.to(acc) + eps)
    return eval_forward(input, running_mean.to(acc), invstd, weight, bias)


def _recordable(backend, input: Tensor, running_mean: Tensor, running_var: Tensor,
                weight: Tensor | None, bias: Tensor | None) -> bool:
    """Whether ATen's autograd may record ``backend.forward_eval`` on these tensors."""
    return (
        getattr(backend, "records_autograd", False)
        and not running_mean.requires_grad and not running_var.requires_grad
        and not transformed(input, running_mean, running_var, weight, bias)
    )


def _values_per_channel(input: Tensor) -> int:
    count = input.numel() // input.shape[1] if input.dim() > 1 and input.shape[1] else 0
    if count <= 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got input size "
            f"{list(input.shape)}. A batch of one needs an explicit policy: see the "
            "single_value option of batchnorm.BatchNorm1d/2d/3d."
        )
    return count


def _check_float(input: Tensor) -> None:
    if not input.is_floating_point():
        raise TypeError(
            "batch norm expects a floating-point input (float16, bfloat16, float32 or "
            f"float64), got {input.dtype}. Convert it first, e.g. x.float()."
        )
    if input.dim() < 2:
        raise ValueError(
            f"batch norm expects input of shape (N, C, *) with at least 2 dimensions, got "
            f"shape {tuple(input.shape)}"
        )
