"""Converters that walk a model's module tree and swap normalisation layers.

``from_torch`` swaps every BN-like layer a model from torch.nn, timm or torchvision holds
for batchnorm's, ``to_torch`` swaps them back. Both keep module names, the very same
parameter and buffer tensors (an optimizer built before the swap keeps working, the
state_dict keys are unchanged, so pretrained checkpoints load either way) and the
train/eval flag of every layer.

What ``from_torch`` converts (the classes and their subclasses that keep the forward):

========================================  =============================================
torch.nn BatchNorm1d/2d/3d (Lazy ones     batchnorm.BatchNorm1d/2d/3d
once materialised)
torch.nn SyncBatchNorm                    batchnorm.SyncBatchNorm (same process group)
timm BatchNormAct2d                       batchnorm.BatchNormAct2d with the same
                                          activation when batchnorm has a kernel for it
                                          (identity, ReLU, LeakyReLU, ELU, SiLU, GELU) and
                                          no dropout; else ``BatchNormThen2d``: our BN,
                                          then the layer's own dropout and activation
timm SyncBatchNormAct                     ``SyncBatchNormThen`` (our SyncBatchNorm, then
                                          its dropout and activation)
torchvision FrozenBatchNorm2d (timm's     batchnorm.FrozenBatchNorm2d
FrozenBatchNorm2d is the same class)
timm FrozenBatchNormAct2d                 batchnorm.FrozenBatchNorm2d with the
                                          activation, or ``FrozenBatchNormThen2d``
========================================  =============================================

What it leaves, and says so (a warning naming each layer and why; the full account in
the ``ConversionReport`` that ``report=True`` returns): a Lazy layer not yet
materialised, a subclass that overrides ``forward`` (timm's SplitBatchNorm2d, user
layers), and any other class whose name says BatchNorm.

With ``activations=True`` it also merges a BN layer and the activation applied to its
output (an activation module, or ``F.relu``, ``torch.relu``, ``F.leaky_relu``,
``F.elu``, ``F.silu``, ``F.gelu``, ``x.relu()``) into one BatchNormAct, through the
``torch.fx`` graph of the model (the result is a ``torch.fx.GraphModule``), only where
that is the same function: the BN is called once and its output feeds the activation and
nothing else.

Every converted layer remembers the class and attributes of the layer it replaced, so
``to_torch`` gives back that very class (timm's, torchvision's, a subclass) holding the
current tensors. A layer built as batchnorm's becomes the closest torch.nn module
(``batchnorm.variants.export``).
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import fx, nn
from torch.nn import functional as F

from ..core import modules
from ..core.tree import bn_args as _bn_args
from ..core.tree import replace_modules, transplant
from ..core.tree import replace_named as _replace_named
from ..distributed import SyncBatchNorm
from ..kernels.torch_backend import acc_dtype, channel_view
from ..variants.act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from ..variants.export import variant_to_torch
from ..variants.frozen import FrozenBatchNorm2d, _FrozenBatchNorm, freeze, unfreeze

__all__ = [
    "replace_modules", "transplant", "from_torch", "to_torch", "freeze", "unfreeze",
    "convert_sync_batchnorm", "ConversionReport", "Converted", "BatchNormThen2d",
    "SyncBatchNormThen", "FrozenBatchNormThen2d",
]

_TORCH_TO_OURS: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: modules.BatchNorm1d,
    nn.BatchNorm2d: modules.BatchNorm2d,
    nn.BatchNorm3d: modules.BatchNorm3d,
}
_OURS_TO_TORCH = {ours: theirs for theirs, ours in _TORCH_TO_OURS.items()}
_ACT_CLASS = {1: BatchNormAct1d, 2: BatchNormAct2d, 3: BatchNormAct3d}
_ORIGINAL = "_torch_original"  # where a converted layer keeps what it replaced


# -- BN followed by the replaced layer's own modules ------------------------------------------
class _Then:
    """Mixin: batchnorm's layer, then the ``drop`` and ``act`` modules of the layer it
    replaced (timm's order: ``act(drop(bn(x)))``). They hold no state_dict entries in timm,
    so the keys stay those of the BN."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(input)))


class BatchNormThen2d(_Then, modules.BatchNorm2d):
    """``batchnorm.BatchNorm2d`` followed by the dropout and activation modules of the
    timm ``BatchNormAct2d`` it replaced (an activation batchnorm has no kernel for, or a
    dropout between BN and activation): ``y = act(drop(BN(x)))``."""


class SyncBatchNormThen(_Then, SyncBatchNorm):
    """``batchnorm.SyncBatchNorm`` followed by the dropout and activation modules of the
    timm ``SyncBatchNormAct`` it replaced: ``y = act(drop(SyncBN(x)))``."""


class FrozenBatchNormThen2d(FrozenBatchNorm2d):
    """``batchnorm.FrozenBatchNorm2d`` (no activation of its own) followed by the dropout
    and activation modules of the timm ``FrozenBatchNormAct2d`` it replaced:
    ``y = act(drop(x * scale + shift))``. (``act`` names the module here, as in timm.)"""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self.check_input(input)
        acc = acc_dtype(input.dtype)
        scale, shift = (v.to(acc) for v in self.scale_shift())
        y = input.to(acc) * channel_view(scale, input) + channel_view(shift, input)
        return self.act(self.drop(y.to(input.dtype)))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


# -- report ---------------------------------------------------------------------------------
@dataclass
class ConversionReport:
    """What a conversion did: ``converted`` (name, from class, to class, as
    ``library.Class``), ``merged`` (BN name, the activation merged into it), ``kept``
    (name, class, why it was left unconverted), ``unmerged`` (BN name, why the activation
    after it was not merged: ``activations=True`` only)."""

    converted: list[tuple[str, str, str]] = field(default_factory=list)
    merged: list[tuple[str, str]] = field(default_factory=list)
    kept: list[tuple[str, str, str]] = field(default_factory=list)
    unmerged: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"converted {len(self.converted)} layer(s), merged {len(self.merged)} "
            f"activation(s), kept {len(self.kept)}"
        ]
        counts = Counter((a, b) for _, a, b in self.converted)
        lines += [f"  {n} x {a} -> {b}" for (a, b), n in counts.items()]
        lines += [f"  merged {bn} + {act}" for bn, act in self.merged]
        lines += [f"  kept   {name} ({cls}): {why}" for name, cls, why in self.kept]
        lines += [f"  not merged {name}: {why}" for name, why in self.unmerged]
        return "\n".join(lines)


class Converted(NamedTuple):
    model: nn.Module
    report: ConversionReport


# -- what each known class becomes --------------------------------------------------------------
def kernel_activation(act: nn.Module) -> tuple[str, float | None] | None:
    """(name, alpha) of batchnorm's activation kernel computing exactly what ``act``
    computes, or None (the module is then kept as it is)."""
    kind = type(act)
    if kind is nn.Identity:
        return "identity", None
    if kind is nn.ReLU:
        return "relu", None
    if kind is nn.LeakyReLU:
        return "leaky_relu", float(act.negative_slope)
    if kind is nn.ELU and act.alpha > 0:
        return "elu", float(act.alpha)
    if kind is nn.SiLU:
        return "silu", None
    if kind is nn.GELU and act.approximate == "none":
        return "gelu", None
    return None


def _drop_act(m: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The layer's dropout and activation modules (timm's SyncBatchNormAct may lack them)."""
    drop, act = getattr(m, "drop", None), getattr(m, "act", None)
    return (nn.Identity() if drop is None else drop), (nn.Identity() if act is None else act)


def _plain(m: nn.Module, memory_saving: bool) -> nn.Module:
    torch_cls = next(c for c in type(m).__mro__ if c in _TORCH_TO_OURS)
    return _TORCH_TO_OURS[torch_cls](**_bn_args(m), device="meta")


def _sync(m: nn.Module, memory_saving: bool) -> nn.Module:
    return SyncBatchNorm(**_bn_args(m), process_group=m.process_group, device="meta")


def _with_act(m: nn.Module, memory_saving: bool) -> nn.Module:
    drop, act = _drop_act(m)
    kernel = kernel_activation(act)
    if kernel is not None and type(drop) is nn.Identity:
        return BatchNormAct2d(**_bn_args(m), act=kernel[0], alpha=kernel[1],
                              memory_saving=memory_saving, device="meta")
    return _attach(BatchNormThen2d(**_bn_args(m), device="meta"), drop, act)


def _sync_act(m: nn.Module, memory_saving: bool) -> nn.Module:
    return _attach(SyncBatchNormThen(**_bn_args(m), process_group=m.process_group,
                                     device="meta"), *_drop_act(m))


def _frozen(m: nn.Module, memory_saving: bool) -> nn.Module:
    return FrozenBatchNorm2d(m.weight.shape[0], m.eps, device="meta")


def _frozen_act(m: nn.Module, memory_saving: bool) -> nn.Module:
    drop, act = _drop_act(m)
    kernel = kernel_activation(act)
    if kernel is not None and type(drop) is nn.Identity:
        return FrozenBatchNorm2d(m.weight.shape[0], m.eps, act=kernel[0], alpha=kernel[1],
                                 device="meta")
    return _attach(FrozenBatchNormThen2d(m.weight.shape[0], m.eps, device="meta"), drop, act)


def _attach(new: nn.Module, drop: nn.Module, act: nn.Module) -> nn.Module:
    new.drop, new.act = drop, act
    return new


#: (module, class name) of each class from_torch knows -> how it converts. Looked up along
#: the MRO, so subclasses that keep the forward convert too; timm and torchvision are never
#: imported here.
_KNOWN: dict[tuple[str, str], Callable[[nn.Module, bool], nn.Module]] = {
    ("torch.nn.modules.batchnorm", "BatchNorm1d"): _plain,
    ("torch.nn.modules.batchnorm", "BatchNorm2d"): _plain,
    ("torch.nn.modules.batchnorm", "BatchNorm3d"): _plain,
    ("torch.nn.modules.batchnorm", "SyncBatchNorm"): _sync,
    ("timm.layers.norm_act", "BatchNormAct2d"): _with_act,
    ("timm.layers.norm_act", "SyncBatchNormAct"): _sync_act,
    ("timm.layers.norm_act", "FrozenBatchNormAct2d"): _frozen_act,
    ("torchvision.ops.misc", "FrozenBatchNorm2d"): _frozen,
}


def _is_ours(m: nn.Module) -> bool:
    return isinstance(m, (modules._BatchNorm, _FrozenBatchNorm))


def _plan(m: nn.Module) -> Callable[[nn.Module, bool], nn.Module] | str | None:
    """How ``m`` converts, why it cannot (a str), or None when it is no BN layer."""
    if _is_ours(m):
        return None
    kind = type(m)
    if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return ("a Lazy layer not yet materialised (its number of channels is unknown): "
                    "run one forward pass first, then convert")
        return None
    for base in kind.__mro__:
        make = _KNOWN.get((base.__module__, base.__name__))
        if make is None:
            continue
        if kind.forward is not base.forward:
            return (f"{kind.__name__} overrides forward ({kind.__qualname__}.forward), so it "
                    f"may compute something other than {base.__name__}: left as it is")
        return make
    if isinstance(m, nn.modules.batchnorm._BatchNorm) or "batchnorm" in kind.__name__.lower():
        return ("a BN-like class from_torch does not know: left as it is (convert it by "
                "hand, or open an issue naming its library)")
    return None


def _qualified(cls: type) -> str:
    return f"{cls.__module__.split('.')[0]}.{cls.__name__}"


def _convert_one(m: nn.Module, make, memory_saving: bool) -> nn.Module:
    new = transplant(m, make(m, memory_saving))
    state = dict(m.__dict__)
    state["_parameters"] = dict.fromkeys(m._parameters)
    state["_buffers"] = dict.fromkeys(m._buffers)
    state["_modules"] = dict(m._modules)
    new.__dict__[_ORIGINAL] = (type(m), state)
    return new


def _restore(ours: nn.Module) -> nn.Module:
    """The layer ``ours`` replaced (its class and attributes), holding ``ours``'s current
    tensors, children, train flag and hyper-parameters."""
    cls, state = ours.__dict__[_ORIGINAL]
    original = cls.__new__(cls)
    for key, value in state.items():
        original.__dict__[key] = copy.copy(value) if isinstance(value, (dict, set)) else value
    original._parameters = {k: ours._parameters.get(k) for k in state["_parameters"]}
    original._buffers = {k: ours._buffers.get(k) for k in state["_buffers"]}
    original._modules = {k: ours._modules.get(k, v) for k, v in state["_modules"].items()}
    for attr in ("eps", "momentum", "process_group"):
        if attr in state and hasattr(ours, attr):
            original.__dict__[attr] = getattr(ours, attr)
    return original.train(ours.training)


def from_torch(
    model: nn.Module, *, activations: bool = False, memory_saving: bool = True,
    report: bool = False,
) -> nn.Module | Converted:
    """Swap every BN-like layer of ``model`` (torch.nn's, timm's, torchvision's; the table
    in this module's docstring) for batchnorm's, in place.

    Names, the very same parameter and buffer tensors, state_dict keys and the train/eval
    flags are kept; the converted model computes the same function (float64: equal to
    1e-8 in training and eval, gradients and running statistics included).

    Args:
        model: any module (a bare BN layer too: the result is then the new layer).
        activations: also merge a BN layer and the activation applied to its output into
            one BatchNormAct through ``torch.fx`` (module docstring). Default: False
        memory_saving: the BatchNormAct layers made keep only their output for the
            backward where the activation is invertible (identity, leaky ReLU, ELU).
            Exact for ``|gamma| >= weight_eps`` (1e-5); a gamma closer to 0 (a
            zero-initialised last BN of a residual block) computes with that floor (see
            ``BatchNormAct2d``). ``False`` keeps the input instead: exact for every gamma,
            no memory saved. Default: True
        report: return ``Converted(model, report)`` instead of the model.

    A warning names every BN-like layer left unconverted and why (never silent).

    Example::

        >>> model = batchnorm.from_torch(timm.create_model("cspdarknet53"))
        >>> model, report = batchnorm.from_torch(model, activations=True, report=True)
        >>> print(report)
    """
    account = ConversionReport()

    def swap(name: str, m: nn.Module) -> nn.Module | None:
        plan = _plan(m)
        if plan is None:
            return None
        if isinstance(plan, str):
            account.kept.append((name, type(m).__name__, plan))
            return None
        new = _convert_one(m, plan, memory_saving)
        account.converted.append((name, _qualified(type(m)), _qualified(type(new))))
        return new

    model = _replace_named(model, swap)
    if activations:
        model = _merge_activations(model, memory_saving, account)
    if account.kept:
        warnings.warn(
            "from_torch left layer(s) unconverted: "
            + "; ".join(f"{name} ({cls}: {why})" for name, cls, why in account.kept),
            UserWarning, stacklevel=2,
        )
    return Converted(model, account) if report else model


def to_torch(model: nn.Module) -> nn.Module:
    """Swap batchnorm's layers back: each layer ``from_torch`` made becomes the very class
    it replaced (torch.nn's, timm's, torchvision's) with the current tensors and flags;
    layers built as batchnorm's become the closest torch.nn modules (what is kept and what
    is lost: ``batchnorm.variants.export``; a BatchNormAct merged by
    ``from_torch(activations=True)`` becomes ``Sequential(BatchNorm, activation)``)."""

    def swap(m: nn.Module) -> nn.Module | None:
        if _ORIGINAL in m.__dict__:
            return _restore(m)
        replaced = variant_to_torch(m)
        if replaced is not None:
            return replaced
        cls = _OURS_TO_TORCH.get(type(m))
        return None if cls is None else transplant(m, cls(**_bn_args(m), device="meta"))

    return replace_modules(model, swap)


# -- merging BN and the activation after it (torch.fx) -----------------------------------------
_PLAIN_OURS = {modules.BatchNorm1d: 1, modules.BatchNorm2d: 2, modules.BatchNorm3d: 3}
_DEFAULTS = {"leaky_relu": 0.01, "elu": 1.0}
_FUNCTIONS = {  # call -> (activation, its parameters after the input, in order)
    F.relu: ("relu", ("inplace",)), F.relu_: ("relu", ()),
    torch.relu: ("relu", ()), torch.relu_: ("relu", ()),
    F.leaky_relu: ("leaky_relu", ("negative_slope", "inplace")),
    F.leaky_relu_: ("leaky_relu", ("negative_slope",)),
    F.elu: ("elu", ("alpha", "inplace")), F.elu_: ("elu", ("alpha",)),
    F.silu: ("silu", ("inplace",)), F.gelu: ("gelu", ("approximate",)),
}
_METHODS = {"relu": "relu", "relu_": "relu"}  # x.relu(), x.relu_()


class _LeafTracer(fx.Tracer):
    """Keeps every BN-like layer a leaf (one node per call)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _is_ours(m) or _plan(m) is not None or super().is_leaf_module(m, qualname)


def _activation_of(node: fx.Node, gm: fx.GraphModule, bn_node: fx.Node):
    """(act, alpha, description) when ``node`` applies a kernel activation to ``bn_node``
    and nothing else, else None."""
    if not node.args or node.args[0] is not bn_node:
        return None
    if node.op == "call_module":
        kernel = kernel_activation(gm.get_submodule(node.target))
        if kernel is None or kernel[0] == "identity" or len(node.args) != 1 or node.kwargs:
            return None
        return kernel[0], kernel[1], f"{node.target} ({type(gm.get_submodule(node.target)).__name__})"
    if node.op == "call_method" and node.target in _METHODS:
        if len(node.args) != 1 or node.kwargs:
            return None
        return _METHODS[node.target], None, f"Tensor.{node.target}"
    if node.op != "call_function" or node.target not in _FUNCTIONS:
        return None
    act, names = _FUNCTIONS[node.target]
    if len(node.args) - 1 > len(names):
        return None
    given = dict(zip(names, node.args[1:]), **node.kwargs)
    if set(given) - set(names) or any(isinstance(v, fx.Node) for v in given.values()):
        return None
    if act == "gelu" and given.get("approximate", "none") != "none":
        return None
    alpha = given.get({"leaky_relu": "negative_slope", "elu": "alpha"}.get(act), _DEFAULTS.get(act))
    if act == "elu" and not alpha > 0:
        return None
    name = getattr(node.target, "__name__", str(node.target))
    return act, None if alpha is None else float(alpha), f"{name} (function)"


def _merge_activations(model: nn.Module, memory_saving: bool, account: ConversionReport) -> nn.Module:
    try:
        graph = _LeafTracer().trace(model)
    except Exception as exc:  # data-dependent control flow and more
        account.unmerged.append((
            "<model>", f"torch.fx cannot trace the model, no activation merged "
            f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:80]})",
        ))
        warnings.warn(f"from_torch(activations=True): {account.unmerged[-1][1]}", UserWarning,
                      stacklevel=3)
        return model
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    gm.training = model.training
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        bn = gm.get_submodule(node.target)
        if type(bn) not in _PLAIN_OURS:
            continue
        found = [(user, _activation_of(user, gm, node)) for user in node.users]
        found = [(user, act) for user, act in found if act is not None]
        if not found:
            continue
        user, (act, alpha, what) = found[0]
        reason = None
        if calls[node.target] > 1:
            reason = "called more than once (shared): merging would change its other calls"
        elif len(node.users) > 1:
            others = ", ".join(u.name for u in node.users if u is not user)
            reason = f"its output is also used by {others}, not only by {what}"
        if reason is not None:
            account.unmerged.append((node.target, f"{what}: {reason}"))
            continue
        merged = transplant(bn, _ACT_CLASS[_PLAIN_OURS[type(bn)]](
            **_bn_args(bn), act=act, alpha=alpha, memory_saving=memory_saving, device="meta"))
        parent, _, leaf = node.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, leaf, merged)
        user.replace_all_uses_with(node)
        graph.erase_node(user)
        account.merged.append((node.target, what))
    graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm


# Sync conversion lives with SyncBatchNorm; re-exported here with the other converters.
from ..distributed import convert_sync_batchnorm  # noqa: E402
