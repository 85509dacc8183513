"""The one decision of a BN call: which kernels run it, and what they do themselves.

``train_plan`` / ``eval_plan`` look once per call at what decides the route (device,
dtype, layout and size through ``kernels.pick``; grad mode; torch.compile, torch.export,
fake tensors and torch.func transforms) and return a ``Plan``; ``train`` and
``evaluate`` carry it out. Every module, variant and functional form normalises through
these two functions. Routes:

- ``"cpu"``: the fused numba kernels (``kernels.cpu_backend``);
- ``"native"``: PyTorch's ATen kernels (``kernels.native_backend``), recorded by ATen's
  autograd and blending the running buffers inside the kernel, as for torch.nn;
- ``"triton"``: the Triton kernels on CUDA;
- ``"torch"``: the pure-torch backend (half types, odd layouts, forced);
- ``"traced"``: torch.compile / torch.export / dispatch modes (``traced.active``): BN as
  standard decomposable ATen ops (``batchnorm.core.traced``: ATen's BN, the guard as
  ``torch.where``), which Inductor fuses and exporters know; under torch.func transforms
  (vmap, grad) the autograd Functions over the ``batchnorm::`` custom ops of
  ``batchnorm.ops`` instead (their vmap rules reshape the tensors first).

The four shortcuts that keep a call cheap live here, each in one place (see "Shortcut").
"""

from __future__ import annotations

from types import ModuleType
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .. import kernels
from . import ops, stats, traced
from .autograd import BatchNormEval, BatchNormTrain, eval_apply, train_apply
from ..kernels.torch_backend import acc_dtype

_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_transforms_active = torch._C._are_functorch_transforms_active


class Plan(NamedTuple):
    route: str  # "cpu", "native", "triton", "torch" or "traced"
    kernels: ModuleType | None  # the backend whose kernels run; ``traced`` (ATen ops under
    # a tracer); None: ``ops`` (torch.func transforms)
    function: Callable | None  # the autograd Function's apply; None: call the kernels
    blends_running: bool  # the kernel blends the batch into the running buffers itself


_plans: dict[tuple, Plan] = {}
#: The torch.func plans, constants (a transform sees no dictionary lookup).
_TRACED_TRAIN_FUNCTION = Plan("traced", None, BatchNormTrain.apply, False)
_TRACED_EVAL_FUNCTION = Plan("traced", None, BatchNormEval.apply, False)


def _plan(kernels: ModuleType, function: Callable | None, blends: bool) -> Plan:
    """The Plan of these choices, made once (a plan is decided on every call)."""
    key = (kernels, function, blends)
    plan = _plans.get(key)
    if plan is None:
        plan = _plans[key] = Plan(kernels.name, kernels, function, blends)
    return plan


def tracing(x: Tensor) -> bool:
    """Whether a tracer or transform sees this call (route ``"traced"``)."""
    return traced.active(x) or _transforms_active()


#: The traced route under a tracer (``traced.active`` without a torch.func transform):
#: ATen's ops, recorded by ATen's autograd, the running update inside ``traced.train``.
TRACED = Plan("traced", traced, None, False)


def wants_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd must see the call: grad mode on and a tensor requires grad. (A
    plain loop: this runs on every call, where a generator expression costs more.)"""
    if torch.is_grad_enabled():
        for t in tensors:
            if t is not None and t.requires_grad:
                return True
    return False


def transformed(*tensors: Tensor | None) -> bool:
    """Whether a torch.func transform wraps one of the tensors."""
    for t in tensors:
        if t is not None and _is_wrapped(t):
            return True
    return False


def train_plan(
    x: Tensor, weight: Tensor | None, bias: Tensor | None,
    running_mean: Tensor | None = None, running_var: Tensor | None = None,
) -> Plan:
    """The plan of a training forward (``running_*``: buffers to update, if any)."""
    if tracing(x):
        if not _transforms_active():
            return TRACED
        # torch.func: the Function (its vmap rule) over the custom ops
        return _TRACED_TRAIN_FUNCTION
    backend = kernels.pick("forward_train", x)
    if backend.records_autograd:
        # Shortcut 1: ATen's autograd records ATen's kernel, as for torch.nn: the same
        # closed form, with the derivative bookkeeping in C++. Saves our Python Function's
        # per-step cost, more than a small BN itself (benchmarks/README.md).
        blends = (
            running_mean is not None and backend.blends_running
            and backend.accepts_running(x, running_mean, running_var)
        )
        return _plan(backend, None, blends)
    # Shortcut 2: no gradient wanted: the kernels directly, saving the Function's cost.
    return _plan(backend, train_apply if wants_grad(x, weight, bias) else None, False)


_ACT_BLEND_OPS = frozenset(("forward_train_act_update", "backward_act", "backward_act_input"))


def act_blender(x: Tensor, running_mean: Tensor, running_var: Tensor) -> ModuleType | None:
    """For a BN + activation training forward (``BatchNormAct``) that updates these
    running buffers: the backend that runs it (``kernels.pick``'s choice) when its kernel
    can blend the batch into them itself (ATen's, below the fused kernels' crossover:
    shortcut 3, as for plain BN, with the same guard around it; the backward then runs on
    it too), else None (the layer then calls ``stats.update_running``)."""
    backend = kernels.pick("forward_train_act", x)
    if (
        backend.blends_running and _ACT_BLEND_OPS <= backend.OPS
        and backend.accepts_running(x, running_mean, running_var)
    ):
        return backend
    return None


def train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
    running_mean: Tensor | None = None, running_var: Tensor | None = None,
    momentum: float | None = 0.1, num_batches_tracked: Tensor | None = None, backup=None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, invstd): ``x`` normalised with its batch statistics, differentiable in x,
    weight and bias; with ``running_mean``/``running_var``, the batch folded into them by
    the guarded update of ``stats.update_running`` (``backup``: the layer's
    ``kernels.cpu_backup.RunningBackup``)."""
    plan = train_plan(x, weight, bias, running_mean, running_var)
    if plan is TRACED:
        # ATen's BN (the tracer sees through it); the guarded update as ``torch.where``
        if running_mean is not None:
            return traced.train(x, weight, bias, running_mean, running_var,
                                num_batches_tracked, momentum, eps)
        return traced.batch(x, weight, bias, eps)
    if plan.blends_running:
        # Shortcut 3: ATen blends the batch into the buffers inside its kernel (torch.nn's
        # running statistics bit for bit); the guard sets the buffers aside first, in the
        # layer's RunningBackup (numpy views made once, a compiled copy and check), which
        # saves a torch copy and check per step (benchmarks/README.md).
        aside = stats.set_aside(running_mean, running_var, num_batches_tracked, backup)
        factor = stats.blend_factor(momentum, num_batches_tracked, pending=1)
        y, mean, invstd = plan.kernels.forward_train_update(
            x, weight, bias, eps, running_mean, running_var, factor
        )
    else:
        # Shortcut 4: the numba kernels fold the batch into the buffers right after their
        # kernel, through the views the layer's RunningBackup keeps (``takes_backup``;
        # guarded: nothing written for a non-finite batch), instead of a second trip
        # through ``stats`` and its checks (benchmarks/README.md); the verdict then comes
        # to ``stats.update_running`` as ``aside``'s.
        running = None
        if (
            backup is not None and running_mean is not None and plan.kernels is not None
            and plan.kernels.takes_backup
            and backup.prepare(running_mean, running_var, num_batches_tracked, momentum)
        ):
            running = backup
        if plan.function is not None:
            y, mean, invstd = plan.function(x, weight, bias, eps, plan.kernels, running)
        elif running is not None:
            y, mean, invstd = plan.kernels.forward_train(x, weight, bias, eps, running)
        else:
            y, mean, invstd = (plan.kernels or ops).forward_train(x, weight, bias, eps)
        aside = running if running is not None and running.blended() else None
    if running_mean is not None:
        stats.update_running(
            running_mean, running_var, mean, None, x.numel() // x.shape[1], momentum,
            num_batches_tracked, invstd=invstd, eps=eps, aside=aside,
        )
    return y, mean, invstd


def eval_plan(
    x: Tensor, running_mean: Tensor, running_var: Tensor,
    weight: Tensor | None, bias: Tensor | None,
) -> Plan:
    """The plan of a forward with fixed statistics. ATen's own eval kernel (``native``:
    torch.nn's numbers, one pass, traceable) takes the running variance as it is where no
    gradient is needed, or where ATen's autograd may record it (eager, no torch.func
    transform, statistics that do not require grad); otherwise the ``normalize`` kernels
    run on ``invstd``, through ``BatchNormEval`` where autograd needs it. Under a tracer:
    ``TRACED`` (ATen's eval BN, a core ATen op)."""
    if traced.active(x) and not _transforms_active():
        return TRACED
    grad = wants_grad(x, running_mean, running_var, weight, bias)
    if not torch.compiler.is_compiling():
        backend = kernels.pick("forward_eval", x)
        if (
            "forward_eval" in backend.OPS
            and not transformed(x, running_mean, running_var, weight, bias)
            and (not grad or (
                backend.records_autograd
                and not running_mean.requires_grad and not running_var.requires_grad
            ))
        ):
            return _plan(backend, None, False)
    if tracing(x):  # torch.func: the Function (its vmap rule) over the custom ops
        return _TRACED_EVAL_FUNCTION
    backend = kernels.pick("normalize", x)
    return _plan(backend, eval_apply if grad else None, False)


def evaluate(
    x: Tensor, running_mean: Tensor, running_var: Tensor,
    weight: Tensor | None, bias: Tensor | None, eps: float,
) -> Tensor:
    """``x`` normalised with fixed statistics (the running ones, in eval)."""
    plan = eval_plan(x, running_mean, running_var, weight, bias)
    if plan is TRACED:
        return traced.eval(x, running_mean, running_var, weight, bias, eps)
    if plan.route == "native":
        return plan.kernels.forward_eval(x, running_mean, running_var, weight, bias, eps)
    acc = acc_dtype(x.dtype)
    mean, invstd = running_mean.to(acc), torch.rsqrt(running_var.to(acc) + eps)
    if plan.function is not None:
        return plan.function(x, mean, invstd, weight, bias, plan.kernels)
    return (plan.kernels or ops).normalize(x, mean, invstd, weight, bias)
