"""PyTorch's own ATen batch-norm kernels behind our kernel contract.

Where ATen is already the fastest (BN1d (N, C) near memory bandwidth, channels_last,
small tensors where call overhead dominates), ``auto`` dispatch uses it instead of
re-implementing it. ATen normalises with the biased variance and returns (mean, invstd)
like our contract, computes its statistics stably (Welford), and its backward is the same
closed form. On the CPU only float32/float64 tensors are taken; half types go to the
pure-torch backend, which accumulates them in float32.

BN + activation (``*_act``, CPU): ATen's BN kernel, then ATen's activation kernel in place
on its fresh output (what torch.nn's BN followed by timm's in-place activation runs), and
the backward from the output z through ATen's kernels (see ``backward_act``). They run
inside the layer's autograd Function (``variants._act_autograd``), so the memory-saving
backward holds below the fused kernels' crossover too, at a few ATen calls per layer
instead of the pure-torch backend's dozen elementwise passes.

On CUDA, plain BN (training forward, eval, backward) of every float dtype runs here too,
by the function torch.nn's own call reaches (``torch._batch_norm_impl_index``: cuDNN or
ATen's CUDA kernels, as ATen picks for torch.nn): torch.nn's speed and numbers. Measured
on an H200 (benchmarks/gpu/, issue 19), cuDNN's training forward + backward beat the
Triton kernels at 83 of 96 ResNet-50 layer shapes (float32), and an eager ResNet-50 step
on the Triton kernels took 3x torch.nn's, host-bound by the launches. The running update
is then ours (``stats.update_on_device``), outside cuDNN's kernel: its autograd node keeps
the running buffers, which the guard may have to write. BN + activation stays on the
Triton kernels (the memory-saving backward).

Per-channel vectors (weight, bias, running statistics) go to ATen in the accumulation
dtype of x (``torch_backend.acc_dtype``): x's own for float32/float64, float32 for
float16/bfloat16 input, as torch.nn's float32 parameters do under autocast (cuDNN takes
half input only with float32 vectors). The third H200 run of 2026-12-04 cast them to x's
half type instead and found weight gradients 0.5-16% off the float64 reference; torch.nn's
own call (float32 vectors) is within 0.4% (run 4's env probe: 0 for float16 and for
channels-last bfloat16, 0.004 for NCHW bfloat16, relative to the largest gradient).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import activations, torch_backend
from .torch_backend import acc_dtype, vectors_as
from .interface import ALL, Grads, Mask, Vector

name = "native"
OPS = frozenset((
    "forward_train", "forward_train_update", "forward_eval", "backward", "forward_train_act",
    "forward_train_act_update", "forward_eval_act", "backward_act", "backward_act_input",
))
#: Its training forward, called on tensors that require grad, is recorded by ATen's
#: autograd (``batchnorm.plan`` decides when): the derivative then runs in C++.
records_autograd = True
blends_running = True
takes_backup = False
_DTYPES = (torch.float32, torch.float64)
#: On CUDA the half types too (the vectors in float32, see above).
_CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def supports(x: Tensor) -> bool:
    if x.is_cuda:
        return x.dtype in _CUDA_DTYPES and x.numel() > 0
    return x.is_cpu and x.dtype in _DTYPES and x.numel() > 0


#: What ``auto`` gives this backend on CUDA: plain BN, every float dtype (BN + activation:
#: Triton).
_CUDA_OPS = frozenset(("forward_train", "forward_eval", "backward"))


def prefers(op: str, x: Tensor) -> bool:
    """In ``auto`` mode, take every CPU call the fused CPU kernels do not prefer (below
    ``cpu.backend.PREFER_MIN`` or ``PREFER_MIN_ACT``, channels_last, (N, C) input), and
    on CUDA plain BN."""
    return (op in _CUDA_OPS if x.is_cuda else op in OPS) and supports(x)


def accepts_running(x: Tensor, running_mean: Tensor, running_var: Tensor) -> bool:
    """Whether ``forward_train_update`` can take these buffers: CPU ones of x's dtype, not
    inference tensors (ATen writes them in place)."""
    return (
        not x.is_cuda  # cuDNN's autograd saves the buffers: the guard could not write them
        and running_mean.dtype == x.dtype and running_var.dtype == x.dtype
        and not running_mean.is_inference() and not running_var.is_inference()
    )


def forward_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """ATen training forward: (y, mean, invstd).

    Called on tensors that require grad (``batchnorm.plan`` does so in eager mode, no
    torch.func transform active), ATen's autograd records it: its derivative (double
    backward included) runs in C++, as for ``torch.nn``."""
    weight, bias = vectors_as(acc_dtype(x.dtype), weight, bias)
    if x.is_cuda:
        return _cuda_train(x, weight, bias, eps)
    return torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)


def _cuda_train(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
    """torch.nn's CUDA training call (``torch.batch_norm`` reaches it): cuDNN or ATen's
    kernels, recorded by autograd; (y, mean, invstd) (cuDNN saves the inverse std too)."""
    y, mean, invstd, _, _ = torch._batch_norm_impl_index(
        x, weight, bias, None, None, True, 0.0, eps, torch.backends.cudnn.enabled,
    )
    return y, mean, invstd


def forward_train_update(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
    running_mean: Tensor, running_var: Tensor, factor: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """``forward_train`` that also blends the batch into the running buffers in place,
    inside ATen's kernel as for ``torch.nn`` (``running += factor * (stat - running)``
    with the unbiased variance, in ATen's accumulation type): torch.nn's running
    statistics bit for bit. No guard: ``batchnorm.stats.update_running`` puts the buffers
    back for a non-finite batch."""
    weight, bias = vectors_as(acc_dtype(x.dtype), weight, bias)
    return torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, factor, eps)


def forward_eval(
    x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None,
    bias: Tensor | None, eps: float,
) -> Tensor:
    """ATen eval forward with the running variance (torch.nn's own eval kernel, one pass).
    Only this backend takes the variance; others get ``invstd`` through ``normalize``.
    Vectors in another dtype than x's accumulation dtype are brought to it (ATen wants
    them alike; half input on CUDA: float32, as torch.nn's)."""
    weight, bias, running_mean, running_var = vectors_as(
        acc_dtype(x.dtype), weight, bias, running_mean, running_var
    )
    return torch.batch_norm(x, weight, bias, running_mean, running_var, False, 0.0, eps, False)


def backward(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Vector,
             output_mask: Mask = ALL) -> Grads:
    """ATen training backward: (dx, dweight, dbias); eps is unused by ATen in training."""
    (weight,) = vectors_as(acc_dtype(x.dtype), weight)
    return torch.ops.aten.native_batch_norm_backward(
        dy, x, weight, None, None, mean, invstd, True, 0.0, list(output_mask)
    )


def forward_train_act(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, act: str, alpha: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Training forward of BN + activation: ATen's BN, then the activation in place on
    its fresh output. (z, mean, invstd). Not recorded by autograd (the layer's Function
    calls it)."""
    y, mean, invstd = forward_train(x, weight, bias, eps)
    return activations.apply_(y, act, alpha), mean, invstd


def forward_train_act_update(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, act: str, alpha: float,
    running_mean: Tensor, running_var: Tensor, factor: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """``forward_train_act`` with ATen's blend of the batch into the running buffers
    (``forward_train_update``: torch.nn's running statistics bit for bit, unguarded)."""
    y, mean, invstd = forward_train_update(x, weight, bias, eps, running_mean, running_var, factor)
    return activations.apply_(y, act, alpha), mean, invstd


def forward_eval_act(
    x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None,
    act: str, alpha: float,
) -> Tensor:
    """Eval forward of BN (given statistics: one ``addcmul`` pass) + activation in place."""
    return activations.apply_(torch_backend.normalize(x, mean, invstd, weight, bias), act, alpha)


def backward_act(
    dz: Tensor, z: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
    bias: Tensor | None, act: str, alpha: float, training: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of BN + invertible activation from its output z alone: ATen's activation
    backward and inverse, then ATen's BN backward in x_hat = (y - bias) / weight
    (``torch_backend.backward_act_by_bn``; fixed statistics: the pure-torch one)."""
    return torch_backend.backward_act_by_bn(
        backward, torch_backend.backward_eval, dz, z, mean, invstd, weight, bias, act, alpha,
        training,
    )


def backward_act_input(
    dz: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
    bias: Tensor | None, act: str, alpha: float, training: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of BN + activation from its input x: y recomputed (one ``addcmul`` pass),
    ``dy = dz * act'(y)`` by ATen's activation backward, then ATen's BN backward
    (``training``) or the fixed-statistics one. Returns (dx, dweight, dbias)."""
    return torch_backend.backward_act_input_by_bn(
        backward, torch_backend.backward_eval, dz, x, mean, invstd, weight, bias, act, alpha,
        training,
    )
