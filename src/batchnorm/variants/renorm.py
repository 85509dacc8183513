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

from ..core import plan, stats, traced
from ..core.modules import EMPTY, RECOMPUTE, RUNNING, UPDATE, _BatchNorm

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

    _doc = _DOC

    def __init__(
        self, *args, r_max: float = 3.0, d_max: float = 5.0, warmup_steps: int = 5000,
        **kwargs,
    ) -> None:
        if not r_max >= 1:
            raise ValueError(f"r_max must be >= 1 (r is clipped to [1/r_max, r_max]), got {r_max}")
        if not d_max >= 0:
            raise ValueError(f"d_max must be >= 0 (d is clipped to [-d_max, d_max]), got {d_max}")
        if int(warmup_steps) != warmup_steps or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps}")
        super().__init__(*args, **kwargs)
        if not self.track_running_stats:
            raise ValueError(
                "BatchRenorm needs running statistics (its correction is defined against "
                "them): track_running_stats must be True"
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
        """The (r_max, d_max) in force at the current step (after warm-up: the given ones);
        0-d tensors under tracing (the step count is data)."""
        if self.warmup_steps == 0:
            return self.r_max, self.d_max
        if traced.active(self.num_batches_tracked):
            return traced.warmup_limits(
                self.num_batches_tracked, self.r_max, self.d_max, self.warmup_steps
            )
        t = min(1.0, int(self.num_batches_tracked) / self.warmup_steps)
        return 1.0 + (self.r_max - 1.0) * t, self.d_max * t

    def forward(self, input: Tensor) -> Tensor:
        mode = self.statistics(input)
        if mode == RUNNING:
            return plan.evaluate(
                input, self.running_mean, self.running_var, self.weight, self.bias, self.eps
            )
        if mode == EMPTY:
            return self.normalize_batch(input, self.weight, self.bias, mode)
        with torch.no_grad():
            r, d = self._factors(input, mode)
        weight = r if self.weight is None else self.weight * r.to(self.weight.dtype)
        bias = d if self.weight is None else self.weight * d.to(self.weight.dtype)
        if self.bias is not None:
            bias = self.bias + bias
        # r and d were taken from the running buffers above, before this updates them
        return self.normalize_batch(input, weight, bias, mode)

    def _factors(self, input: Tensor, mode: str) -> tuple[Tensor, Tensor]:
        """(r, d) against the running statistics before this batch's update.

        An activation-checkpoint recomputation runs after the original forward has updated
        the buffers (and the step count that the warm-up reads), so it reuses the factors
        that forward computed, found by the input's storage, shape and strides (the
        checkpoint keeps the input alive until then). The last ``RECENT`` updating
        forwards are kept, so a layer applied to several inputs before one backward
        (shared weights) finds each of its inputs."""
        key = _key(input)
        if key is not None and mode == RECOMPUTE and key in self._recent:
            return self._recent[key]
        batch = stats.moments(input)
        r, d = renorm_factors(
            batch.mean, batch.var, self.running_mean, self.running_var, self.eps,
            *self.limits(),
        )
        if mode == UPDATE and key is not None:
            self._recent[key] = (r, d)
            self._recent.move_to_end(key)
            while len(self._recent) > RECENT:
                self._recent.popitem(last=False)
        return r, d


#: Updating forwards whose factors a Batch Renorm layer keeps for recomputation.
RECENT = 8


def _key(input: Tensor) -> tuple | None:
    """Where and how ``input`` is laid out; None where that cannot be read (tracers, whose
    fake tensors have no data; torch.func wrappers)."""
    if traced.active(input):
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


class BatchRenorm1d(_BatchRenorm, nn.BatchNorm1d, dims="1d", example=("100", "20, 100")): ...
class BatchRenorm2d(_BatchRenorm, nn.BatchNorm2d, dims="2d", example=("16", "8, 16, 32, 32")): ...
class BatchRenorm3d(_BatchRenorm, nn.BatchNorm3d, dims="3d", example=("16", "4, 16, 8, 8, 8")): ...
