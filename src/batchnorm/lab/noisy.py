"""Noisy BN (Santurkar et al. 2018, Sec. 2.1): BatchNorm whose output, in training, gets a
random shift and scale that change at every step, so the distribution of the next
layer's input is deliberately unstable ("internal covariate shift" injected on purpose).

Per unit and step: ``mu ~ U(-mean_range, mean_range)``, ``nu ~ U(1, scale_max)``; per
sample and unit: ``m ~ U(mu - sample_shift, mu + sample_shift)``, ``s ~ N(nu, sample_scale_std)``;
the output is ``s * BN(x) + m``. The noise is a constant for the backward pass. In eval
mode the layer is plain BN. The draws use torch's global generator (seeded by the
training run).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import batchnorm


class NoisyBatchNorm(nn.Module):
    """``batchnorm.BatchNorm1d`` (``batchnorm.BatchNorm2d`` with ``images``: the noise is per
    sample and channel, the same at every pixel) followed, in training, by Santurkar et al.'s
    random shift and scale."""

    def __init__(self, num_features: int, mean_range: float = 0.5, scale_max: float = 1.25,
                 sample_shift: float = 0.1, sample_scale_std: float = 0.1, images: bool = False, **bn_options: object):
        super().__init__()
        if not (mean_range >= 0 and scale_max >= 1 and sample_shift >= 0 and sample_scale_std >= 0):
            raise ValueError(f"expected mean_range >= 0, scale_max >= 1, sample_shift >= 0, sample_scale_std >= 0; got "
                             f"{mean_range}, {scale_max}, {sample_shift}, {sample_scale_std}")
        self.bn = (batchnorm.BatchNorm2d if images else batchnorm.BatchNorm1d)(num_features, **bn_options)
        self.mean_range, self.scale_max = float(mean_range), float(scale_max)
        self.sample_shift, self.sample_scale_std = float(sample_shift), float(sample_scale_std)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(x)
        if not self.training:
            return y
        n, c = y.shape[0], y.shape[1]
        with torch.no_grad():
            mu = (2 * torch.rand(c) - 1) * self.mean_range
            nu = 1 + torch.rand(c) * (self.scale_max - 1)
            shift = mu + (2 * torch.rand(n, c) - 1) * self.sample_shift
            scale = nu + torch.randn(n, c) * self.sample_scale_std
        shape = (n, c) + (1,) * (y.dim() - 2)
        return scale.to(y.dtype).view(shape) * y + shift.to(y.dtype).view(shape)
