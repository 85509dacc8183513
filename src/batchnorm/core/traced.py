"""The traced route's implementation: batch normalization as standard ATen operations.

Eager calls run batchnorm's own kernels (``batchnorm.kernels``). Under a tracer
(``torch.compile``, ``torch.export``, which sets ``torch.compiler.is_compiling()`` too, and
any dispatch mode: fake tensors, ``make_fx``, FLOP counters) ``plan.train_plan`` /
``plan.eval_plan`` return the route ``"traced"`` with this module as its kernels, and
``plan.train`` / ``plan.evaluate`` run these functions, so that the tracer sees through
every layer:

- training: ``aten._native_batch_norm_legit_functional`` (what ``torch.nn``'s BN becomes
  once functionalised), whose backward Inductor decomposes and fuses with the
  convolution, activation or residual add around it as it does for ``torch.nn``;
- evaluation: ``aten._native_batch_norm_legit_no_training``, a core ATen op that ONNX
  exports as ``BatchNormalization`` and ExecuTorch / TensorRT know;
- the guard of the running statistics as ``torch.where`` (no host read, no data-dependent
  branch): a batch whose mean or variance is not finite leaves ``running_mean``,
  ``running_var`` and ``num_batches_tracked`` exactly as they were (without the eager
  route's warning, which would need a host read);
- value checks of the input (a mask's weights) as ``torch._assert_async``: the compiled or
  exported program raises at run time, before it writes any buffer.

Shape, rank and dtype checks are Python and run while tracing (the guards of a compiled
graph re-run them on every new shape). Every function here is plain torch and also runs
eagerly (the tests compare it with the eager route).

``torch.func`` transforms (vmap, grad) are not "tracers" here (``active`` is False under
them): the plan keeps them on the autograd Functions, whose vmap rules batch the kernels
and whose running update returns new buffers (``batch_norm_stateless``) instead of
writing unbatched ones in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels import torch_backend
from ..kernels.torch_backend import acc_dtype

_aten = torch.ops.aten
_PLAIN = (torch.Tensor, nn.Parameter)
_dispatch_modes = torch._C._len_torch_dispatch_stack  # active TorchDispatchModes (fake, proxy, ...)


def active(x: Tensor) -> bool:
    """Whether a call on ``x`` is being traced (torch.compile, torch.export, a dispatch
    mode, or a tensor subclass such as FakeTensor): then the layers run these ATen ops.
    (``is_compiling`` first: reading the dispatch-mode stack breaks Dynamo's graph.)
    False under a torch.func transform alone (see the module docstring)."""
    return (
        torch.compiler.is_compiling()
        or _dispatch_modes() > 0
        or type(x) not in _PLAIN
    )


def eval(  # noqa: A001 (the route's name: BN in evaluation)
    x: Tensor, running_mean: Tensor, running_var: Tensor,
    weight: Tensor | None, bias: Tensor | None, eps: float,
) -> Tensor:
    """``(x - running_mean) / sqrt(running_var + eps) * weight + bias`` as the core ATen op
    ``_native_batch_norm_legit_no_training``. Running statistics that require grad (learned
    statistics) take the same formula as differentiable elementwise ops instead, since
    ATen's BN does not differentiate in them."""
    if running_mean.requires_grad or running_var.requires_grad:
        acc = acc_dtype(x.dtype)
        invstd = torch.rsqrt(running_var.to(acc) + eps)
        return torch_backend.normalize(x, running_mean.to(acc), invstd, weight, bias)
    return _aten._native_batch_norm_legit_no_training(
        x, weight, bias, running_mean, running_var, 0.0, eps
    )[0]


def batch(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, invstd): BN with the batch's own statistics, no running update
    (``_native_batch_norm_legit.no_stats``; mean and invstd in float32 for half input)."""
    return _aten._native_batch_norm_legit.no_stats(x, weight, bias, True, 0.0, eps)


def train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None,
    running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor | None,
    momentum: float | None, eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, invstd) with the batch statistics, and the guarded running update:
    ``running = (1 - momentum) * running + momentum * batch_statistic`` (unbiased variance;
    ``momentum=None``: the cumulative average ``1 / num_batches_tracked``), written only
    where the batch's mean and variance are finite, as is the ``num_batches_tracked``
    increment. With a float momentum the new statistics are ATen's, so they equal
    ``torch.nn``'s (compiled or exported) bit for bit."""
    factor = 1.0 if momentum is None else momentum  # 1.0: the batch's own statistics
    # (copies: its autograd node saves the buffers, which the update below then writes)
    y, mean, invstd, new_mean, new_var = _aten._native_batch_norm_legit_functional(
        x, weight, bias, running_mean.clone(), running_var.clone(), True, factor, eps
    )
    ok = finite(mean, invstd)
    with torch.no_grad():
        if momentum is None:
            blend(running_mean, running_var, new_mean, new_var, ok, None, num_batches_tracked)
        else:
            running_mean.copy_(torch.where(ok, new_mean, running_mean))
            running_var.copy_(torch.where(ok, new_var, running_var))
            if num_batches_tracked is not None:
                num_batches_tracked.add_(ok.to(num_batches_tracked.dtype))
    return y, mean, invstd


def finite(mean: Tensor, invstd: Tensor) -> Tensor:
    """The guard's verdict as a 0-d bool tensor: every mean finite and every variance
    finite (``invstd = 1/sqrt(var + eps)`` is 0 for an infinite variance, NaN for NaN)."""
    return (torch.isfinite(mean) & (invstd > 0)).all()


@torch.no_grad()
def update_running(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, unbiased: Tensor,
    momentum: float | None, num_batches_tracked: Tensor | None, inplace: bool = True,
) -> tuple[Tensor, Tensor] | None:
    """``batchnorm.stats.update_running``'s guarded update without a host read (tracers;
    ``inplace=False`` also under torch.func transforms): fold a batch's (mean, unbiased
    variance) into the running buffers, ``running.lerp_(stat, factor)``; where a statistic
    is not finite the buffers and ``num_batches_tracked`` keep their values. With
    ``inplace=False`` nothing is written and the new ``(running_mean, running_var)`` are
    returned (``num_batches_tracked`` is then only read, by ``momentum=None``)."""
    ok = (torch.isfinite(mean) & torch.isfinite(unbiased)).all()
    return blend(running_mean, running_var, mean, unbiased, ok, momentum,
                 num_batches_tracked, inplace)


def blend(running_mean, running_var, mean, unbiased, ok, momentum, num_batches_tracked,
          inplace=True):
    """Fold (mean, unbiased) into the running buffers where the 0-d bool ``ok`` holds
    (``torch.where``, no host read); ``num_batches_tracked`` counts it."""
    if momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    if num_batches_tracked is not None and inplace:
        num_batches_tracked.add_(ok.to(num_batches_tracked.dtype))
    if momentum is None:
        factor = 1.0 / num_batches_tracked.clamp(min=1).to(running_mean.dtype)
    else:
        factor = torch.full((), momentum, dtype=running_mean.dtype, device=running_mean.device)
    factor = torch.where(ok, factor, torch.zeros_like(factor))
    new_mean = torch.where(ok, mean.to(running_mean.dtype), running_mean)
    new_var = torch.where(ok, unbiased.to(running_var.dtype), running_var)
    if not inplace:
        return running_mean.lerp(new_mean, factor), running_var.lerp(new_var, factor)
    running_mean.lerp_(new_mean, factor)
    running_var.lerp_(new_var, factor)
    return None


def warmup_limits(
    num_batches_tracked: Tensor, r_max: float, d_max: float, warmup_steps: int
) -> tuple[Tensor, Tensor]:
    """Batch Renorm's (r_max, d_max) at the current step as 0-d tensors (no host read):
    ``t = min(1, num_batches_tracked / warmup_steps)``, ``(1 + (r_max - 1) t, d_max t)``."""
    t = (num_batches_tracked.to(torch.float32) / warmup_steps).clamp(max=1.0)
    return 1.0 + (r_max - 1.0) * t, d_max * t


def train_with(
    x: Tensor, mean: Tensor, var: Tensor, count: Tensor,
    weight: Tensor | None, bias: Tensor | None,
    running_mean: Tensor | None, running_var: Tensor | None,
    num_batches_tracked: Tensor | None, momentum: float | None, eps: float,
) -> Tensor:
    """BN with given batch statistics (mean, biased var), as differentiable elementwise ops
    (autograd differentiates through the statistics to x), then the guarded update with
    the unbiased variance ``var * count / (count - 1)`` when buffers are given. For
    statistics that ATen's BN cannot compute (masked / weighted ones); ``count`` is a
    tensor (an effective count may depend on the data)."""
    y = torch_backend.normalize(x, mean, torch.rsqrt(var + eps), weight, bias)
    if running_mean is not None and running_var is not None:
        update_running(running_mean, running_var, mean.detach(),
                       (var * (count / (count - 1))).detach(), momentum, num_batches_tracked)
    return y


def check(condition: Tensor, message: str) -> None:
    """A value check of the input as ``torch._assert_async`` (raises when the traced
    program runs; a compiled graph keeps it before its buffer writes)."""
    torch._assert_async(condition, message)


_ACTIVATIONS = {
    "identity": lambda y, alpha: y,
    "relu": lambda y, alpha: F.relu(y),
    "leaky_relu": lambda y, alpha: F.leaky_relu(y, alpha),
    "elu": lambda y, alpha: F.elu(y, alpha),
    "silu": lambda y, alpha: F.silu(y),
    "gelu": lambda y, alpha: F.gelu(y),
}


def activation(y: Tensor, act: str, alpha: float) -> Tensor:
    """``act(y)`` as torch.nn.functional's op (exported as ONNX Relu, LeakyRelu, Elu, ...)."""
    return _ACTIVATIONS[act](y, alpha)


def straight_through(weight: Tensor | None, effective: Tensor | None) -> Tensor | None:
    """``effective`` in the forward, the gradient handed to ``weight`` unchanged
    (BatchNormAct's effective weight)."""
    if weight is None or effective is None:
        return weight
    return weight + (effective - weight.detach())
