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
from . import plan, stats, traced
from ..kernels.torch_backend import acc_dtype, channel_view, reduce_dims
from .masking import (
    MaskedBatchNormTrain, _full, effective_count, mask_weights, masked_moments,
    selected_count,
)

__all__ = [
    "batch_stats", "normalize", "batch_norm", "batch_norm_stateless", "masked_batch_norm",
]


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` (N, C, *), differentiable.

    Accumulated in float32 for half inputs (float64 for float64), centred (two-pass), so
    a float32 channel with mean 1e4 and std 1 keeps full precision."""
    check_float(x)
    var, mean = torch.var_mean(x.to(acc_dtype(x.dtype)), dim=reduce_dims(x), correction=0)
    return mean, var


def normalize(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None = None,
              bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
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
    ``masked_batch_norm`` and ``batchnorm.MaskedBatchNorm1d``.
    """
    if mask is not None:
        return masked_batch_norm(input, running_mean, running_var, weight, bias, training,
                                 momentum, eps, mask=mask)
    check_float(input)
    check_vectors(input, weight, bias, running_mean, running_var, "batch_norm")
    check_options(eps, momentum, "batch_norm", training=training)
    if training and input.numel() == 0:
        return empty_output(input, weight, bias, eps)
    if training:
        _values_per_channel(input)
        if running_mean is not None and running_var is not None:
            return plan.train(input, weight, bias, eps, running_mean, running_var, momentum)[0]
        return plan.train(input, weight, bias, eps)[0]
    check_running(running_mean, running_var, "batch_norm")
    return plan.evaluate(input, running_mean, running_var, weight, bias, eps)


def batch_norm_stateless(
    input: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None = None,
    bias: Tensor | None = None, training: bool = False, momentum: float = 0.1,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor, Tensor]:
    """Like ``batch_norm`` but mutates nothing: returns ``(output, new_running_mean,
    new_running_var)``. In eval the running statistics come back unchanged.

    Pure, so it works under ``torch.func.vmap`` (a batch of models) and ``torch.func.grad``.
    Non-finite batch statistics leave the returned running statistics equal to the old
    ones (no warning: values are not inspected, which transforms forbid). For PyTorch's
    cumulative average (momentum=None), pass ``momentum=1/num_batches_tracked``.
    """
    check_float(input)
    check_vectors(input, weight, bias, running_mean, running_var, "batch_norm_stateless")
    check_options(eps, momentum, "batch_norm_stateless", training=training)
    if training and input.numel() == 0:
        return empty_output(input, weight, bias, eps), running_mean, running_var
    if not training:
        y = plan.evaluate(input, running_mean, running_var, weight, bias, eps)
        return y, running_mean, running_var
    count = _values_per_channel(input)
    y, mean, invstd = plan.train(input, weight, bias, eps)
    new_mean, new_var = stats.update_running(
        running_mean, running_var, mean, None, count, momentum, invstd=invstd, eps=eps,
        inplace=False,
    )
    return y, new_mean, new_var


def masked_batch_norm(
    input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
    weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
    momentum: float | None = 0.1, eps: float = 1e-5, *, mask: Tensor,
    num_batches_tracked: Tensor | None = None,
) -> Tensor:
    """``batch_norm`` with masked / weighted statistics (``batchnorm.masking``,
    ``MaskedBatchNorm1d``). In training the statistics come from the positions the mask
    selects (weights), and the running buffers, when given, are updated with them
    (``momentum`` weights the NEW batch; unbiased by n_eff; ``num_batches_tracked``, when
    given, counts applied updates, as ``momentum=None`` needs). With ``training=False``
    the running statistics normalise and the mask is only checked."""
    check_float(input)
    check_vectors(input, weight, bias, running_mean, running_var, "masked batch_norm")
    check_options(eps, momentum, "masked batch_norm", training=training)
    w = mask_weights(input, mask)
    if not training:
        check_running(running_mean, running_var, "masked batch_norm")
        return plan.evaluate(input, running_mean, running_var, weight, bias, eps)
    if traced.active(input):  # the count is data: masked_train checks it when it runs
        return masked_train(input, w, weight, bias, eps, running_mean, running_var, momentum,
                            num_batches_tracked)
    count = selected_count(input, w)
    if count <= 1:
        raise ValueError(
            f"the mask selects {count} value(s) per channel of the input of shape "
            f"{tuple(input.shape)}; training statistics need more than 1"
        )
    return masked_train(input, w, weight, bias, eps, running_mean, running_var, momentum,
                        num_batches_tracked)


def masked_train(input, w, weight, bias, eps, running_mean=None, running_var=None,
                 momentum=0.1, num_batches_tracked=None) -> Tensor:
    """Normalise with the statistics of the weights ``w`` (``masking.mask_weights``) and
    fold them into the running buffers, when given. Under a tracer (``traced.active``):
    the weighted statistics and the normalisation as plain torch ops (autograd
    differentiates through the statistics: the closed form of ``batchnorm.masking``), the
    selected count (> 1) checked when the program runs, and the guarded update with Kish's
    effective count as a tensor."""
    if traced.active(input):
        full = _full(w, input)
        traced.check(
            torch.count_nonzero(full) > 1,
            f"the mask selects at most 1 value per channel of the input of shape "
            f"{tuple(input.shape)}; training statistics need more than 1",
        )
        mean, var = masked_moments(input, w)
        n_eff = full.sum() ** 2 / (full * full).sum()
        return traced.train_with(input, mean, var, n_eff, weight, bias, running_mean,
                                 running_var, num_batches_tracked, momentum, eps)
    y, mean, invstd = MaskedBatchNormTrain.apply(input, w, weight, bias, eps)
    if running_mean is not None and running_var is not None:
        stats.update_running(
            running_mean, running_var, mean, None, effective_count(input, w), momentum,
            num_batches_tracked, invstd=invstd, eps=eps,
        )
    return y


def check_options(eps: float, momentum: float | None, owner, *, training: bool) -> None:
    """eps and momentum as torch.nn checks them, or stricter; Python comparisons only (this
    runs on every call).

    ``eps`` is added to the variance, ``1 / sqrt(var + eps)``: it must be finite, > 0 when
    the batch's statistics normalise (``training``: a channel of constant values would
    otherwise divide by zero; torch.nn: "eps must be positive during training") and >= 0
    otherwise (eval with running statistics, a layer's construction, a frozen layer:
    torch.nn's "eps must be non-negative"; eps = 0 stays usable there, as in torch.nn).
    torch.nn accepts a NaN or infinite eps (NaN or all-zero outputs); here they are refused.
    ``momentum`` in [0, 1] or None (NaN refused). ``owner``: the layer (or the function's
    name) the error names."""
    try:
        ok = 0 < eps < _INF if training else 0 <= eps < _INF
    except TypeError:  # a string, None, ...: no order with numbers
        raise TypeError(
            f"{_name(owner)}: eps must be a number, but got {eps!r} of type "
            f"{type(eps).__name__} (it is added to the variance: 1 / sqrt(var + eps)). "
            f"{_EPS_FIX}"
        ) from None
    if not ok:
        _refuse_eps(eps, _name(owner), training)
    if momentum is not None and not 0 <= momentum <= 1:
        raise ValueError(
            f"{_name(owner)}: momentum must be between 0 and 1 (the weight of the new "
            f"batch) or None (the cumulative average), got {momentum}"
        )


_INF = float("inf")
_EPS_FIX = "Set a small positive eps, e.g. torch.nn's default 1e-5."


def _refuse_eps(eps, what: str, training: bool) -> None:
    """The error for an eps ``check_options`` refused, in torch.nn's words where it has some."""
    fix = _EPS_FIX
    if eps != eps or eps == _INF:
        raise ValueError(
            f"{what}: eps must be a finite number, but got {eps} (it is added to the "
            f"variance: 1 / sqrt(var + eps) would be {'NaN' if eps != eps else 0} for "
            f"every channel). {fix}"
        )
    if training:
        raise ValueError(
            f"{what}: eps must be positive during training, but got {eps} (the batch's "
            "variance is 0 for a channel of constant values, and 1 / sqrt(var + eps) then "
            f"divides by zero). {fix} (eps = 0 is accepted in eval, as in torch.nn.)"
        )
    raise ValueError(
        f"{what}: eps must be non-negative, but got {eps} (1 / sqrt(var + eps) is not "
        f"finite where var <= {-eps}). {fix}"
    )


def _name(owner) -> str:
    return owner if isinstance(owner, str) else type(owner).__name__


def check_vectors(input: Tensor, weight: Tensor | None, bias: Tensor | None,
                  running_mean: Tensor | None, running_var: Tensor | None, owner) -> None:
    """Every per-channel vector given is floating point, of shape (C,) for the input's C
    channels, on the input's device: checked before any kernel reads it or any buffer is
    written (a shorter vector would be read past its end by kernels that trust it).
    ``owner``: the layer (or the function's name) the error names. (On every call: for
    CPU input no device object is built, and no size object.)"""
    c, cpu = input.shape[1], input.is_cpu
    device = None if cpu else input.device
    for t in (weight, bias, running_mean, running_var):
        if t is not None and (
            t.dim() != 1 or t.size(0) != c or not t.is_floating_point()
            or (not t.is_cpu if cpu else t.device != device)
        ):
            _refuse_vectors(input, weight, bias, running_mean, running_var, _name(owner))


def _refuse_vectors(input, weight, bias, running_mean, running_var, what) -> None:
    named = {"weight": weight, "bias": bias, "running_mean": running_mean,
             "running_var": running_var}
    channels = input.shape[1]
    for name, t in named.items():
        if t is None:
            continue
        if t.shape != input.shape[1:2]:
            raise ValueError(
                f"{what}: {name} should contain {channels} elements not {t.numel()} (shape "
                f"{tuple(t.shape)}; the input has {channels} channels on dim 1)"
            )
        if t.device != input.device:
            raise ValueError(
                f"{what}: {name} is on {t.device} but the input is on {input.device}; move "
                "them to one device (e.g. module.to(input.device))"
            )
        if not t.is_floating_point():
            raise TypeError(f"{what}: {name} must be floating point, got {t.dtype}")


def empty_output(input: Tensor, weight: Tensor | None, bias: Tensor | None,
                 eps: float) -> Tensor:
    """The output of a training batch with no values (N = 0): empty, connected to weight
    and bias (their gradients are zeros); no statistics, nothing updated."""
    zeros = input.new_zeros(input.shape[1], dtype=acc_dtype(input.dtype))
    return normalize(input, zeros, zeros + 1, weight, bias, eps)


def _values_per_channel(input: Tensor) -> int:
    count = input.numel() // input.shape[1] if input.dim() > 1 and input.shape[1] else 0
    if count <= 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got input size "
            f"{list(input.shape)}. A batch of one needs an explicit policy: see the "
            "single_value option of batchnorm.BatchNorm1d/2d/3d."
        )
    return count


def check_float(input: Tensor) -> None:
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


def check_running(running_mean: Tensor | None, running_var: Tensor | None, what: str) -> None:
    """Normalising with fixed statistics needs both running buffers."""
    if running_mean is None or running_var is None:
        raise ValueError(
            f"{what} with training=False needs running_mean and running_var; got None. "
            "Pass training=True to normalise with the batch statistics."
        )
