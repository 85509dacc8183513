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

Where the dispatcher picks ATen's kernels for the training forward (``native``: small
tensors, channels_last, (N, C); see ``batchnorm.kernels``), eager calls skip
``BatchNormTrain`` and let ATen's autograd record ``native_batch_norm``: the same forward
and backward kernels (the same closed form), with the derivative bookkeeping in C++ rather
than in a Python Function, which costs tens of microseconds per step (more than a small
BN itself). torch.func transforms and torch.compile still go through ``BatchNormTrain``.

Both Functions define ``setup_context`` and a ``vmap`` rule, so ``torch.func.grad`` and
``torch.func.vmap`` work: vmap over B models turns (B, N, C, *) into one BN call over
(N, B*C, *), whose per-channel statistics are exactly the per-model ones.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import kernels, ops, stats, traced
from .kernels.torch_backend import acc_dtype, channel_view, reduce_dims


def like_layout(t: Tensor, x: Tensor) -> Tensor:
    """``t`` in the memory layout of ``x`` (kernels expect dy laid out like x)."""
    if x.dim() in (4, 5) and not x.is_contiguous() and x.is_contiguous(
        memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    ):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return t.contiguous(memory_format=fmt)
    return t.contiguous()


def _cast(grad: Tensor | None, like: Tensor | None, needed: bool) -> Tensor | None:
    if grad is None or like is None or not needed:
        return None
    return grad.to(like.dtype)


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


class Function(torch.autograd.Function):
    """An autograd Function whose eager ``apply`` skips the per-call ``inspect.signature``
    binding that torch performs for ``setup_context``-style Functions (tens of
    microseconds, as much as a small BN itself). Every argument is passed positionally, so
    that binding has nothing to do. Under torch.func transforms or torch.compile the
    standard path runs."""

    @classmethod
    def apply(cls, *args):
        if torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling():
            return super().apply(*args)
        return super(torch.autograd.Function, cls).apply(*args)


class BatchNormTrain(Function):
    """y, mean, invstd = BN over the batch's own statistics (mean/invstd not differentiable)."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        return ops.forward_train(x, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _bias, eps = inputs
        _y, mean, invstd = output
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, invstd)

    @staticmethod
    def backward(ctx, dy, _dmean, _dinvstd):
        x, weight, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():
            dx, dw, db = differentiable_backward(dy, x, weight, ctx.eps)
        else:
            dx, dw, db = ops.backward(like_layout(dy, x), x, mean, invstd, weight)
        need = ctx.needs_input_grad
        return (
            dx if need[0] else None,
            _cast(dw, weight, need[1]),
            _cast(db, weight, need[2]),
            None,
        )

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, eps):
        b = info.batch_size
        y, mean, invstd = BatchNormTrain.apply(
            _fold(x, in_dims[0], b),
            _batched(weight, in_dims[1], b),
            _batched(bias, in_dims[2], b),
            eps,
        )
        return (_unfold(y, b), mean.view(b, -1), invstd.view(b, -1)), (0, 0, 0)


class BatchNormEval(Function):
    """y = BN with fixed statistics (mean, invstd): an affine map per channel."""

    @staticmethod
    def forward(x, mean, invstd, weight, bias):
        return ops.normalize(x, mean, invstd, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, mean, invstd, weight, _bias = inputs
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
        return dx, dmean, dinvstd, _cast(dw, weight, need[3]), _cast(db, weight, need[4])

    @staticmethod
    def vmap(info, in_dims, x, mean, invstd, weight, bias):
        b = info.batch_size
        y = BatchNormEval.apply(
            _fold(x, in_dims[0], b),
            _batched(mean, in_dims[1], b),
            _batched(invstd, in_dims[2], b),
            _batched(weight, in_dims[3], b),
            _batched(bias, in_dims[4], b),
        )
        return _unfold(y, b), 0


_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def transformed(*tensors: Tensor | None) -> bool:
    """Whether a torch.func transform wraps one of the tensors. (These two checks run on
    every call: plain loops, as generator expressions cost a microsecond each.)"""
    for t in tensors:
        if t is not None and _is_wrapped(t):
            return True
    return False


def needs_function(*tensors: Tensor | None) -> bool:
    """Whether the autograd Function is needed: something requires grad, or a torch.func
    transform wraps an input (its vmap rule must run). Otherwise the kernels are called
    directly, which spares the Function's per-call cost."""
    if torch.is_grad_enabled():
        for t in tensors:
            if t is not None and t.requires_grad:
                return True
    return transformed(*tensors)


def _aten_recorded(x: Tensor, weight: Tensor | None, bias: Tensor | None):
    """The backend whose training forward ATen's autograd records (``native``) when the
    dispatcher picks it for ``x`` in eager mode outside torch.func transforms, else None."""
    if torch.compiler.is_compiling() or transformed(x, weight, bias):
        return None
    backend = kernels.pick("forward_train", x)
    return backend if getattr(backend, "records_autograd", False) else None


def _ours(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
    """Our kernels: through ``BatchNormTrain`` when autograd needs it, directly otherwise
    (``train_forward`` without the ATen decision, once ``_aten_recorded`` said None)."""
    if needs_function(x, weight, bias):
        return BatchNormTrain.apply(x, weight, bias, eps)
    return ops.forward_train(x, weight, bias, eps)


def train_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, invstd) normalised with the batch statistics, differentiable in x, weight
    and bias through ``BatchNormTrain`` when needed (or ATen's autograd, see above).
    Under tracing: ``traced.batch`` (ATen's BN, which the tracer sees through)."""
    if traced.active(x):
        return traced.batch(x, weight, bias, eps)
    if needs_function(x, weight, bias):
        aten = _aten_recorded(x, weight, bias)
        if aten is not None:
            return aten.forward_train(x, weight, bias, eps)
        return BatchNormTrain.apply(x, weight, bias, eps)
    return ops.forward_train(x, weight, bias, eps)


def train_forward_updating(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
    running_mean: Tensor, running_var: Tensor, count: int, momentum: float | None,
    num_batches_tracked: Tensor | None = None, backup=None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``train_forward``, then the guarded running update of
    ``stats.update_running_from_invstd`` (non-finite batch: nothing written, a warning).

    Where ATen's kernels run the forward (as in ``train_forward``), ATen's kernel also
    blends the batch into the buffers, as it does for ``torch.nn``, so the running
    statistics are torch.nn's bit for bit; the guard then keeps a copy of the buffers and
    puts it back if the batch's statistics are not finite: in ``backup`` (a layer's
    ``kernels.cpu_backup.RunningBackup``) where it applies, else in a new tensor.
    Under tracing: ``traced.train`` (ATen's BN, the guard as ``torch.where``)."""
    if traced.active(x):
        return traced.train(x, weight, bias, running_mean, running_var, num_batches_tracked,
                            momentum, eps)
    aten = _aten_recorded(x, weight, bias)
    if aten is not None and aten.updates_running(x, running_mean, running_var):
        factor = stats.blend_factor(momentum, num_batches_tracked, pending=1)
        saved = backup is not None and backup.save(
            running_mean, running_var, num_batches_tracked
        )
        copy = None if saved else torch.cat((running_mean, running_var))  # one op
        y, mean, invstd = aten.forward_train_update(
            x, weight, bias, eps, running_mean, running_var, factor
        )
        # Finite buffers after the blend imply a finite batch (``commit`` then counts it
        # in num_batches_tracked). Otherwise ask the batch: buffers that were not finite
        # before, or a blend that overflowed, let a finite batch pass.
        if saved and backup.commit():
            return y, mean, invstd
        if stats.finite_batch(mean, invstd, eps):
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
        else:
            if saved:
                backup.restore()
            else:
                running_mean.copy_(copy[: running_mean.numel()])
                running_var.copy_(copy[running_mean.numel():])
            # (stacklevel 3: the warning points at the caller of this function)
            stats.warn_not_finite(mean, stats.var_from_invstd(invstd, eps), stacklevel=3)
        return y, mean, invstd
    if aten is not None:  # buffers ATen cannot take: its forward, our guarded update
        y, mean, invstd = aten.forward_train(x, weight, bias, eps)
    else:
        y, mean, invstd = _ours(x, weight, bias, eps)
    stats.update_running_from_invstd(
        running_mean, running_var, mean, invstd, eps, count, momentum, num_batches_tracked
    )
    return y, mean, invstd


def eval_forward(
    x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    """y normalised with fixed statistics, through ``BatchNormEval`` when needed."""
    if needs_function(x, mean, invstd, weight, bias):
        return BatchNormEval.apply(x, mean, invstd, weight, bias)
    return ops.normalize(x, mean, invstd, weight, bias)
