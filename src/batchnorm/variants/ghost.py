"""Ghost Batch Normalization (Hoffer et al. 2017): in training, normalise each virtual
sub-batch of a large batch with its own statistics.

Each sub-batch is a slice along N (a view, no copy) normalised by BN's fused training
kernel with its closed-form backward; the outputs are concatenated. The sub-batches'
moments are merged exactly (``batchnorm.stats.merge``, Chan's formula) into the whole
batch's, which update the running statistics once per call.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core import plan, stats
from ..core.modules import EMPTY, RUNNING, UPDATE, _BatchNorm

_DOC = r"""Ghost Batch Normalization over a {dims} input, as described in `Train longer,
    generalize better: closing the generalization gap in large batch training of neural
    networks <https://arxiv.org/abs/1705.08741>`__ (Hoffer, Hubara & Soudry, 2017).

    In training the batch is cut along N into virtual sub-batches of
    ``virtual_batch_size`` samples, ``x = [x_1; x_2; ...; x_G]``, and each is normalised
    with its own statistics (biased variance):

    .. math::

        y_g = \frac{{x_g - \mathrm{{E}}[x_g]}}{{\sqrt{{\mathrm{{Var}}[x_g] + \epsilon}}}} * \gamma + \beta

    A batch that is not a multiple of ``virtual_batch_size`` ends with a smaller
    sub-batch; if that remainder has a single value per channel (which cannot be
    normalised) it joins the sub-batch before it. When ``virtual_batch_size >= N`` this is
    BatchNorm exactly. In evaluation it is BatchNorm with the running statistics.

    Running statistics: the sub-batches' (count, mean, M2) are merged exactly into the
    whole batch's mean and variance (Chan's parallel formula), and the running estimates
    get ONE update per call with them, as BatchNorm would from the same batch (unbiased
    variance, skipped for non-finite batches). Why: the running statistics estimate the
    population statistics used in evaluation, one update per step keeps ``momentum``'s
    meaning independent of the number of sub-batches, and it equals BatchNorm when there
    is one sub-batch. (tf-keras instead averages the sub-batch statistics; the average
    sub-batch variance misses the between-sub-batch spread of the means.) {momentum}

    Args:
        num_features: number of channels `C`.
        eps, momentum, affine, track_running_stats, device, dtype, bias, single_value: as
            in ``batchnorm.BatchNorm2d`` (momentum default 0.1). Without running statistics
            the sub-batches are used in evaluation too.
        virtual_batch_size: samples per virtual sub-batch (>= 1, keyword). Default: 32

    Shape:
        - Input: {shape}, statistics over {reduced} of each sub-batch.
        - Output: same shape as the input.

    Example::

        >>> import torch, batchnorm
        >>> bn = batchnorm.{name}({example_c}, virtual_batch_size=4)
        >>> y = bn(torch.randn({example_shape}))
    """


class _GhostBatchNorm(_BatchNorm):
    """Shared body of GhostBatchNorm1d/2d/3d."""

    _doc = _DOC

    def __init__(self, *args, virtual_batch_size: int = 32, **kwargs) -> None:
        if int(virtual_batch_size) != virtual_batch_size or virtual_batch_size < 1:
            raise ValueError(f"virtual_batch_size must be an integer >= 1, got {virtual_batch_size}")
        super().__init__(*args, **kwargs)
        self.virtual_batch_size = int(virtual_batch_size)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"

    def forward(self, input: Tensor) -> Tensor:
        mode = self.statistics(input)
        if mode == RUNNING:
            return plan.evaluate(
                input, self.running_mean, self.running_var, self.weight, self.bias, self.eps
            )
        chunks = [input] if mode == EMPTY else sub_batches(input, self.virtual_batch_size)
        if len(chunks) == 1:  # one sub-batch is plain BN: its rule, and its very numbers
            return self.normalize_batch(input, self.weight, self.bias, mode)
        outputs, parts = [], []
        for chunk in chunks:
            y, mean, invstd = plan.train(chunk, self.weight, self.bias, self.eps)
            outputs.append(y)
            count = torch.full_like(mean, chunk.numel() // chunk.shape[1])
            parts.append(stats.Moments(count, mean, stats.var_from_invstd(invstd, self.eps) * count))
        if mode == UPDATE:
            total = stats.merge_all(parts)
            stats.update_running(
                self.running_mean, self.running_var, total.mean, total.var,
                input.numel() // input.shape[1], self.momentum, self.num_batches_tracked,
            )
        return torch.cat(outputs, dim=0)


def sub_batches(input: Tensor, virtual_batch_size: int) -> list[Tensor]:
    """Slices of ``input`` along N of ``virtual_batch_size`` samples; the last holds the
    remainder, joined to the one before when it has a single value per channel. Raises
    ValueError when every full sub-batch would have a single value per channel."""
    n = input.shape[0]
    starts = list(range(0, n, virtual_batch_size))
    per_sample = input[0].numel() // max(input.shape[1], 1)
    if n > virtual_batch_size and virtual_batch_size * per_sample <= 1:
        raise ValueError(
            f"virtual_batch_size={virtual_batch_size} gives sub-batches of one value per "
            f"channel for input of shape {tuple(input.shape)}: their variance is 0. Use a "
            "virtual_batch_size of at least 2."
        )
    if len(starts) > 1 and (n - starts[-1]) * per_sample <= 1:
        starts.pop()
    ends = starts[1:] + [n]
    return [input[a:b] for a, b in zip(starts, ends)]


class GhostBatchNorm1d(_GhostBatchNorm, nn.BatchNorm1d, dims="1d", example=("100", "64, 100")): ...
class GhostBatchNorm2d(_GhostBatchNorm, nn.BatchNorm2d, dims="2d", example=("16", "16, 16, 8, 8")): ...
class GhostBatchNorm3d(_GhostBatchNorm, nn.BatchNorm3d, dims="3d", example=("16", "8, 16, 4, 4, 4")): ...
