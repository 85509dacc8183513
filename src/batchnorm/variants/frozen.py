"""Frozen Batch Normalization: statistics and affine parameters fixed, the layer a
per-channel affine map (optionally followed by an activation), and the converters
``freeze`` / ``unfreeze`` that swap it in and out of a model.

Its buffers carry BatchNorm's names (``weight``, ``bias``, ``running_mean``,
``running_var``, ``num_batches_tracked``), so a BatchNorm state_dict loads into it and
its state_dict loads back into a BatchNorm.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..kernels import activations
from ..kernels.torch_backend import acc_dtype, channel_view
from ..core import functional, plan, traced
from ..core.modules import TORCH_CLASSES, Family, _BatchNorm, check_layout, warn_running
from ..core.tree import replace_modules
from ._act_autograd import OutputSavingBNAct, effective_weight
from .act import DEFAULT_ALPHA, _BatchNormAct

_DOC = r"""Batch Normalization with fixed statistics and affine parameters over a {dims}
    input (detectron2's and torchvision's FrozenBatchNorm2d, in 1d/2d/3d):

    .. math::

        y = \mathrm{{act}}(x \cdot s + t), \qquad
        s = \frac{{\gamma}}{{\sqrt{{\mathrm{{running\_var}} + \epsilon}}}}, \quad
        t = \beta - \mathrm{{running\_mean}} \cdot s

    (the folded scale and shift, computed per call from the buffers). It equals an
    eval-mode BatchNorm whatever the module's train flag; nothing is learned or updated
    (``weight`` and ``bias`` are buffers). Gradients flow to the input only. ``act`` is
    ``"identity"`` by default (see ``BatchNormAct2d`` for the others; freezing a
    BatchNormAct keeps its activation). For the other invertible activations only the
    output is kept for the backward; with ``"identity"`` nothing is (the input gradient
    is the output gradient times the scale), so in-place operations on the output work.

    Buffers: ``weight`` (1), ``bias`` (0), ``running_mean`` (0), ``running_var`` (1),
    ``num_batches_tracked`` (0): BatchNorm's names, so state_dicts interchange. Loading
    the state_dict of a BatchNorm without affine parameters keeps weight 1 and bias 0.

    Args:
        num_features: number of channels `C`.
        eps: added to the running variance. Default: 1e-5
        act, alpha: optional activation, as in ``BatchNormAct2d``. Default: ``"identity"``
        device, dtype: factory arguments for the buffers.

    Shape:
        - Input: {shape}.
        - Output: same shape as the input.

    Example::

        >>> import torch, batchnorm
        >>> frozen = batchnorm.{name}.from_batchnorm(batchnorm.{plain}({example_c}))
        >>> y = frozen(torch.randn({example_shape}))
    """


class _FrozenBatchNorm(Family, nn.Module):
    """Shared body of FrozenBatchNorm1d/2d/3d."""

    _doc = _DOC


    def __init__(
        self, num_features: int, eps: float = 1e-5, device=None, dtype=None, *,
        act: str = "identity", alpha: float | None = None,
    ) -> None:
        super().__init__()
        functional.check_options(eps, None, type(self).__name__, training=False)
        alpha = DEFAULT_ALPHA.get(act, 0.0) if alpha is None else float(alpha)
        activations.check(act, alpha)
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.act, self.alpha = num_features, eps, act, alpha
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    @classmethod
    def from_batchnorm(cls, bn: nn.Module) -> _FrozenBatchNorm:
        """A frozen copy of ``bn``'s eval-mode behaviour (ours, a variant or torch.nn's)."""
        return _freeze_one(bn, cls)

    def extra_repr(self) -> str:
        act = f", act={self.act!r}" if self.act != "identity" else ""
        return f"{self.num_features}, eps={self.eps}{act}"

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        for name in ("weight", "bias", "num_batches_tracked"):  # absent from affine-free BN
            if self._buffers.get(name) is None:  # converted from torchvision's: no such buffer
                state_dict.pop(prefix + name, None)
            else:
                state_dict.setdefault(prefix + name, self._buffers[name].clone())
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        warn_running(self, self.running_mean, self.running_var, "loaded", stacklevel=5)

    def check_input(self, input: Tensor) -> None:
        """Raise a clear error for input this layer cannot normalise, and for buffers or
        an eps it cannot use."""
        check_layout(self, input)
        buffers, name = self._buffers, type(self).__name__
        functional.check_vectors(
            input, buffers["weight"], buffers["bias"], buffers["running_mean"],
            buffers["running_var"], name,
        )
        functional.check_options(self.eps, None, name, training=False)  # eval only

    def scale_shift(self) -> tuple[Tensor, Tensor]:
        """The folded per-channel (scale, shift): y = x * scale + shift (before act)."""
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        return scale, self.bias - self.running_mean * scale

    def forward(self, input: Tensor) -> Tensor:
        self.check_input(input)
        warn_running(self, self.running_mean, self.running_var, "normalises with", input, 6)
        if traced.active(input):  # the plan's traced route: eval BN as one ATen op,
            y = plan.evaluate(input, self.running_mean, self.running_var, self.weight,
                              self.bias, self.eps)  # then the activation's op
            return traced.activation(y, self.act, self.alpha)
        acc = acc_dtype(input.dtype)
        mean = self.running_mean.to(acc)
        invstd = torch.rsqrt(self.running_var.to(acc) + self.eps)
        if self.act != "identity" and activations.is_invertible(self.act, self.alpha):
            return OutputSavingBNAct.apply(
                input, self.weight, self.bias, mean, invstd, self.eps, self.act, self.alpha,
                effective_weight(self.weight, 0.0),
            )[0]
        scale, shift = (v.to(acc) for v in self.scale_shift())
        y = input.to(acc) * channel_view(scale, input) + channel_view(shift, input)
        return activations.apply(y, self.act, self.alpha).to(input.dtype)


class FrozenBatchNorm1d(_FrozenBatchNorm, dims="1d", example=("100", "20, 100")): ...
class FrozenBatchNorm2d(_FrozenBatchNorm, dims="2d", example=("16", "8, 16, 32, 32")): ...
class FrozenBatchNorm3d(_FrozenBatchNorm, dims="3d", example=("16", "4, 16, 8, 8, 8")): ...
def _dims_of(m: nn.Module) -> str | None:
    """The row of ``DIMS`` of a BatchNorm-like layer ("1d", "2d", "3d"), or None for
    anything else."""
    if isinstance(m, _BatchNorm):
        return m._dims_key if m._dims_key != "nd" else None
    for dims, cls in TORCH_CLASSES.items():
        if isinstance(m, cls):
            return dims
    return None


def _freeze_one(m: nn.Module, cls: type[_FrozenBatchNorm] | None = None) -> _FrozenBatchNorm:
    dims = _dims_of(m)
    if dims is None or getattr(m, "running_mean", None) is None:
        raise ValueError(
            f"cannot freeze {type(m).__name__}: expected a BatchNorm layer with running "
            "statistics (track_running_stats=True)"
        )
    act = (m.act, m.alpha) if isinstance(m, _BatchNormAct) else ("identity", None)
    ref = m.running_mean
    frozen = (cls or _FrozenBatchNorm.sized(dims))(
        m.num_features, m.eps, device=ref.device, dtype=ref.dtype, act=act[0], alpha=act[1]
    )
    with torch.no_grad():
        if m.weight is not None:
            frozen.weight.copy_(m.weight)
        if m.bias is not None:
            frozen.bias.copy_(m.bias)
        frozen.running_mean.copy_(m.running_mean)
        frozen.running_var.copy_(m.running_var)
        if m.num_batches_tracked is not None:
            frozen.num_batches_tracked.copy_(m.num_batches_tracked)
    return frozen.train(m.training)


def freeze(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm layer of ``model`` that has running statistics (torch.nn's
    BatchNorm1d/2d/3d and subclasses, batchnorm's BatchNorm and every variant) with the
    matching FrozenBatchNorm1d/2d/3d holding copies of its statistics and affine
    parameters (BatchNormAct keeps its activation, and computes with gamma itself, not
    its effective-weight floor). Layers without running statistics are left alone
    (frozen they would have nothing to normalise with).

    The frozen layers hold *copies* as buffers: an optimizer built before ``freeze``
    still holds the old parameters; build it after. Returns the model (the frozen layer
    when ``model`` itself is a BatchNorm)."""
    def swap(m: nn.Module) -> nn.Module | None:
        if _dims_of(m) is None or getattr(m, "running_mean", None) is None:
            return None
        return _freeze_one(m)

    return replace_modules(model, swap)


def unfreeze(model: nn.Module) -> nn.Module:
    """Replace every FrozenBatchNorm1d/2d/3d of ``model`` with a trainable
    ``batchnorm.BatchNorm1d/2d/3d`` (``BatchNormAct1d/2d/3d`` when it has an activation)
    with the same statistics, ``weight`` and ``bias`` as new Parameters, momentum 0.1 and
    the frozen layer's train flag. (A frozen BatchRenorm/Ghost/Masked layer comes back as
    plain BatchNorm: freezing kept only what eval mode uses.)"""
    def swap(m: nn.Module) -> nn.Module | None:
        if not isinstance(m, _FrozenBatchNorm):
            return None
        ref = m.running_mean
        kw = dict(device=ref.device, dtype=ref.dtype)
        if m.act == "identity":
            bn = _BatchNorm.sized(m._dims_key)(m.num_features, m.eps, **kw)
        else:
            bn = _BatchNormAct.sized(m._dims_key)(
                m.num_features, m.eps, act=m.act, alpha=m.alpha, **kw
            )
        bn.load_state_dict(m.state_dict())
        return bn.train(m.training)

    return replace_modules(model, swap)
