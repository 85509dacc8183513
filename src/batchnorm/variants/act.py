"""BatchNorm and its activation as one layer, with fused kernels and, for invertible
activations, the activation memory of one tensor instead of three (InPlace-ABN's idea,
on CPU and GPU, for any strictly monotonic activation we ship)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core import plan, stats, traced
from ..core.autograd import eager_apply
from ..kernels import activations
from ..kernels.torch_backend import acc_dtype
from ..core.modules import EMPTY, RUNNING, UPDATE, _BatchNorm
from ._act_autograd import InputSavingBNAct, OutputSavingBNAct, effective_weight

DEFAULT_ALPHA = {"leaky_relu": 0.01, "elu": 1.0}
_OUTPUT_SAVING, _INPUT_SAVING = eager_apply(OutputSavingBNAct), eager_apply(InputSavingBNAct)

_DOC = r"""Batch Normalization followed by an activation, as one layer, over a {dims}
    input:

    .. math::

        z = \mathrm{{act}}\left(\frac{{x - \mathrm{{E}}[x]}}{{\sqrt{{\mathrm{{Var}}[x] + \epsilon}}}}
            * \gamma + \beta\right)

    with ``act`` one of ``"identity"``, ``"relu"``, ``"leaky_relu"`` (negative slope
    ``alpha``, default 0.01), ``"elu"`` (``alpha``, default 1.0), ``"silu"``, ``"gelu"``
    (erf form). Statistics, running estimates and eval behaviour are BatchNorm's (biased
    variance normalises, unbiased is stored, non-finite batches never reach the running
    estimates). {momentum}

    What the backward keeps (``memory_saving=True``, the default):

    - invertible activations (identity, leaky_relu with alpha > 0, elu): only the output
      ``z`` (the tensor the next layer keeps anyway) and per-channel vectors. The backward
      recovers :math:`y = \mathrm{{act}}^{{-1}}(z)` and :math:`\hat x = (y - \beta)/\gamma`
      (InPlace-ABN, `Rota Bulo et al. 2018 <https://arxiv.org/abs/1712.02616>`__). A stack
      conv -> BN -> LeakyReLU keeps three activation tensors per block in torch.nn (conv
      output, BN output, activation output); this layer keeps one
      (``benchmarks/bn_act_memory.py`` measures it).
      Gamma near zero: :math:`\hat x` divides by gamma, so the layer computes with the
      *effective weight* :math:`\gamma_{{eff}} = \mathrm{{sign}}(\gamma)\max(|\gamma|,
      \mathrm{{weight\_eps}})` (sign(0) = +1) in the forward and backward; for
      :math:`|\gamma| \ge` ``weight_eps`` it is :math:`\gamma` itself. The gradient with
      respect to :math:`\gamma_{{eff}}` is passed to :math:`\gamma` unchanged
      (straight-through), so a zero-initialised gamma still learns. Recovered values
      carry a relative error of about :math:`\mathrm{{ulp}}(|y|)/|\gamma_{{eff}}|`.
      Double backward is not available in this mode.
    - relu, silu, gelu (not invertible: relu loses the sign of negative inputs): the
      input ``x`` and per-channel vectors; ``y`` and the activation's derivative are
      recomputed in the backward. Against torch.nn's BN -> act this saves the BN output
      for silu and gelu (which keep their input: 2 tensors instead of 3 per block) and
      nothing for relu (torch.nn's ReLU keeps only its output: 2 tensors both ways).
    - ``memory_saving=False``: the input-saving path for every activation (exact to the
      last bit in x_hat, no effective weight, double backward works).

    Kernels (``auto``, ``batchnorm.kernels``): on CPU the fused numba kernels from
    ``PREFER_MIN_ACT`` (100,000) elements of a channel-major tensor, ATen's kernels below it
    and for channels_last or (N, C) input (``native``: ATen's BN and activation forward,
    the backward above through ATen's kernels), both inside this layer's autograd
    Function, so what the backward keeps is the same at every size; Triton on CUDA. A
    call that needs no backward (``torch.no_grad``, inference, nothing requiring grad)
    keeps nothing: BN's own plan, then the activation in place on its output (as torch.nn's
    BN with an in-place activation), with the same effective weight.

    Args:
        num_features: number of channels `C`.
        eps, momentum, affine, track_running_stats, device, dtype, bias, single_value: as
            in ``batchnorm.BatchNorm2d`` (momentum default 0.1).
        act: the activation (keyword). Default: ``"relu"``
        alpha: leaky_relu's negative slope or elu's alpha; ``None`` for the default.
        memory_saving: keep only the output for invertible activations. Default: ``True``
        weight_eps: floor on ``|gamma|`` in the memory-saving path (> 0). Default: 1e-5

    Shape:
        - Input: {shape}, statistics over {reduced}.
        - Output: same shape as the input.

    Example::

        >>> import torch, batchnorm
        >>> layer = batchnorm.{name}({example_c}, act="leaky_relu")
        >>> z = layer(torch.randn({example_shape}))
    """


class _BatchNormAct(_BatchNorm):
    """Shared body of BatchNormAct1d/2d/3d."""

    _doc = _DOC

    def __init__(
        self, *args, act: str = "relu", alpha: float | None = None,
        memory_saving: bool = True, weight_eps: float = 1e-5, **kwargs,
    ) -> None:
        alpha = DEFAULT_ALPHA.get(act, 0.0) if alpha is None else float(alpha)
        activations.check(act, alpha)
        if not weight_eps > 0:
            raise ValueError(f"weight_eps must be > 0 (the floor on |gamma|), got {weight_eps}")
        super().__init__(*args, **kwargs)
        self.act, self.alpha = act, alpha
        self.memory_saving, self.weight_eps = bool(memory_saving), float(weight_eps)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, act={self.act!r}, alpha={self.alpha}, "
            f"memory_saving={self.memory_saving}"
        )

    def saves_output(self) -> bool:
        """Whether the backward keeps only the output (invertible activation, memory saving)."""
        return self.memory_saving and activations.is_invertible(self.act, self.alpha)

    def effective_weight(self) -> Tensor | None:
        """The weight the layer computes with (see the class docstring), no gradient."""
        return effective_weight(self.weight, self.weight_eps if self.saves_output() else 0.0)

    def forward(self, input: Tensor) -> Tensor:
        mode = self.statistics(input)
        if mode == EMPTY:
            return self.normalize_batch(input, self.weight, self.bias, mode)
        if traced.active(input):
            return self._traced(input, mode)
        weight, bias, running_mean, running_var = self._tensors()
        eager = not plan.tracing(input)  # torch.func transforms: the Functions' own apply
        if eager and not plan.wants_grad(input, weight, bias):
            # No backward, so nothing to keep (the plan's shortcut 2): BN's own plan (on
            # CPU below the crossover ATen's kernels, with torch.nn's running update), then
            # the activation in place on its fresh output, as torch.nn + timm run it
            y = self._normalize(input, mode, self.effective_weight())
            return activations.apply_(y, self.act, self.alpha)
        mean = invstd = running = aside = None
        tracked = self._buffers.get("num_batches_tracked")
        if mode == RUNNING:
            acc = acc_dtype(input.dtype)
            mean = running_mean.to(acc)
            invstd = torch.rsqrt(running_var.to(acc) + self.eps)
        elif mode == UPDATE and eager:
            backend = plan.act_blender(input, running_mean, running_var)
            if backend is not None:  # ATen's kernel blends the batch in; the guard around it
                aside = stats.set_aside(running_mean, running_var, tracked, self._backup())
                factor = stats.blend_factor(self.momentum, tracked, pending=1)
                running = (running_mean, running_var, factor, backend)
        if self.saves_output():  # eagerly the Functions' C entry (as plan.train's)
            z, mean, invstd = (_OUTPUT_SAVING if eager else OutputSavingBNAct.apply)(
                input, weight, bias, mean, invstd, self.eps, self.act, self.alpha,
                effective_weight(weight, self.weight_eps), running,
            )
        else:
            z, mean, invstd = (_INPUT_SAVING if eager else InputSavingBNAct.apply)(
                input, weight, bias, mean, invstd, self.eps, self.act, self.alpha, running
            )
        if mode == UPDATE:
            stats.update_running(
                running_mean, running_var, mean, None, input.numel() // input.shape[1],
                self.momentum, tracked, invstd=invstd, eps=self.eps, aside=aside,
                backup=self._backup() if eager else None,
            )
        return z

    def _normalize(self, input: Tensor, mode: str, weight: Tensor | None) -> Tensor:
        """BN alone through the plan: the running statistics (``RUNNING``) or the batch's."""
        if mode == RUNNING:
            return plan.evaluate(input, self.running_mean, self.running_var, weight, self.bias,
                                 self.eps)
        return self.normalize_batch(input, weight, self.bias, mode)

    def _traced(self, input: Tensor, mode: str) -> Tensor:
        """Under a tracer: BN through the plan's traced route (ATen's BN, the guarded
        update as ``torch.where``), with the effective weight (straight-through) where the
        memory-saving path uses it, then the activation's torch op (exported as ONNX Relu,
        LeakyRelu, Elu, ...)."""
        weight = self.weight
        if self.saves_output():  # the floor on |gamma| of the memory-saving path
            weight = traced.straight_through(weight, self.effective_weight())
        return traced.activation(self._normalize(input, mode, weight), self.act, self.alpha)

    def activation_module(self) -> torch.nn.Module:
        """The torch.nn module of this layer's activation (for export to plain torch)."""
        return activation_module(self.act, self.alpha)


def activation_module(act: str, alpha: float) -> torch.nn.Module:
    """torch.nn's module for ``act`` (gelu in its erf form)."""
    nn = torch.nn
    return {
        "identity": lambda: nn.Identity(),
        "relu": lambda: nn.ReLU(),
        "leaky_relu": lambda: nn.LeakyReLU(alpha),
        "elu": lambda: nn.ELU(alpha),
        "silu": lambda: nn.SiLU(),
        "gelu": lambda: nn.GELU(),
    }[act]()


class BatchNormAct1d(_BatchNormAct, nn.BatchNorm1d, dims="1d", example=("100", "20, 100")): ...
class BatchNormAct2d(_BatchNormAct, nn.BatchNorm2d, dims="2d", example=("16", "8, 16, 32, 32")): ...
class BatchNormAct3d(_BatchNormAct, nn.BatchNorm3d, dims="3d", example=("16", "4, 16, 8, 8, 8")): ...
