"""Batch normalization modules, drop-in for ``torch.nn.BatchNorm1d/2d/3d``.

Same constructor arguments and defaults, the same parameters and buffers (so the same
``state_dict``), the same train/eval semantics and the same numbers, plus: state that bad
input never touches, a policy for a batch of one, running statistics that non-finite
batches never reach, and fused kernels with an explicit closed-form backward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import kernels
from .autograd import train_forward, train_forward_updating
from .functional import eval_normalize

SINGLE_VALUE_POLICIES = ("error", "use_running", "skip_update")


def in_backward() -> bool:
    """Whether the autograd engine is running a backward pass in this thread now (False
    while torch.compile traces: compiled graphs handle their own recomputation)."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def check_layout(layer: nn.Module, input: Tensor) -> None:
    """The rank, channel-count and dtype checks of every BN-like layer: ``layer`` has
    ``_expected_dims``, ``_shape_text`` and ``num_features``. (Runs on every call: the
    messages are built only when raised.)"""
    if input.dim() not in layer._expected_dims:
        raise ValueError(
            f"{type(layer).__name__} expects {layer._shape_text} input, got a "
            f"{input.dim()}-D tensor of shape {tuple(input.shape)}"
        )
    if input.shape[1] != layer.num_features:
        raise ValueError(
            f"{type(layer).__name__}({layer.num_features}) expects {layer.num_features} "
            f"channels on dim 1, got input of shape {tuple(input.shape)} with "
            f"{input.shape[1]}"
        )
    if not input.is_floating_point():
        raise TypeError(
            f"{type(layer).__name__} expects a floating-point input (float16, bfloat16, "
            f"float32 or float64), got {input.dtype}. Convert it first, e.g. x.float()."
        )


_DOC = r"""Applies Batch Normalization over a {dims} input, as described in `Batch
    Normalization: Accelerating Deep Network Training by Reducing Internal Covariate
    Shift <https://arxiv.org/abs/1502.03167>`__ (Ioffe & Szegedy, 2015).

    .. math::

        y = \frac{{x - \mathrm{{E}}[x]}}{{\sqrt{{\mathrm{{Var}}[x] + \epsilon}}}} * \gamma + \beta

    The mean and standard deviation are computed per channel over the mini-batch
    ({reduced}). :math:`\gamma` and :math:`\beta` are learnable vectors of size `C`
    (`C` = ``num_features``), initialised to 1 and 0.

    Statistics. In training the batch is normalised with its own mean and *biased*
    variance (divide by m, the number of values per channel), and the running estimates
    are updated with the *unbiased* variance (divide by m - 1):
    ``running = (1 - momentum) * running + momentum * batch_statistic``. ``momentum`` is
    PyTorch's convention: the weight of the NEW batch (Keras/Flax's 0.99 "decay" is
    momentum 0.01 here). In evaluation the running estimates are used. With
    ``track_running_stats=False`` batch statistics are used in both modes.

    Guards beyond ``torch.nn``: bad input (wrong rank or channel count, integer dtype,
    empty batch) raises before any buffer changes; a batch whose statistics are not finite
    (NaN/Inf, fp16 overflow) leaves the running statistics and ``num_batches_tracked``
    unchanged and warns, naming the channels.

    Args:
        num_features: number of channels `C` of the expected input.
        eps: value added to the variance for numerical stability. Default: 1e-5
        momentum: weight of the new batch in the running estimates; ``None`` for a
            cumulative moving average (``1 / num_batches_tracked``). Default: 0.1
        affine: learnable ``weight`` (:math:`\gamma`) and ``bias`` (:math:`\beta`).
            Default: ``True``
        track_running_stats: keep running estimates (buffers ``running_mean``,
            ``running_var``, ``num_batches_tracked``). Default: ``True``
        device, dtype: factory arguments for parameters and buffers. Half-precision
            inputs work with float32 parameters (statistics accumulate in float32).
        bias: with ``affine``, whether to learn :math:`\beta` (keyword-only, as in
            torch.nn 2.13). Default: ``True``
        single_value: what a training batch with one value per channel does:
            ``"error"`` (raise, like PyTorch; default), ``"use_running"`` (normalise with
            the running estimates, update nothing) or ``"skip_update"`` (normalise with
            the batch statistics, i.e. output ``bias``, update nothing).

    Shape:
        - Input: {shape}
        - Output: same shape (and memory format) as the input.

    Examples::

        >>> import torch, batchnorm
        >>> bn = batchnorm.{name}({example_c})
        >>> x = torch.randn({example_shape})
        >>> y = bn(x)                       # training: batch statistics
        >>> _ = bn.eval(); y = bn(x)         # evaluation: running statistics
    """


class _BatchNorm(nn.modules.batchnorm._BatchNorm):
    """Parameters, buffers, checks and the statistics rule shared by BatchNorm1d/2d/3d.

    A subclass of torch.nn's ``_BatchNorm`` (and each 1d/2d/3d class of torch.nn's
    matching class), so code written for torch.nn's BN layers (``isinstance`` checks,
    ``torch.optim.swa_utils.update_bn``, ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``)
    treats ours as BN. Everything torch.nn's base would run is ours: ``__init__`` (it
    calls ``nn.Module.__init__`` only), ``forward``, ``_check_input_dim``,
    ``extra_repr``, the resets and ``_load_from_state_dict``.
    """

    _version = 2
    _expected_dims: tuple[int, ...] = ()
    _shape_text = ""

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
        bias: bool = True,
        single_value: str = "error",
    ) -> None:
        nn.Module.__init__(self)  # not torch.nn's _NormBase.__init__: the state is built here
        if single_value not in SINGLE_VALUE_POLICIES:
            raise ValueError(
                f"single_value must be one of {SINGLE_VALUE_POLICIES}, got {single_value!r}"
            )
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.single_value = single_value
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, device=device),
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, ``num_batches_tracked`` 0."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset the running statistics, weight to 1 and bias to 0."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            "{num_features}, eps={eps}, momentum={momentum}, affine={affine}, "
            "bias={use_bias}, track_running_stats={track_running_stats}".format(
                **self.__dict__, use_bias=self.bias is not None
            )
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if self.track_running_stats and key not in state_dict and (version is None or version < 2):
            # checkpoints from before num_batches_tracked existed
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # -- checks -------------------------------------------------------------------
    def _check_input_dim(self, input: Tensor) -> None:
        """torch.nn's name for the rank check (its forward calls it; ours calls
        ``check_input``): the rank, channel-count and dtype checks."""
        check_layout(self, input)

    def check_input(self, input: Tensor) -> None:
        """Raise a clear error for input this layer cannot normalise (state untouched)."""
        check_layout(self, input)
        if input.numel() == 0 and self._uses_batch_stats():
            raise ValueError(
                f"{type(self).__name__} got an empty batch of shape {tuple(input.shape)} "
                "in training: statistics of no values are undefined. Skip empty batches."
            )

    def _tensors(self) -> tuple[Tensor | None, ...]:
        """(weight, bias, running_mean, running_var), read from the module's dicts: each
        ``self.weight`` goes through ``nn.Module.__getattr__`` (about a microsecond, four
        to six times per call). Attributes that moved out of the dicts (a parametrization
        of ``weight``) are read the ordinary way."""
        params, buffers = self._parameters, self._buffers
        try:
            return params["weight"], params["bias"], buffers["running_mean"], buffers["running_var"]
        except KeyError:
            return self.weight, self.bias, self.running_mean, self.running_var

    def _uses_batch_stats(self) -> bool:
        return self.training or (self.running_mean is None and self.running_var is None)

    def _tracks(self) -> bool:
        return self.training and self.track_running_stats and self.running_mean is not None

    def _updates_running(self) -> bool:
        # Not while autograd runs a backward: a forward then is an activation-checkpoint
        # recomputation of a batch already counted (statistics update once per step).
        return self._tracks() and not in_backward()

    def _recomputing(self) -> bool:
        """An activation-checkpoint recomputation of a forward that updated the buffers."""
        return self._tracks() and in_backward()

    # -- forward --------------------------------------------------------------------
    def forward(self, input: Tensor) -> Tensor:
        self.check_input(input)
        weight, bias, running_mean, running_var = self._tensors()
        training = self.training
        if not training and (running_mean is not None or running_var is not None):
            return eval_normalize(input, running_mean, running_var, weight, bias, self.eps)
        count = input.numel() // input.shape[1]
        update = (
            training and self.track_running_stats and running_mean is not None
            and not in_backward()
        )
        if count <= 1:
            if self.single_value == "error":
                raise ValueError(
                    f"Expected more than 1 value per channel when training, got input size "
                    f"{list(input.shape)}. Pass single_value='use_running' or "
                    "'skip_update' to handle a batch of one."
                )
            if self.single_value == "use_running" and running_mean is not None:
                return eval_normalize(input, running_mean, running_var, weight, bias, self.eps)
            if self.single_value == "use_running":
                raise ValueError(
                    f"{type(self).__name__}(single_value='use_running') got a batch of one "
                    "but has no running statistics (track_running_stats=False)"
                )
            update = False
        return self.normalise_batch(input, weight, bias, count, update)

    def normalise_batch(
        self, input: Tensor, weight: Tensor | None, bias: Tensor | None, count: int,
        update: bool,
    ) -> Tensor:
        """Normalise with the batch's statistics (``count`` values per channel), and fold
        them into the running buffers if ``update``. An activation-checkpoint
        recomputation of an updating forward makes the same call on copies of the buffers:
        ATen saves the buffers it is given, and checkpoint compares what was saved."""
        if update:
            _, _, running_mean, running_var = self._tensors()
            return train_forward_updating(
                input, weight, bias, self.eps, running_mean, running_var, count,
                self.momentum, self._buffers.get("num_batches_tracked"), self._backup(),
            )[0]
        if count > 1 and self._recomputing():
            return train_forward_updating(
                input, weight, bias, self.eps, self.running_mean.clone(),
                self.running_var.clone(), count, 0.0,
            )[0]
        return train_forward(input, weight, bias, self.eps)[0]

    def _backup(self):
        """This layer's ``kernels.cpu_backup.RunningBackup`` (made on first use; None
        without numba, and while torch.compile traces: ATen's kernels run only eagerly)."""
        if torch.compiler.is_compiling():
            return None
        backup = self.__dict__.get("_running_backup")
        if backup is None:
            backup = self.__dict__["_running_backup"] = kernels.running_backup()
        return backup


class BatchNorm1d(_BatchNorm, nn.BatchNorm1d):
    _expected_dims = (2, 3)
    _shape_text = "(N, C) or (N, C, L)"
    __doc__ = _DOC.format(dims="2D or 3D", reduced="over N, and L if present",
                          shape=_shape_text, name="BatchNorm1d", example_c="100",
                          example_shape="20, 100")


class BatchNorm2d(_BatchNorm, nn.BatchNorm2d):
    _expected_dims = (4,)
    _shape_text = "(N, C, H, W)"
    __doc__ = _DOC.format(dims="4D", reduced="over N, H and W", shape=_shape_text,
                          name="BatchNorm2d", example_c="16", example_shape="8, 16, 32, 32")


class BatchNorm3d(_BatchNorm, nn.BatchNorm3d):
    _expected_dims = (5,)
    _shape_text = "(N, C, D, H, W)"
    __doc__ = _DOC.format(dims="5D", reduced="over N, D, H and W", shape=_shape_text,
                          name="BatchNorm3d", example_c="16", example_shape="4, 16, 8, 8, 8")
