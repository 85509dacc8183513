"""Batch normalization modules, drop-in for ``torch.nn.BatchNorm1d/2d/3d``.

Same constructor arguments and defaults, the same parameters and buffers (so the same
``state_dict``), the same train/eval semantics and the same numbers, plus: state that bad
input never touches, a policy for a batch of one, running statistics that non-finite
batches never reach, and fused kernels with an explicit closed-form backward.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .. import kernels
from . import functional, plan, stats, traced

SINGLE_VALUE_POLICIES = ("error", "use_running", "skip_update")

#: What the statistics rule decides for a call (``_BatchNorm.statistics``).
RUNNING = "running"  # normalise with the running estimates
BATCH = "batch"  # batch statistics, no update
UPDATE = "batch_update"  # batch statistics, folded into the running estimates
RECOMPUTE = "recompute"  # batch statistics, an activation-checkpoint recomputation of UPDATE
EMPTY = "empty"  # a training batch with no values: an empty output, nothing updated


class Dims(NamedTuple):
    """What a 1d/2d/3d class takes: input ranks, and the words of its docstring."""

    expected: tuple[int, ...] | range
    shape: str  # the input shape, e.g. "(N, C, H, W)"
    rank: str  # e.g. "4D"
    reduced: str  # the axes the statistics reduce over


#: The one table of the 1d/2d/3d family: every BN class names its row (``dims="2d"``).
DIMS = {
    "1d": Dims((2, 3), "(N, C) or (N, C, L)", "2D or 3D", "N, and L if present"),
    "2d": Dims((4,), "(N, C, H, W)", "4D", "N, H and W"),
    "3d": Dims((5,), "(N, C, D, H, W)", "5D", "N, D, H and W"),
    "nd": Dims(range(2, sys.maxsize), "(N, C, *)", "(N, C, *)", "every axis but C"),
}
#: torch.nn's class for each row of ``DIMS``.
TORCH_CLASSES = {"1d": nn.BatchNorm1d, "2d": nn.BatchNorm2d, "3d": nn.BatchNorm3d}

MOMENTUM_DOC = (
    "``momentum`` is PyTorch's convention: the weight of the NEW batch, "
    "``running = (1 - momentum) * running + momentum * batch_statistic`` (Keras/Flax's "
    "0.99 decay is momentum 0.01 here; ``None`` is the cumulative average)."
)


def in_backward() -> bool:
    """Whether the autograd engine is running a backward pass in this thread now (False
    while torch.compile traces: compiled graphs handle their own recomputation)."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def check_layout(layer: nn.Module, input: Tensor) -> None:
    """The rank, channel-count and dtype checks of every BN-like layer: ``layer`` has
    ``_dims`` (a row of ``DIMS``) and ``num_features``. (Runs on every call: the
    messages are built only when raised.)"""
    if input.dim() not in layer._dims.expected:
        raise ValueError(
            f"{type(layer).__name__} expects {layer._dims.shape} input, got a "
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


_DOC = r"""Applies Batch Normalization over a {rank} input, as described in `Batch
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



def warn_running(module: nn.Module, running_mean: Tensor | None, running_var: Tensor | None,
                 doing: str, input: Tensor | None = None, stacklevel: int = 8) -> None:
    """Warn (``stats.warn_not_finite``, naming the channels) if running statistics that
    ``module`` loaded or normalises with (``doing``) hold NaN/Inf or a negative variance.
    Checked once per distinct buffer version (``module._running_checked`` remembers the
    last one checked: no host read on an eval call whose buffers did not change), never
    under tracing, on the meta device or on a tracer's / transform's tensors."""
    if torch.compiler.is_compiling() or (running_mean is None and running_var is None):
        return
    try:
        key = (id(running_mean), running_mean._version, id(running_var), running_var._version)
    except (AttributeError, RuntimeError):  # a None buffer; inference tensors have no version
        key = tuple(x for t in (running_mean, running_var) for x in (
            id(t), None if t is None or t.is_inference() else t._version))
    if module.__dict__.get("_running_checked") == key:
        return
    if any(t.device.type == "meta" for t in (running_mean, running_var) if t is not None) or (
        input is not None and plan.tracing(input)
    ) or traced.active(running_mean if running_mean is not None else running_var):
        return
    module.__dict__["_running_checked"] = key
    if not stats.running_finite(running_mean, running_var):
        stats.warn_not_finite(running_mean, running_var, stacklevel,
                              running=f"{type(module).__name__} {doing}")

class Family:
    """A 1d/2d/3d class names its row of ``DIMS`` and the example of its docstring in its
    class statement (``class BatchNorm2d(_BatchNorm, dims="2d", example=("16", "8, 16,
    32, 32"))``); its docstring is its family's template (``_doc``) filled from them."""

    _dims = DIMS["nd"]
    _expected_dims: tuple[int, ...] | range = _dims.expected
    _doc = ""

    _dims_key = "nd"
    _sizes: dict[str, type] = {}

    @classmethod
    def sized(cls, dims: str) -> type:
        """The member of this family for row ``dims`` of ``DIMS`` (e.g. "2d")."""
        return cls._sizes[dims]

    def __init_subclass__(cls, dims: str | None = None, example: tuple = (), **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if dims is None:  # a family's base: its 1d/2d/3d members register here
            cls._sizes = {}
        else:
            cls._sizes[dims] = cls
            cls._dims_key, cls._dims = dims, DIMS[dims]
            row = cls._dims
            cls._expected_dims = row.expected
            c, shape, *mask = example
            cls.__doc__ = cls._doc.format(
                rank=row.rank, dims=row.shape, shape=row.shape, reduced=row.reduced,
                name=cls.__name__, example_c=c, example_shape=shape,
                example_mask=mask[0] if mask else "", momentum=MOMENTUM_DOC,
                plain=cls.__name__.replace("Masked", "").replace("Frozen", ""),
            )


class _BatchNorm(Family, nn.modules.batchnorm._BatchNorm):
    """Parameters, buffers, checks and the statistics rule shared by BatchNorm1d/2d/3d,
    every variant and SyncBatchNorm: the one constructor (a variant adds keyword-only
    options), and the one rule (``statistics``) that decides what a call normalises with.

    A subclass of torch.nn's ``_BatchNorm``, and each 1d/2d/3d member of torch.nn's class
    of its row (``TORCH_CLASSES``, named in its class statement), so code written for
    torch.nn's BN layers (``isinstance`` checks, ``torch.optim.swa_utils.update_bn``,
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``) treats ours as BN. Everything
    torch.nn's base would run is ours: ``__init__`` (it calls ``nn.Module.__init__``
    only), ``forward``, ``_check_input_dim``, ``extra_repr``, the resets and
    ``_load_from_state_dict``.
    """

    _version = 2
    _doc = _DOC
    #: A variant's statistics rule: ``batch_statistics(input) -> (mean, biased var)`` per
    #: channel, differentiable torch operations. None (BatchNorm): the fused kernels
    #: compute the batch's own statistics.
    batch_statistics = None

    def __init_subclass__(cls, dims: str | None = None, **kwargs) -> None:
        if dims in TORCH_CLASSES and not issubclass(cls, TORCH_CLASSES[dims]):
            torch_class = TORCH_CLASSES[dims].__name__
            raise TypeError(
                f"{cls.__name__} (dims={dims!r}) must also subclass torch.nn.{torch_class}, "
                f"so that code written for torch.nn sees it as BN; got the bases "
                f"{[b.__name__ for b in cls.__bases__]}. Write "
                f"class {cls.__name__}({cls.__bases__[0].__name__}, nn.{torch_class}, "
                f"dims={dims!r}, ...)."
            )
        super().__init_subclass__(dims=dims, **kwargs)

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
        functional.check_options(eps, momentum, type(self).__name__, training=False)
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
        _, _, running_mean, running_var = self._tensors()
        warn_running(self, running_mean, running_var, "loaded", stacklevel=5)

    # -- checks -------------------------------------------------------------------
    def _check_input_dim(self, input: Tensor) -> None:
        """torch.nn's name for the rank check (its forward calls it; ours calls
        ``check_input``): the rank, channel-count and dtype checks."""
        check_layout(self, input)

    def check_input(self, input: Tensor) -> tuple[Tensor | None, ...]:
        """Raise a clear error for input this layer cannot normalise, and for parameters,
        buffers, eps or momentum it cannot use (state untouched); eps as this call uses it:
        > 0 where the batch's statistics normalise, >= 0 in eval. Returns ``_tensors()``
        as checked."""
        check_layout(self, input)
        weight, bias, running_mean, running_var = tensors = self._tensors()
        functional.check_vectors(input, weight, bias, running_mean, running_var, self)
        functional.check_options(self.eps, self.momentum, self, training=self.training or (
            running_mean is None and running_var is None))
        return tensors

    def _tensors(self) -> tuple[Tensor | None, ...]:
        """(weight, bias, running_mean, running_var), read from the module's dicts: each
        ``self.weight`` goes through ``nn.Module.__getattr__``, four to six times per
        call: benchmarks/README.md). Attributes that moved out of the dicts (a parametrization
        of ``weight``) are read the ordinary way."""
        params, buffers = self._parameters, self._buffers
        try:
            return params["weight"], params["bias"], buffers["running_mean"], buffers["running_var"]
        except KeyError:
            return self.weight, self.bias, self.running_mean, self.running_var

    def _uses_batch_stats(self) -> bool:
        return self.training or (self.running_mean is None and self.running_var is None)

    def _recomputing(self) -> bool:
        """An activation-checkpoint recomputation of a forward that updated the buffers."""
        return self.training and self.track_running_stats and self.running_mean is not None \
            and in_backward()

    # -- the statistics rule ----------------------------------------------------------
    def statistics(self, input: Tensor, count: int | None = None,
                   size: str | None = None) -> str:
        """Check ``input`` (raising before any state changes) and decide what it is
        normalised with: ``RUNNING``, ``BATCH``, ``UPDATE`` or ``RECOMPUTE``.

        Eval with running estimates: ``RUNNING``. A training batch without values:
        ``EMPTY`` (an empty output, the state untouched). Training (or no running estimates):
        the batch's statistics, folded into the running estimates when they are tracked
        (``UPDATE``) except in an activation-checkpoint recomputation of a forward that
        did so already (``RECOMPUTE``: statistics update once per step). ``count`` is the
        number of values per channel (default: all of them; a mask's or all ranks' for
        the variants); with ``count <= 1`` the ``single_value`` policy decides. ``size``
        describes the batch in the error (default: the input's size)."""
        _, _, running_mean, running_var = self.check_input(input)
        return self._rule(input, count, size, running_mean, running_var)

    def _rule(self, input: Tensor, count: int | None = None, size: str | None = None,
              running_mean: Tensor | None = None, running_var: Tensor | None = None) -> str:
        """``statistics`` on input already checked (the running buffers as read there)."""
        if running_mean is None and running_var is None:
            _, _, running_mean, running_var = self._tensors()
        if not self.training and (running_mean is not None or running_var is not None):
            warn_running(self, running_mean, running_var, "normalises with", input)
            return RUNNING
        if count is None:
            count = input.numel() // input.shape[1]
        if count == 0 and input.numel() == 0:
            return EMPTY
        tracks = self.track_running_stats and running_mean is not None
        if count > 1:
            if not tracks:
                return BATCH
            return RECOMPUTE if in_backward() else UPDATE
        size = size or f"input size {list(input.shape)}"
        if self.single_value == "error":
            raise ValueError(
                f"{type(self).__name__}: expected more than 1 value per channel when "
                f"training, got {size}. Pass "
                "single_value='use_running' or 'skip_update' to handle a batch of one."
            )
        if self.single_value == "use_running":
            if self.running_mean is None:
                raise ValueError(
                    f"{type(self).__name__}(single_value='use_running') got a batch of one "
                    "but has no running statistics (track_running_stats=False)"
                )
            warn_running(self, running_mean, running_var, "normalises with", input)
            return RUNNING
        if count == 0:
            raise ValueError(
                f"{type(self).__name__}: statistics of no values are undefined, got {size}"
            )
        return BATCH

    # -- forward --------------------------------------------------------------------
    def forward(self, input: Tensor) -> Tensor:
        mode = self.statistics(input)
        weight, bias, running_mean, running_var = self._tensors()
        if mode == RUNNING:
            return plan.evaluate(input, running_mean, running_var, weight, bias, self.eps)
        return self.normalize_batch(input, weight, bias, mode)

    def normalize_batch(
        self, input: Tensor, weight: Tensor | None, bias: Tensor | None, mode: str
    ) -> Tensor:
        """Normalise with the batch's statistics, and fold them into the running buffers
        if ``mode`` is ``UPDATE``. A ``RECOMPUTE`` makes the same call on copies of the
        buffers: ATen saves the buffers it is given, and checkpoint compares what was
        saved."""
        if mode == EMPTY:
            return functional.empty_output(input, weight, bias, self.eps)
        if self.batch_statistics is not None:
            return self._normalize_with(input, weight, bias, mode)
        if mode == UPDATE:
            buffers = self._buffers
            return plan.train(
                input, weight, bias, self.eps, buffers["running_mean"], buffers["running_var"],
                self.momentum, buffers.get("num_batches_tracked"), self._backup(),
            )[0]
        if mode == RECOMPUTE:
            return plan.train(
                input, weight, bias, self.eps, self.running_mean.clone(),
                self.running_var.clone(), 0.0,
            )[0]
        return plan.train(input, weight, bias, self.eps)[0]

    def _normalize_with(self, input: Tensor, weight: Tensor | None, bias: Tensor | None,
                        mode: str) -> Tensor:
        """``normalize_batch`` of a variant that states its statistics rule
        (``batch_statistics``): normalised by differentiable torch operations, and the
        statistics folded into the running buffers by the one guarded update."""
        mean, var = self.batch_statistics(input)
        if mode == UPDATE:
            stats.update_running(
                self.running_mean, self.running_var, mean.detach(), var.detach(),
                input.numel() // input.shape[1], self.momentum, self.num_batches_tracked,
            )
        return functional.normalize(input, mean, var, weight, bias, self.eps)

    def _backup(self):
        """This layer's ``kernels.cpu_backup.RunningBackup`` (made on first use; None
        without numba, and while torch.compile traces: ATen's kernels run only eagerly)."""
        if torch.compiler.is_compiling():
            return None
        backup = self.__dict__.get("_running_backup")
        if backup is None:
            backup = self.__dict__["_running_backup"] = kernels.running_backup()
        return backup


class BatchNorm1d(_BatchNorm, nn.BatchNorm1d, dims="1d", example=("100", "20, 100")): ...
class BatchNorm2d(_BatchNorm, nn.BatchNorm2d, dims="2d", example=("16", "8, 16, 32, 32")): ...
class BatchNorm3d(_BatchNorm, nn.BatchNorm3d, dims="3d", example=("16", "4, 16, 8, 8, 8")): ...
