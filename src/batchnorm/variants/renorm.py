"""Batch Renormalization (Ioffe 2017): BN whose training output is corrected towards the
running statistics, so training and inference normalise alike even for small or
non-i.i.d. batches.

The correction is a per-channel affine map with constant (no-gradient) factors ``r`` and
``d``, so the layer is plain BN with weight ``gamma * r`` and bias ``beta + gamma * d``:
it reuses BN's fused training kernel and closed-form backward, and autograd of those two
products gives the parameter gradients.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from .. import stats
from ..functional import eval_normalize
from ..modules import _BatchNorm
from ._common import fill_doc, statistics_mode

_DOC = r"""Batch Renormalization over a {dims} input, as described in `Batch
    Renormalization: Towards Reducing Minibatch Dependence in Batch-Normalized Models
    <https://arxiv.org/abs/1702.03275>`__ (Ioffe, 2017).

    In training, with the batch statistics :math:`\mu_B, \sigma_B = \sqrt{{\mathrm{{Var}}_B[x] +
    \epsilon}}` (biased variance) and the running ones :math:`\mu, \sigma =
    \sqrt{{\mathrm{{running\_var}} + \epsilon}}` *before* this batch's update:

    .. math::

        r = \mathrm{{clip}}\left(\frac{{\sigma_B}}{{\sigma}}, \frac{{1}}{{r_{{max}}}}, r_{{max}}\right), \quad
        d = \mathrm{{clip}}\left(\frac{{\mu_B - \mu}}{{\sigma}}, -d_{{max}}, d_{{max}}\right)

        y = \gamma \left(\frac{{x - \mu_B}}{{\sigma_B}} \, r + d\right) + \beta

    ``r`` and ``d`` are constants for the backward pass (no gradient flows through them).
    With ``r_max=1, d_max=0`` this is BatchNorm exactly. In evaluation it is BatchNorm
    with the running statistics.

    Warm-up: the limits relax linearly from ``(1, 0)`` (plain BN) to ``(r_max, d_max)``
    over the first ``warmup_steps`` training steps, counted by ``num_batches_tracked``
    (step t uses ``r_max_t = 1 + (r_max - 1) * min(1, t / warmup_steps)`` and
    ``d_max_t = d_max * min(1, t / warmup_steps)``). The paper holds BN for 5k steps and
    relaxes over 25k-40k steps on ImageNet; pass a value that fits your run.

    Running statistics are updated exactly as in BatchNorm (mean and *unbiased*
    variance, skipped for non-finite batches). {momentum}

    Activation checkpointing (``torch.utils.checkpoint``) gives the gradients of the
    unchecked layer: the recomputed forward reuses the ``r`` and ``d`` of the original
    one (the buffers have been updated in between), for up to 8 inputs per backward.

    Args:
        num_features: number of channels `C`.
        eps: added to the variances. Default: 1e-5
        momentum: weight of the new batch in the running estimates. Default: 0.1 (as
            BatchNorm; Keras' renorm default decay 0.99 is momentum 0.01)
        affine: learnable ``weight`` and ``bias``. Default: ``True``
        track_running_stats: must be ``True`` (kept for BatchNorm's signature): the
            correction is defined against the running statistics.
        r_max: final upper limit of ``r`` (>= 1). Default: 3.0
        d_max: final limit of ``|d|`` (>= 0). Default: 5.0
        warmup_steps: steps over which the limits relax from (1, 0). ``0`` applies
            ``(r_max, d_max)`` from the first step. Default: 5000
        device, dtype, bias, single_value: as in ``batchnorm.BatchNorm2d``.

    Shape:
        - Input: {shape}, statistics over {reduced}.
        - Output: same shape as the input.

    Example::

        >>> import torch, batchnorm
        >>> bn = batchnorm.{name}({example_c}, r_max=3.0, d_max=5.0, warmup_steps=1000)
        >>> y = bn(torch.randn({example_shape}))
    """


class _BatchRenorm(_BatchNorm):
    """Shared body of BatchRenorm1d/2d/3d."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 5000,
        bias: bool = True,
        single_value: str = "error",
    ) -> None:
        if not r_max >= 1:
            raise ValueError(f"r_max must be >= 1 (r is clipped to [1/r_max, r_max]), got {r_max}")
        if not d_max >= 0:
            raise ValueError(f"d_max must be >= 0 (d is clipped to [-d_max, d_max]), got {d_max}")
        if not track_running_stats:
            raise ValueError(
                "BatchRenorm needs running statistics (its correction is defined against "
                "them): track_running_stats must be True"
            )
        if int(warmup_steps) != warmup_steps or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps}")
        super().__init__(
            num_features, eps, momentum, affine, True, device, dtype,
            bias=bias, single_value=single_value,
        )
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.warmup_steps = int(warmup_steps)
        # (r, d) of the last few updating forwards, for activation-checkpoint recomputation
        self._recent: OrderedDict[tuple, tuple[Tensor, Tensor]] = OrderedDict()

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, "
            f"warmup_steps={self.warmup_steps}"
        )

    def limits(self) -> tuple[float, float]:
        """The (r_max, d_max) in force at the current step (after warm-up: the given ones)."""
        if self.warmup_steps == 0:
            return self.r_max, self.d_max
        t = min(1.0, int(self.num_batches_tracked) / self.warmup_steps)
        return 1.0 + (self.r_max - 1.0) * t, self.d_max * t

    def forward(self, input: Tensor) -> Tensor:
        mode = statistics_mode(self, input)
        if mode == "running":
            return eval_normalize(
                input, self.running_mean, self.running_var, self.weight, self.bias, self.eps
            )
        with torch.no_grad():
            r, d = self._factors(input, mode == "batch_update")
        weight = r if self.weight is None else self.weight * r.to(self.weight.dtype)
        bias = d if self.weight is None else self.weight * d.to(self.weight.dtype)
        if self.bias is not None:
            bias = self.bias + bias
        # r and d were taken from the running buffers above, before this updates them
        return self.normalise_batch(
            input, weight, bias, input.numel() // input.shape[1], mode == "batch_update"
        )

    def _factors(self, input: Tensor, update: bool) -> tuple[Tensor, Tensor]:
        """(r, d) against the running statistics before this batch's update.

        An activation-checkpoint recomputation runs after the original forward has updated
        the buffers (and the step count that the warm-up reads), so it reuses the factors
        that forward computed, found by the input's storage, shape and strides (the
        checkpoint keeps the input alive until then). The last ``RECENT`` updating
        forwards are kept, so a layer applied to several inputs before one backward
        (shared weights) finds each of its inputs."""
        key = _key(input)
        if key is not None and self._recomputing() and key in self._recent:
            return self._recent[key]
        batch = stats.moments(input)
        r, d = renorm_factors(
            batch.mean, batch.var, self.running_mean, self.running_var, self.eps,
            *self.limits(),
        )
        if update and key is not None:
            self._recent[key] = (r, d)
            self._recent.move_to_end(key)
            while len(self._recent) > RECENT:
                self._recent.popitem(last=False)
        return r, d


#: Updating forwards whose factors a Batch Renorm layer keeps for recomputation.
RECENT = 8


def _key(input: Tensor) -> tuple | None:
    """Where and how ``input`` is laid out; None where that cannot be read (torch.compile
    traces, torch.func wrappers)."""
    if torch.compiler.is_compiling():
        return None
    try:
        return input.data_ptr(), tuple(input.shape), input.stride(), input.dtype
    except RuntimeError:  # no storage: a torch.func wrapper
        return None


def renorm_factors(
    mean_b: Tensor, var_b: Tensor, running_mean: Tensor, running_var: Tensor,
    eps: float, r_max: float, d_max: float,
) -> tuple[Tensor, Tensor]:
    """Batch Renorm's correction, per channel, in the statistics' dtype:
    ``r = clip(sigma_B / sigma, 1/r_max, r_max)``, ``d = clip((mu_B - mu) / sigma, -d_max, d_max)``
    with ``sigma_B = sqrt(var_b + eps)`` and ``sigma = sqrt(running_var + eps)``."""
    acc = mean_b.dtype
    sigma = torch.sqrt(running_var.to(acc) + eps)
    r = (torch.sqrt(var_b + eps) / sigma).clamp(1.0 / r_max, r_max)
    d = ((mean_b - running_mean.to(acc)) / sigma).clamp(-d_max, d_max)
    return r, d


def _doc(name: str, dims: tuple[int, ...], c: str, shape: str) -> str:
    return fill_doc(_DOC, name, dims, c, shape)


class BatchRenorm1d(_BatchRenorm, nn.BatchNorm1d):
    _expected_dims = (2, 3)
    _shape_text = "(N, C) or (N, C, L)"
    __doc__ = _doc("BatchRenorm1d", _expected_dims, "100", "20, 100")


class BatchRenorm2d(_BatchRenorm, nn.BatchNorm2d):
    _expected_dims = (4,)
    _shape_text = "(N, C, H, W)"
    __doc__ = _doc("BatchRenorm2d", _expected_dims, "16", "8, 16, 32, 32")


class BatchRenorm3d(_BatchRenorm, nn.BatchNorm3d):
    _expected_dims = (5,)
    _shape_text = "(N, C, D, H, W)"
    __doc__ = _doc("BatchRenorm3d", _expected_dims, "16", "4, 16, 8, 8, 8")
