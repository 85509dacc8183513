"""Autograd Functions for BN followed by an activation, ``z = act(gamma * x_hat + beta)``.

Two ways to keep what the backward needs:

``OutputSavingBNAct`` (invertible activations: identity, leaky_relu with slope > 0, elu)
    keeps only the output ``z`` (which the next layer keeps anyway) and the per-channel
    statistics. The backward recovers ``y = act^-1(z)``, ``act'(y)`` from ``z`` and
    ``x_hat = (y - beta) / gamma``, then runs BN's closed form in ``x_hat``
    (InPlace-ABN's idea, Rota Bulo et al. 2018), through the ``batchnorm::backward_act``
    custom op so fused kernels run when present. Division by gamma needs gamma away from
    0: the layer uses the *effective weight* ``sign(gamma) * max(|gamma|, weight_eps)``
    (sign(0) = +1) in the forward and backward, and hands the gradient with respect to
    the effective weight to gamma unchanged (straight-through), so a weight near zero
    still learns. The recovered x_hat carries a relative error of about
    ``ulp(|y|) / |gamma_eff|``. Double backward is not available (it would need x).

``InputSavingBNAct`` (any activation; the only choice for relu, silu, gelu)
    keeps the input ``x`` and recomputes ``y`` and ``act'(y)`` in the backward, then runs
    BN's closed form, all through ``batchnorm::backward_act_input`` (one fused kernel for
    relu and leaky_relu on CPU). Double backward works.

Both take fixed statistics ``(mean, invstd)`` for evaluation, or ``None`` to use (and
return) the batch's own.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import kernels
from ..core import ops, traced
from ..core.autograd import cast_grad, like_layout, differentiable_backward
from ..kernels import activations
from ..kernels.torch_backend import channel_view, reduce_dims


def effective_weight(weight: Tensor | None, weight_eps: float) -> Tensor | None:
    """``sign(w) * max(|w|, weight_eps)`` with sign(0) = +1 (no gradient); core ATen ops
    (the traced route exports them). Where every ``|w| >= weight_eps`` (what training
    keeps almost always) that is ``w`` itself, ``weight.detach()``: on the CPU one compiled
    check says so (``kernels.cpu``'s ``magnitudes_at_least``), which saves the four ATen
    ops and their wrapped scalar on every training call (about a fifth of a small layer's
    step, benchmarks/README.md). Its values are then the weight's storage, saved for the
    backward as torch.nn saves its weight (an in-place change before the backward is
    refused by autograd, as there)."""
    if weight is None or weight_eps == 0:
        return None if weight is None else weight.detach()
    w = weight.detach()
    if not traced.active(w):
        cpu = kernels.load("cpu")
        if cpu is not None and cpu.magnitudes_at_least(w, weight_eps):
            return w
    return torch.where(w >= 0, w.clamp(min=weight_eps), w.clamp(max=-weight_eps))


def _forward(x, weight, bias, mean, invstd, eps, act, alpha, running):
    if running is not None:  # (running_mean, running_var, factor, backend that blends)
        running_mean, running_var, factor, backend = running
        return backend.forward_train_act_update(
            x, weight, bias, eps, act, alpha, running_mean, running_var, factor
        )
    if mean is None:
        return ops.forward_train_act(x, weight, bias, eps, act, alpha)
    z = ops.forward_eval_act(x, mean, invstd, weight, bias, act, alpha)
    return z, mean.view_as(mean), invstd.view_as(invstd)  # views: autograd forbids saving inputs returned as-is


def _kernels(running):
    """The backend whose kernel ran the forward with the running buffers (``running``'s
    last item): the backward runs on it too (it implements every BN + activation
    operation); None: ``ops`` picks."""
    return None if running is None else running[3]


def _grads(ctx, dx, dw, db, weight):
    need = ctx.needs_input_grad
    return (
        dx if need[0] else None, cast_grad(dw, weight, need[1]), cast_grad(db, weight, need[2]),
    ) + (None,) * 7


class OutputSavingBNAct(torch.autograd.Function):
    """(z, mean, invstd) = act(BN(x)), saving z: for invertible activations only."""

    @staticmethod
    def forward(x, weight, bias, mean, invstd, eps: float, act: str, alpha: float, effective,
                running=None):
        """``effective``: the weight computed with, ``effective_weight(weight, weight_eps)``
        (made once by the caller); its gradient goes to ``weight`` (straight-through).
        ``running``: ``(running_mean, running_var, factor, backend)`` where the backend's
        kernel blends the batch into the buffers (``plan.act_blender``), else None."""
        return _forward(x, effective, bias, mean, invstd, eps, act, alpha, running)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _x, _weight, bias, mean_in, _invstd, _eps, act, alpha, effective, running = inputs
        z, mean, invstd = output
        ctx.save_for_backward(z, effective, bias, mean, invstd)
        ctx.act, ctx.alpha, ctx.training = act, alpha, mean_in is None
        ctx.kernels = _kernels(running)
        ctx.mark_non_differentiable(mean, invstd)
        ctx.set_materialize_grads(False)  # no zero tensors for mean and invstd per call

    @staticmethod
    def backward(ctx, dz, _dmean, _dinvstd):
        if dz is None:  # no gradient reached z (set_materialize_grads(False)): zero
            return (None,) * 10
        if torch.is_grad_enabled():
            raise RuntimeError(
                "double backward through BatchNormAct in memory-saving mode is not "
                "available: it keeps only its output, and second derivatives need the "
                "input. Build the layer with memory_saving=False."
            )
        z, weight, bias, mean, invstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        if not ctx.training and not (need[1] or need[2]):
            # fixed statistics and no parameter gradient: dx = dz * act'(y) * gamma * invstd
            k = invstd if weight is None else weight.to(invstd.dtype) * invstd
            slope = activations.grad_from_output(z.to(invstd.dtype), ctx.act, ctx.alpha)
            dx = (dz.to(invstd.dtype) * slope * channel_view(k, z)).to(z.dtype)
            return (dx,) + (None,) * 9
        dx, dw, db = (ctx.kernels or ops).backward_act(
            like_layout(dz, z), z, mean, invstd, weight, bias, ctx.act, ctx.alpha, ctx.training
        )
        return _grads(ctx, dx, dw, db, weight)


class InputSavingBNAct(torch.autograd.Function):
    """(z, mean, invstd) = act(BN(x)), saving x and recomputing y in the backward."""

    @staticmethod
    def forward(x, weight, bias, mean, invstd, eps: float, act: str, alpha: float,
                running=None):
        """``running``: as for ``OutputSavingBNAct``."""
        return _forward(x, weight, bias, mean, invstd, eps, act, alpha, running)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, mean_in, _invstd, eps, act, alpha, running = inputs
        _z, mean, invstd = output
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.eps, ctx.act, ctx.alpha, ctx.training = eps, act, alpha, mean_in is None
        ctx.kernels = _kernels(running)
        ctx.mark_non_differentiable(mean, invstd)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, dz, _dmean, _dinvstd):
        if dz is None:  # as OutputSavingBNAct's
            return (None,) * 9
        x, weight, bias, mean, invstd = ctx.saved_tensors
        acc = mean.dtype
        if not torch.is_grad_enabled():
            dx, dw, db = (ctx.kernels or ops).backward_act_input(
                like_layout(dz, x), x, mean, invstd, weight, bias, ctx.act, ctx.alpha,
                ctx.training,
            )
            return _grads(ctx, dx, dw, db, weight)[:9]
        # double backward: differentiable torch, statistics recomputed from x
        if ctx.training:
            var, mean = torch.var_mean(x.to(acc), dim=reduce_dims(x), correction=0)
            invstd = torch.rsqrt(var + ctx.eps)
        y = _affine(x, mean, invstd, weight, bias)
        dy = dz.to(acc) * activations.grad(y, ctx.act, ctx.alpha)
        if ctx.training:
            dx, dw, db = differentiable_backward(dy, x, weight, ctx.eps)
        else:
            k = invstd if weight is None else weight.to(acc) * invstd
            dx = (dy * channel_view(k, x)).to(x.dtype)
            x_hat = (x.to(acc) - channel_view(mean, x)) * channel_view(invstd, x)
            dims = reduce_dims(x)
            dw, db = (dy * x_hat).sum(dims), dy.sum(dims)
        return _grads(ctx, dx, dw, db, weight)[:9]


def _affine(x: Tensor, mean: Tensor, invstd: Tensor, weight, bias) -> Tensor:
    y = (x.to(mean.dtype) - channel_view(mean, x)) * channel_view(invstd, x)
    if weight is not None:
        y = y * channel_view(weight.to(mean.dtype), x)
    if bias is not None:
        y = y + channel_view(bias.to(mean.dtype), x)
    return y
