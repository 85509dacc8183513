"""``MaskedBatchNorm1d/2d/3d``: batch normalization whose statistics skip padded
positions or weight samples. The statistics (weighted moments, Kish's effective count) and
their closed-form backward are in ``batchnorm.masking``; ``masked_batch_norm`` is the
functional form (``batchnorm.functional``).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..core import plan, traced
from ..core.functional import masked_batch_norm, masked_train  # noqa: F401
from ..core.masking import (  # noqa: F401  (the masked statistics, importable from here)
    MaskedBatchNormTrain, effective_count, mask_weights, masked_moments, selected_count,
    weighted_backward,
)
from ..core.modules import EMPTY, RUNNING, UPDATE, _BatchNorm

_DOC = r"""Batch Normalization over a {dims} input whose statistics skip padded positions
    or weight samples: ``forward(input, mask=None)``.

    With ``mask=None`` it is ``batchnorm.{plain}``. With a mask, in training, per channel,
    with weights :math:`w \ge 0` (a bool mask is 0/1) and :math:`W = \sum w`:

    .. math::

        \mu = \frac{{1}}{{W}}\sum w\,x, \qquad \sigma^2 = \frac{{1}}{{W}}\sum w\,(x - \mu)^2,
        \qquad y = \frac{{x - \mu}}{{\sqrt{{\sigma^2 + \epsilon}}}} * \gamma + \beta

    over N and the spatial axes. A bool mask gives exactly the statistics of the selected
    elements; every position is normalised with them (outputs at padded positions exist
    and are usually ignored). The running variance stores
    :math:`\sigma^2 \, n_{{eff}} / (n_{{eff}} - 1)` with Kish's effective count
    :math:`n_{{eff}} = W^2 / \sum w^2` (the number of selected elements for a bool mask;
    unchanged by rescaling the weights). {momentum} In evaluation the running statistics
    are used and the mask is only checked.

    Backward: an explicit closed form
    :math:`dx = \gamma\sigma^{{-1}}\,(dy - \tfrac{{w}}{{W}}(\sum dy + \hat x \sum dy\,\hat x))`
    (``batchnorm.variants.masked``); no gradient flows to the mask.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype, bias,
            single_value: as in ``batchnorm.BatchNorm2d`` (momentum default 0.1).

    Shape:
        - Input: {shape}, statistics over {reduced}.
        - mask: ``(N,)`` (per sample) or the input's shape without the channel axis
          (e.g. ``(N, L)`` for ``(N, C, L)``), axes of size 1 broadcast; bool (True = use)
          or floating-point weights (finite, >= 0).
        - Output: same shape as the input.

    Example::

        >>> import torch, batchnorm
        >>> bn = batchnorm.{name}({example_c})
        >>> x = torch.randn({example_shape})
        >>> y = bn(x, mask={example_mask})
    """


class _MaskedBatchNorm(_BatchNorm):
    """Shared body of MaskedBatchNorm1d/2d/3d."""

    _doc = _DOC

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is None:
            return super().forward(input)
        self.check_input(input)
        w = mask_weights(input, mask)
        if traced.active(input):  # the count is data: masked_train checks it when it runs
            count = size = None
        else:
            count = selected_count(input, w)
            size = (f"a mask that selects {count} value(s) per channel of input size "
                    f"{list(input.shape)}")
        mode = self.statistics(input, count, size)
        if mode == EMPTY:
            return self.normalize_batch(input, self.weight, self.bias, mode)
        if mode == RUNNING:
            return plan.evaluate(
                input, self.running_mean, self.running_var, self.weight, self.bias, self.eps
            )
        if mode != UPDATE:
            return masked_train(input, w, self.weight, self.bias, self.eps)
        return masked_train(input, w, self.weight, self.bias, self.eps, self.running_mean,
                            self.running_var, self.momentum, self.num_batches_tracked)


class MaskedBatchNorm1d(_MaskedBatchNorm, nn.BatchNorm1d, dims="1d", example=(
    "8", "4, 8, 10", "torch.arange(10) < torch.tensor([[10], [7], [3], [9]])",
)): ...
class MaskedBatchNorm2d(_MaskedBatchNorm, nn.BatchNorm2d, dims="2d", example=("16", "8, 16, 5, 5", "torch.rand(8)")): ...
class MaskedBatchNorm3d(_MaskedBatchNorm, nn.BatchNorm3d, dims="3d", example=(
    "4", "2, 4, 3, 3, 3", "torch.tensor([True, False])",
)): ...
