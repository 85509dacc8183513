"""torch.library custom ops around the kernels, so a tracer sees them as opaque calls with
known output shapes (the fake implementations) instead of tracing into numba or Triton
code. They carry no autograd formula of their own: ``batchnorm.autograd`` wraps them in
autograd Functions (which also support ``torch.func`` transforms). The layers themselves
do not reach them under ``torch.compile`` / ``torch.export``: there the plan's traced
route runs ``batchnorm.core.traced`` (ATen's BN, which Inductor fuses and exporters
know); the ops serve torch.func transforms (through the Functions' vmap rules) and code
that calls the Functions or these names while tracing, and pass
``torch.library.opcheck`` (tests/test_compile.py).

Every op dispatches at run time to the fastest backend that applies (see
``batchnorm.kernels``).

The public names (``forward_train``, ``backward``, ...) call the kernels directly in eager
mode (the custom-op dispatcher's cost per call, and its first call's import of
``torch._dynamo``: benchmarks/README.md). While ``torch.compile`` traces, or under any dispatch
mode (fake tensors, ``make_fx``), they go through the registered custom op instead, so the
graph records an opaque node."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .. import kernels
from ..kernels.torch_backend import acc_dtype


def _stat(x: Tensor) -> Tensor:
    return x.new_empty((x.shape[1],), dtype=acc_dtype(x.dtype))


@torch.library.custom_op("batchnorm::batch_stats", mutates_args=())
def _batch_stats_op(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel (mean, biased var)."""
    return kernels.call("batch_stats", x)


@_batch_stats_op.register_fake
def _(x):
    return _stat(x), _stat(x)


@torch.library.custom_op("batchnorm::forward_train", mutates_args=())
def _forward_train_op(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Training forward: (y, mean, invstd)."""
    return kernels.call("forward_train", x, weight, bias, eps)


@_forward_train_op.register_fake
def _(x, weight, bias, eps):
    return torch.empty_like(x), _stat(x), _stat(x)


@torch.library.custom_op("batchnorm::normalize", mutates_args=())
def _normalize_op(
    x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]
) -> Tensor:
    """y = (x - mean) * invstd * weight + bias with given statistics (eval forward)."""
    return kernels.call("normalize", x, mean, invstd, weight, bias)


@_normalize_op.register_fake
def _(x, mean, invstd, weight, bias):
    return torch.empty_like(x)


@torch.library.custom_op("batchnorm::backward", mutates_args=())
def _backward_op(
    dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """Closed-form training backward: (dx, dweight, dbias), the last two in float32/64."""
    return kernels.call("backward", dy, x, mean, invstd, weight, (True, True, True))


@_backward_op.register_fake
def _(dy, x, mean, invstd, weight):
    return torch.empty_like(x), torch.empty_like(mean), torch.empty_like(mean)


@torch.library.custom_op("batchnorm::backward_reduce", mutates_args=())
def _backward_reduce_op(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor) -> tuple[Tensor, Tensor]:
    """(sum(dy), sum(dy * x_hat)) per channel."""
    return kernels.call("backward_reduce", dy, x, mean, invstd)


@_backward_reduce_op.register_fake
def _(dy, x, mean, invstd):
    return torch.empty_like(mean), torch.empty_like(mean)


@torch.library.custom_op("batchnorm::backward_elemt", mutates_args=())
def _backward_elemt_op(
    dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
    sum_dy: Tensor, sum_dy_xhat: Tensor, count: float,
) -> Tensor:
    """dx from (possibly all-reduced) sums over ``count`` elements per channel."""
    return kernels.call(
        "backward_elemt", dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count
    )


@_backward_elemt_op.register_fake
def _(dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count):
    return torch.empty_like(x)


@torch.library.custom_op("batchnorm::forward_train_act", mutates_args=())
def _forward_train_act_op(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, act: str, alpha: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Training forward of BN + activation: (z, mean, invstd)."""
    return kernels.call("forward_train_act", x, weight, bias, eps, act, alpha)


@_forward_train_act_op.register_fake
def _(x, weight, bias, eps, act, alpha):
    return torch.empty_like(x), _stat(x), _stat(x)


@torch.library.custom_op("batchnorm::forward_eval_act", mutates_args=())
def _forward_eval_act_op(
    x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
    act: str, alpha: float,
) -> Tensor:
    """Eval forward of BN + activation with given statistics."""
    return kernels.call("forward_eval_act", x, mean, invstd, weight, bias, act, alpha)


@_forward_eval_act_op.register_fake
def _(x, mean, invstd, weight, bias, act, alpha):
    return torch.empty_like(x)


def _act_backward_op(name: str, doc: str):
    """The custom op ``batchnorm::<name>`` of a BN + activation backward: (dz, t, mean,
    invstd, weight, bias, act, alpha, training) -> (dx, dweight, dbias), t the tensor the
    layer kept (its output z or its input x)."""

    def impl(
        dz: Tensor, t: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
        bias: Optional[Tensor], act: str, alpha: float, training: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        return kernels.call(name, dz, t, mean, invstd, weight, bias, act, alpha, training)

    impl.__doc__ = doc
    op = torch.library.custom_op(f"batchnorm::{name}", impl, mutates_args=())

    @op.register_fake
    def _(dz, t, mean, invstd, weight, bias, act, alpha, training):
        return torch.empty_like(t), torch.empty_like(mean), torch.empty_like(mean)

    return op


_backward_act_op = _act_backward_op(
    "backward_act", "Backward of BN + invertible activation from its output z."
)
_backward_act_input_op = _act_backward_op(
    "backward_act_input", "Backward of BN + activation from its input x."
)


def _eager_or_op(op: Callable, kernel: str) -> Callable:
    """Call the kernel directly in eager mode, the custom op while tracing."""

    def call(*args):
        if (
            torch.compiler.is_compiling()
            or _get_current_dispatch_mode() is not None
            or type(args[0]) is not torch.Tensor
        ):
            return op(*args)
        return kernels.call(kernel, *args)

    call.__name__ = call.__qualname__ = kernel
    call.__doc__ = op.__doc__
    return call


batch_stats = _eager_or_op(_batch_stats_op, "batch_stats")
forward_train = _eager_or_op(_forward_train_op, "forward_train")
normalize = _eager_or_op(_normalize_op, "normalize")
backward = _eager_or_op(_backward_op, "backward")
backward_reduce = _eager_or_op(_backward_reduce_op, "backward_reduce")
backward_elemt = _eager_or_op(_backward_elemt_op, "backward_elemt")
forward_train_act = _eager_or_op(_forward_train_act_op, "forward_train_act")
forward_eval_act = _eager_or_op(_forward_eval_act_op, "forward_eval_act")
backward_act = _eager_or_op(_backward_act_op, "backward_act")
backward_act_input = _eager_or_op(_backward_act_input_op, "backward_act_input")
