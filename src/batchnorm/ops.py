"""torch.library custom ops around the kernels, so ``torch.compile`` sees them as opaque
calls with known output shapes (the fake implementations) instead of tracing into
numba or Triton code. They carry no autograd formula of their own: ``batchnorm.autograd``
wraps them in autograd Functions (which also support ``torch.func`` transforms).

Every op dispatches at run time to the fastest backend that applies (see
``batchnorm.kernels``)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import kernels
from .kernels.torch_backend import acc_dtype


def _stat(x: Tensor) -> Tensor:
    return x.new_empty((x.shape[1],), dtype=acc_dtype(x.dtype))


@torch.library.custom_op("batchnorm::batch_stats", mutates_args=())
def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel (mean, biased var)."""
    return kernels.call("batch_stats", x)


@batch_stats.register_fake
def _(x):
    return _stat(x), _stat(x)


@torch.library.custom_op("batchnorm::forward_train", mutates_args=())
def forward_train(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Training forward: (y, mean, invstd)."""
    return kernels.call("forward_train", x, weight, bias, eps)


@forward_train.register_fake
def _(x, weight, bias, eps):
    return torch.empty_like(x), _stat(x), _stat(x)


@torch.library.custom_op("batchnorm::normalize", mutates_args=())
def normalize(
    x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]
) -> Tensor:
    """y = (x - mean) * invstd * weight + bias with given statistics (eval forward)."""
    return kernels.call("normalize", x, mean, invstd, weight, bias)


@normalize.register_fake
def _(x, mean, invstd, weight, bias):
    return torch.empty_like(x)


@torch.library.custom_op("batchnorm::backward", mutates_args=())
def backward(
    dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """Closed-form training backward: (dx, dweight, dbias), the last two in float32/64."""
    return kernels.call("backward", dy, x, mean, invstd, weight, (True, True, True))


@backward.register_fake
def _(dy, x, mean, invstd, weight):
    return torch.empty_like(x), torch.empty_like(mean), torch.empty_like(mean)


@torch.library.custom_op("batchnorm::backward_reduce", mutates_args=())
def backward_reduce(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor) -> tuple[Tensor, Tensor]:
    """(sum(dy), sum(dy * x_hat)) per channel."""
    return kernels.call("backward_reduce", dy, x, mean, invstd)


@backward_reduce.register_fake
def _(dy, x, mean, invstd):
    return torch.empty_like(mean), torch.empty_like(mean)


@torch.library.custom_op("batchnorm::backward_elemt", mutates_args=())
def backward_elemt(
    dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
    sum_dy: Tensor, sum_dy_xhat: Tensor, count: float,
) -> Tensor:
    """dx from (possibly all-reduced) sums over ``count`` elements per channel."""
    return kernels.call(
        "backward_elemt", dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count
    )


@backward_elemt.register_fake
def _(dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count):
    return torch.empty_like(x)


@torch.library.custom_op("batchnorm::forward_train_act", mutates_args=())
def forward_train_act(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, act: str, alpha: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Training forward of BN + activation: (z, mean, invstd)."""
    return kernels.call("forward_train_act", x, weight, bias, eps, act, alpha)


@forward_train_act.register_fake
def _(x, weight, bias, eps, act, alpha):
    return torch.empty_like(x), _stat(x), _stat(x)


@torch.library.custom_op("batchnorm::forward_eval_act", mutates_args=())
def forward_eval_act(
    x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
    act: str, alpha: float,
) -> Tensor:
    """Eval forward of BN + activation with given statistics."""
    return kernels.call("forward_eval_act", x, mean, invstd, weight, bias, act, alpha)


@forward_eval_act.register_fake
def _(x, mean, invstd, weight, bias, act, alpha):
    return torch.empty_like(x)


@torch.library.custom_op("batchnorm::backward_act", mutates_args=())
def backward_act(
    dz: Tensor, z: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
    bias: Optional[Tensor], act: str, alpha: float, training: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of BN + invertible activation from its output z: (dx, dweight, dbias)."""
    return kernels.call(
        "backward_act", dz, z, mean, invstd, weight, bias, act, alpha, training
    )


@backward_act.register_fake
def _(dz, z, mean, invstd, weight, bias, act, alpha, training):
    return torch.empty_like(z), torch.empty_like(mean), torch.empty_like(mean)
