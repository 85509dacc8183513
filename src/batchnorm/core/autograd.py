"""Autograd Functions with BN's explicit closed-form backward.

Training (statistics from the batch itself), with m elements per channel,
x_hat = (x - mean) * invstd and g = weight * invstd::

    dbias   = sum(dy)
    dweight = sum(dy * x_hat)
    dx      = g / m * (m * dy - sum(dy) - x_hat * sum(dy * x_hat))
              # m*dy: the direct path through x_hat; sum(dy): through the mean;
              # x_hat * sum(dy * x_hat): through the variance

(derived stage by stage in ``batchnorm.reference``). Eval (fixed statistics) is an affine
map: ``dx = dy * g``.

First-order backward runs the fused kernels through the ``batchnorm::`` custom ops. When
autograd records the backward itself (``create_graph=True``: double backward, gradient
penalties, ``torch.func.grad`` nesting) the same closed form runs as differentiable torch
operations on the saved input, recomputing the statistics so that their dependence on x
is differentiated too.

Both Functions take the backend whose kernels they run (``kernels``, chosen by
``batchnorm.plan``), or None for ``batchnorm.ops`` (custom ops that pick the kernels when
they run: torch.compile, torch.func, dispatch modes).

Both Functions define ``setup_context`` and a ``vmap`` rule, so ``torch.func.grad`` and
``torch.func.vmap`` work: vmap over B models turns (B, N, C, *) into one BN call over
(N, B*C, *), whose per-channel statistics are exactly the per-model ones.
"""

from __future__ import annotations

import torch
from torch import Tensor
from . import ops
from ..kernels.torch_backend import acc_dtype, channel_view, reduce_dims


def like_layout(t: Tensor, x: Tensor) -> Tensor:
    """``t`` in the memory layout of ``x`` (kernels expect dy laid out like x)."""
    if x.dim() in (4, 5) and not x.is_contiguous() and x.is_contiguous(
        memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    ):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return t.contiguous(memory_format=fmt)
    return t.contiguous()


def cast_grad(grad: Tensor | None, like: Tensor | None, needed: bool) -> Tensor | None:
    """``grad`` in ``like``'s dtype where it is ``needed`` (a parameter's gradient in the
    parameter's dtype), else None; no ``.to`` call where the dtype is already right (a
    dispatch per call saved)."""
    if grad is None or like is None or not needed:
        return None
    return grad if grad.dtype == like.dtype else grad.to(like.dtype)


def differentiable_backward(
    dy: Tensor, x: Tensor, weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The training closed form as differentiable torch ops (used for double backward)."""
    acc = acc_dtype(x.dtype)
    dims = reduce_dims(x)
    m = x.numel() // x.shape[1]
    xf = x.to(acc)
    var, mean = torch.var_mean(xf, dim=dims, correction=0)
    invstd = torch.rsqrt(var + eps)
    x_hat = (xf - channel_view(mean, x)) * channel_view(invstd, x)
    dyf = dy.to(acc)
    sum_dy = dyf.sum(dims)
    sum_dy_xhat = (dyf * x_hat).sum(dims)
    g = invstd if weight is None else weight.to(acc) * invstd
    dx = channel_view(g / m, x) * (
        m * dyf - channel_view(sum_dy, x) - x_hat * channel_view(sum_dy_xhat, x)
    )
    return dx.to(x.dtype), sum_dy_xhat, sum_dy


def _batched(t: Tensor | None, bdim: int | None, batch: int) -> Tensor | None:
    """A per-channel vector of each of ``batch`` models, flattened to (batch * C,)."""
    if t is None:
        return None
    t = t.movedim(bdim, 0) if bdim is not None else t.unsqueeze(0).expand(batch, *t.shape)
    return t.reshape(-1)


def _fold(x: Tensor, bdim: int | None, batch: int) -> Tensor:
    """(B, N, C, *) -> (N, B*C, *): B models' channels side by side."""
    x = x.movedim(bdim, 0) if bdim is not None else x.unsqueeze(0).expand(batch, *x.shape)
    return x.transpose(0, 1).reshape(x.shape[1], -1, *x.shape[3:])


def _unfold(y: Tensor, batch: int) -> Tensor:
    """(N, B*C, *) -> (B, N, C, *)."""
    return y.reshape(y.shape[0], batch, -1, *y.shape[2:]).transpose(0, 1)


class BatchNormTrain(torch.autograd.Function):
    """y, mean, invstd = BN over the batch's own statistics (mean/invstd not differentiable).
    ``running``: a layer's RunningBackup prepared for the step, for backends that fold the
    batch into the running buffers themselves (``takes_backup``); None otherwise."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, kernels=None,
                running=None):
        if running is not None:
            return kernels.forward_train(x, weight, bias, eps, running)
        return (kernels or ops).forward_train(x, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _bias, eps, kernels, _running = inputs
        _y, mean, invstd = output
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps, ctx.kernels = eps, kernels
        ctx.mark_non_differentiable(mean, invstd)
        ctx.set_materialize_grads(False)  # no zero tensors for mean's and invstd's None grads
        # (on CUDA two allocations and fills per call)

    @staticmethod
    def backward(ctx, dy, _dmean, _dinvstd):
        if dy is None:  # no gradient reached y (grads are not materialised): all zero
            return None, None, None, None, None, None
        x, weight, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():
            dx, dw, db = differentiable_backward(dy, x, weight, ctx.eps)
        else:
            dx, dw, db = (ctx.kernels or ops).backward(like_layout(dy, x), x, mean, invstd, weight)
        need = ctx.needs_input_grad
        return (
            dx if need[0] else None,
            cast_grad(dw, weight, need[1]),
            cast_grad(db, weight, need[2]),
            None,
            None,
            None,
        )

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, eps, kernels=None, running=None):
        b = info.batch_size
        y, mean, invstd = BatchNormTrain.apply(
            _fold(x, in_dims[0], b),
            _batched(weight, in_dims[1], b),
            _batched(bias, in_dims[2], b),
            eps,
            kernels,
            running,
        )
        return (_unfold(y, b), mean.view(b, -1), invstd.view(b, -1)), (0, 0, 0)


class BatchNormEval(torch.autograd.Function):
    """y = BN with fixed statistics (mean, invstd): an affine map per channel."""

    @staticmethod
    def forward(x, mean, invstd, weight, bias, kernels=None):
        return (kernels or ops).normalize(x, mean, invstd, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, mean, invstd, weight, _bias, _kernels = inputs
        ctx.save_for_backward(x, mean, invstd, weight)

    @staticmethod
    def backward(ctx, dy):
        x, mean, invstd, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        acc = mean.dtype
        dims = reduce_dims(x)
        dyf = dy.to(acc)
        g = invstd if weight is None else weight.to(acc) * invstd
        dx = (dyf * channel_view(g, x)).to(x.dtype) if need[0] else None
        dw = dmean = dinvstd = None
        if need[2] or need[3]:  # sum(dy * (x - mean)): d invstd / weight, d weight * invstd
            centred = (dyf * (x.to(acc) - channel_view(mean, x))).sum(dims)
            dw = centred * invstd if need[3] else None
            if need[2]:
                dinvstd = centred if weight is None else centred * weight.to(acc)
        db = dyf.sum(dims) if need[4] or need[1] else None
        if need[1]:  # statistics that are learned (meta-learning, test-time adaptation)
            dmean = -g * db
        return (dx, dmean, dinvstd, cast_grad(dw, weight, need[3]),
                cast_grad(db, weight, need[4]), None)

    @staticmethod
    def vmap(info, in_dims, x, mean, invstd, weight, bias, kernels=None):
        b = info.batch_size
        y = BatchNormEval.apply(
            _fold(x, in_dims[0], b),
            _batched(mean, in_dims[1], b),
            _batched(invstd, in_dims[2], b),
            _batched(weight, in_dims[3], b),
            _batched(bias, in_dims[4], b),
            kernels,
        )
        return _unfold(y, b), 0


def eager_apply(function: type[torch.autograd.Function]):
    """``function.apply`` for eager calls outside torch.func transforms: the C entry
    itself, without the per-call ``inspect.signature`` binding torch performs for
    ``setup_context``-style Functions (its cost: benchmarks/README.md). Every argument is
    passed positionally, so that binding has nothing to do."""
    return super(torch.autograd.Function, function).apply


train_apply = eager_apply(BatchNormTrain)
eval_apply = eager_apply(BatchNormEval)
