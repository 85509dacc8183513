"""Convert one BatchNorm layer's checkpoint between Keras / Flax conventions and ours.

What differs (see docs/landscape.md):

=================  =================================  ==================================
                   batchnorm / PyTorch                Keras 3 / Flax
=================  =================================  ==================================
names              weight, bias, running_mean,        Keras: gamma, beta, moving_mean,
                   running_var, num_batches_tracked   moving_variance. Flax: params
                                                      {scale, bias}, batch_stats
                                                      {mean, var}
momentum           weight of the NEW batch (0.1)      decay, weight of the OLD value
                                                      (0.99): ours = 1 - theirs
stored variance    unbiased, var_B * m / (m - 1)      biased var_B (Keras 3, Flax)
epsilon            1e-5                               Keras 1e-3, Flax 1e-5
no gamma / beta    affine=False (neither)             Keras scale=False / center=False,
                                                      Flax use_scale / use_bias=False
=================  =================================  ==================================

The running variance is an exponential average of per-batch variances, so with ``m``
values per channel in every training batch (batch size times spatial size) the unbiased
average is ``m / (m - 1)`` times the biased one (exactly, once the initial value 1 has
decayed away). ``values_per_channel`` chooses what to keep:

- ``values_per_channel=m``: convert the estimate to the target's convention, i.e. what
  training in that convention would have stored. Eval outputs change by a factor of
  about ``sqrt((m - 1) / m)`` (negligible for large m, 1.6% for m = 32).
- ``values_per_channel=None``: copy the variance unchanged, so eval outputs stay
  identical to the source framework's (given the same eps, which the returned layer
  arguments carry).

tf-keras with ``fused=True`` stores the Bessel-corrected (unbiased) variance already
(tensorflow/tensorflow#55545): pass ``stored_variance="unbiased"`` for such checkpoints.

Inputs are read as users save them (nested dicts, ``h5py`` groups, Flax ``State``
objects; arrays from NumPy, torch, JAX or anything with ``__array__``; variables holding
their array in ``.value``), in float16, bfloat16, float32 or float64. Nothing is dropped
silently: a name that is not the layer's, a missing gamma/beta that the layer's flags say
exists, several layers without ``layer=`` choosing one, or arrays of different lengths
raise an error that says what was found and what was expected.

Every function returns the converted weights and the layer arguments in the target's
convention, e.g.::

    state, kwargs = batchnorm.checkpoints.from_keras(layer.get_weights(), momentum=0.99,
                                                     epsilon=1e-3, values_per_channel=32*14*14)
    bn = batchnorm.BatchNorm2d(len(state["weight"]), **kwargs)   # eps=1e-3, momentum=0.01
    bn.load_state_dict(state)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "momentum_from_decay", "decay_from_momentum",
    "from_keras", "to_keras", "from_flax", "to_flax",
]

_KERAS = ("gamma", "beta", "moving_mean", "moving_variance")
_FLAX = ("scale", "bias", "mean", "var")
_OURS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# TensorFlow checkpoints (tf.train.list_variables) name a variable <path>/<name>/.ATTRIBUTES/VARIABLE_VALUE
_TF_SUFFIX = (".ATTRIBUTES", "VARIABLE_VALUE")


def _number(value: Any, name: str) -> float:
    """``value`` as a float; a clear TypeError for anything that is not a real number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    return float(value)


def momentum_from_decay(decay: float) -> float:
    """Keras/Flax momentum (decay, weight of the old value) -> ours (weight of the new)."""
    if not 0 <= _number(decay, "momentum (a Keras/Flax decay)") <= 1:
        raise ValueError(f"a decay momentum must lie in [0, 1], got {decay}")
    return 1.0 - float(decay)


def decay_from_momentum(momentum: float | None) -> float:
    """Our momentum (weight of the new batch) -> Keras/Flax decay."""
    if momentum is None:
        raise ValueError(
            "momentum=None (PyTorch's cumulative average) has no Keras/Flax equivalent; "
            "pass the momentum to use there"
        )
    if not 0 <= _number(momentum, "momentum") <= 1:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
    return 1.0 - float(momentum)


def _epsilon(eps: Any, name: str) -> float:
    value = _number(eps, name)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {eps!r}")
    return value


def _flags(**flags: Any) -> None:
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False (the layer's flag), got {value!r}")


def _correction(values_per_channel: int | None) -> float:
    """m / (m - 1), or 1 for None."""
    if values_per_channel is None:
        return 1.0
    m = _number(values_per_channel, "values_per_channel")
    if not math.isfinite(m) or int(m) != m or m < 2:
        raise ValueError(
            f"values_per_channel must be an integer >= 2 (batch size x spatial size), "
            f"got {values_per_channel}"
        )
    return m / (m - 1)


def _check_variance_kind(stored_variance: str) -> None:
    if stored_variance not in ("biased", "unbiased"):
        raise ValueError(f"stored_variance must be 'biased' or 'unbiased', got {stored_variance!r}")


def _tensor(value: Any, what: str) -> Tensor:
    """One stored per-channel array as a new 1-D floating-point tensor of its own dtype.

    Accepts torch tensors, NumPy arrays (bfloat16 from ``ml_dtypes`` included), anything
    with ``__array__`` (JAX, TensorFlow, h5py datasets) and variables that hold their array
    in ``.value`` (Flax nnx ``Variable``/``VariableState``, Keras variables)."""
    for _ in range(4):  # a variable holding a variable holding the array
        if isinstance(value, (Tensor, np.ndarray)) or not hasattr(value, "value"):
            break
        value = value.value
    if isinstance(value, Tensor):
        t = value.detach().to("cpu", copy=True)
    else:
        try:
            a = np.asarray(value)
        except Exception as e:  # noqa: BLE001 - whatever the object raises, say what was expected
            raise TypeError(f"{what}: expected an array of floats, found {type(value).__name__} ({e})") from e
        if a.dtype.name == "bfloat16":  # ml_dtypes (JAX): same bits as torch.bfloat16
            t = torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
        elif a.dtype.kind == "f" and a.dtype.itemsize <= 8:
            t = torch.from_numpy(a.astype(a.dtype.newbyteorder("="), copy=True))
        else:
            raise TypeError(f"{what}: expected float16, bfloat16, float32 or float64 values, found {a.dtype} "
                            f"({type(value).__name__} of shape {a.shape})")
    if not t.is_floating_point():
        raise TypeError(f"{what}: expected floating-point values, found {t.dtype}")
    if t.ndim != 1 or t.numel() == 0:
        raise ValueError(f"{what}: expected a 1-D array of one value per channel, found shape {tuple(t.shape)}")
    return t


def _same_length(arrays: Mapping[str, Tensor], source: str) -> None:
    lengths = {name: len(t) for name, t in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{source}: expected one value per channel in every array (all the same length), "
                         f"found lengths {lengths}")


def _state(gamma: Tensor | None, beta: Tensor | None, mean: Tensor, var_unbiased: Tensor) -> dict[str, Tensor]:
    return {
        "weight": gamma if gamma is not None else torch.ones_like(mean),
        "bias": beta if beta is not None else torch.zeros_like(mean),
        "running_mean": mean,
        "running_var": var_unbiased,
        "num_batches_tracked": torch.tensor(0, dtype=torch.long),
    }


def _leaves(tree: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(path, leaf) for every non-mapping value of nested mappings; string keys are split
    at "/" (so ``{"bn/gamma:0": a}`` and ``{"bn": {"gamma:0": a}}`` give the same path).
    None leaves are yielded too: a name stored as None (Flax nnx keeps a disabled
    scale/bias so) still tells which layer it belongs to; ``_present`` drops them."""
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from _leaves(value, path + tuple(p for p in str(key).split("/") if p))
    else:
        yield path, tree


def _present(entries: Mapping[str, Any]) -> dict[str, Any]:
    """The entries that hold a value (a None leaf counts as absent)."""
    return {name: value for name, value in entries.items() if value is not None}


def _show(path: tuple[str, ...]) -> str:
    return "/".join(path) or "(top level)"


def _pick_layer(groups: dict[tuple[str, ...], dict[str, Any]], layer: str | None, source: str,
                is_layer: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    """The one layer of ``groups`` (path -> {name: leaf}): the only candidate, or ``layer``."""
    if layer is not None:
        wanted = tuple(p for p in str(layer).split("/") if p)
        exact = [p for p in groups if p == wanted]
        matches = exact or [p for p in groups if wanted and p[len(p) - len(wanted):] == wanted]
        if len(matches) != 1:
            found = "none" if not matches else ", ".join(_show(p) for p in matches)
            raise ValueError(f"{source}: layer={layer!r} matches {found}; expected exactly one of the layers "
                             f"found: {', '.join(_show(p) for p in groups) or 'none'}")
        return matches[0], groups[matches[0]]
    candidates = list(groups) if len(groups) == 1 else [p for p, names in groups.items() if is_layer(names)]
    if len(candidates) == 1:
        return candidates[0], groups[candidates[0]]
    if not candidates:
        found = "; ".join(f"{_show(p)}: {sorted(names)}" for p, names in groups.items()) or "nothing"
        raise ValueError(f"{source}: no BatchNorm layer found; found {found}")
    raise ValueError(f"{source}: the weights of {len(candidates)} layers ({', '.join(_show(p) for p in candidates)}); "
                     "pass layer='<name>' to choose one")


def _affine(entries: Mapping[str, Any], names: tuple[str, str], flags: tuple[tuple[str, bool], ...],
            where: str) -> None:
    """A gamma/beta (``names``) present exactly when its flag says the layer has one."""
    for name, (flag, on) in zip(names, flags):
        if on and name not in entries:
            raise ValueError(f"{where}: no {name!r} found (names found: {sorted(entries)}); expected it since "
                             f"{flag}=True; pass {flag}=False if the layer was built without it")
        if not on and name in entries:
            raise ValueError(f"{where}: found {name!r} but {flag}=False; expected no {name} "
                             f"(pass {flag}=True to convert it)")


# --- Keras ------------------------------------------------------------------------------

def _keras_names(path: tuple[str, ...]) -> tuple[tuple[str, ...], str]:
    """(layer path, weight name) of a Keras key: 'bn/gamma:0' (tf-keras), 'bn/gamma'
    (Keras 3 ``variable.path``), 'layers/bn/vars/0' (Keras 3 ``.weights.h5``),
    'bn/gamma/.ATTRIBUTES/VARIABLE_VALUE' (TensorFlow checkpoint)."""
    if path[-2:] == _TF_SUFFIX:
        path = path[:-2]
    if not path:
        return (), ""
    prefix, name = path[:-1], path[-1].split(":")[0]
    if name.isdigit() and prefix[-1:] == ("vars",):
        prefix = prefix[:-1]
    return prefix, name


def _keras_order(center: bool, scale: bool) -> tuple[str, ...]:
    """The order of ``layer.get_weights()`` and of a ``.weights.h5`` file's vars/0, 1, ...:
    trainable weights (gamma, beta) first, then moving_mean, moving_variance."""
    return (("gamma",) if scale else ()) + (("beta",) if center else ()) + ("moving_mean", "moving_variance")


def _keras_list(values: Sequence[Any], center: bool, scale: bool, source: str) -> dict[str, Any]:
    order = _keras_order(center, scale)
    if len(values) == len(order):
        return dict(zip(order, values))
    hint = ""
    if len(values) == 3 and center and scale:
        hint = ("; 3 arrays come from a layer built with scale=False (beta, moving_mean, moving_variance) or "
                "center=False (gamma, moving_mean, moving_variance): pass that flag")
    raise ValueError(f"{source}: expected {len(order)} arrays {list(order)} (center={center}, scale={scale}), "
                     f"found {len(values)}{hint}")


def _keras_entries(weights: Any, center: bool, scale: bool, layer: str | None) -> tuple[dict[str, Any], str]:
    """The Keras layer's weights as {gamma?, beta?, moving_mean, moving_variance}, and where they came from."""
    if isinstance(weights, Mapping):
        groups: dict[tuple[str, ...], dict[str, Any]] = {}
        for path, value in _leaves(weights):
            prefix, name = _keras_names(path)
            if name in groups.setdefault(prefix, {}):
                raise ValueError(f"Keras weights: {name!r} appears twice for layer {_show(prefix)}")
            groups[prefix][name] = value
        prefix, entries = _pick_layer(groups, layer, "Keras weights",
                                      lambda names: bool(set(names) & set(_KERAS))
                                      or all(n.isdigit() for n in names))
        entries = _present(entries)
        where = f"Keras layer {_show(prefix)}"
        if entries and all(n.isdigit() for n in entries):  # a Keras 3 .weights.h5 layer: vars/0, vars/1, ...
            if sorted(map(int, entries)) != list(range(len(entries))):
                raise ValueError(f"{where}: expected numbered weights 0 .. n-1, found {sorted(entries)}")
            return _keras_list([entries[str(i)] for i in range(len(entries))], center, scale, where), where
        unknown = sorted(set(entries) - set(_KERAS))
        if unknown:
            hint = ""
            if {"scale", "center"} & set(unknown):
                hint = ("; 'scale' and 'center' are the layer's flags, not weight names: pass scale=False / "
                        "center=False for a layer without gamma / beta")
            if {"mean", "var", "bias"} & set(unknown):
                hint += "; scale/bias/mean/var are Flax's names: use from_flax"
            raise ValueError(f"{where}: unexpected names {unknown}; expected Keras BatchNormalization weights "
                             f"{list(_keras_order(center, scale))}{hint}")
        _affine(entries, ("gamma", "beta"), (("scale", scale), ("center", center)), where)
        missing = [n for n in ("moving_mean", "moving_variance") if n not in entries]
        if missing:
            raise ValueError(f"{where}: lacks {missing}; found {sorted(entries)}")
        return entries, where
    if isinstance(weights, Sequence) and not isinstance(weights, (str, bytes)):
        return _keras_list(weights, center, scale, "Keras weights list"), "Keras weights list"
    raise TypeError(f"expected Keras weights as a dict (names or paths -> arrays) or the list of "
                    f"layer.get_weights(), found {type(weights).__name__}")


def from_keras(
    weights: Mapping[str, Any] | Sequence[Any],
    *,
    momentum: float = 0.99,
    epsilon: float = 1e-3,
    values_per_channel: int | None,
    stored_variance: Literal["biased", "unbiased"] = "biased",
    center: bool = True,
    scale: bool = True,
    layer: str | None = None,
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Keras ``BatchNormalization`` weights -> (our state_dict, ``{"eps", "momentum"}``).

    Args:
        weights: ``layer.get_weights()`` (a list: gamma, beta, moving_mean,
            moving_variance, without the ones ``scale``/``center`` turn off); a dict keyed
            by weight names or paths (``"gamma"``, Keras 3 ``"bn/gamma"``, tf-keras
            ``"bn/gamma:0"``, TensorFlow checkpoint ``"bn/gamma/.ATTRIBUTES/VARIABLE_VALUE"``),
            nested or not; or a Keras 3 ``.weights.h5`` layer group (``vars/0``, ``vars/1``, ...).
        momentum, epsilon: the Keras layer's (``momentum`` is a decay: 0.99 -> our 0.01).
        values_per_channel: ``m`` for the variance's ``m / (m - 1)`` (module docstring), or None.
        stored_variance: "unbiased" for tf-keras ``fused=True`` checkpoints.
        center, scale: the Keras layer's flags: ``scale=False`` means no gamma (ours gets
            1), ``center=False`` no beta (ours gets 0).
        layer: the layer's name (or the end of its path) when ``weights`` holds several layers.

    Keras computes ``gamma * (x - moving_mean) / sqrt(moving_variance + epsilon) + beta``.
    """
    _check_variance_kind(stored_variance)
    _flags(center=center, scale=scale)
    eps = _epsilon(epsilon, "epsilon")
    torch_momentum = momentum_from_decay(momentum)
    factor = _correction(values_per_channel) if stored_variance == "biased" else 1.0
    entries, where = _keras_entries(weights, center, scale, layer)
    arrays = {name: _tensor(value, f"{where}: {name}") for name, value in entries.items()}
    _same_length(arrays, where)
    state = _state(arrays.get("gamma"), arrays.get("beta"), arrays["moving_mean"], arrays["moving_variance"] * factor)
    return state, {"eps": eps, "momentum": torch_momentum}


def to_keras(
    state_dict: Mapping[str, Any],
    *,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    values_per_channel: int | None,
    stored_variance: Literal["biased", "unbiased"] = "biased",
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Our BatchNorm state_dict -> (Keras weights, ``{"momentum", "epsilon", "center", "scale"}``).

    The weights dict is in ``layer.get_weights()`` order, so::

        layer = keras.layers.BatchNormalization(**kwargs)
        layer.build((None, C))
        layer.set_weights(list(weights.values()))

    A state_dict without affine parameters (``affine=False``) gives neither gamma nor
    beta, and ``center=False, scale=False``. bfloat16 values are returned as float32
    (NumPy has no bfloat16), other dtypes as they are."""
    _check_variance_kind(stored_variance)
    epsilon = _epsilon(eps, "eps")
    decay = decay_from_momentum(momentum)
    factor = _correction(values_per_channel) if stored_variance == "biased" else 1.0
    ours = _ours(state_dict)
    weights = {}
    if "weight" in ours:
        weights = {"gamma": ours["weight"], "beta": ours["bias"]}
    weights.update(moving_mean=ours["running_mean"], moving_variance=ours["running_var"] / factor)
    affine = "weight" in ours
    return weights, {"momentum": decay, "epsilon": epsilon, "center": affine, "scale": affine}


# --- Flax -------------------------------------------------------------------------------

def _flax_entries(variables: Any, use_scale: bool, use_bias: bool, layer: str | None) -> tuple[dict[str, Any], str]:
    """The Flax layer's {scale?, bias?, mean, var}, and where they came from."""
    if not isinstance(variables, Mapping):
        raise TypeError("expected Flax variables as a dict ({'params': ..., 'batch_stats': ...} from linen, "
                        f"or nnx.state(module)), found {type(variables).__name__}")
    linen = "params" in variables or "batch_stats" in variables
    groups: dict[tuple[str, ...], dict[str, Any]] = {}
    for path, value in _leaves(variables):
        if linen:  # linen variables: collection -> module path -> name; other collections hold no BN state
            if path[0] not in ("params", "batch_stats"):
                continue
            path = path[1:]
        if not path:
            continue
        prefix, name = path[:-1], path[-1]
        if name in groups.setdefault(prefix, {}):
            raise ValueError(f"Flax variables: {name!r} appears twice for layer {_show(prefix)}")
        groups[prefix][name] = value
    prefix, entries = _pick_layer(groups, layer, "Flax variables", lambda names: "mean" in names or "var" in names)
    entries = _present(entries)
    where = f"Flax layer {_show(prefix)}"
    unknown = sorted(set(entries) - set(_FLAX))
    if unknown:
        hint = "; gamma/beta/moving_mean/moving_variance are Keras's names: use from_keras" \
            if set(unknown) & set(_KERAS) else ""
        raise ValueError(f"{where}: unexpected names {unknown}; expected Flax BatchNorm variables "
                         f"params {{scale, bias}} and batch_stats {{mean, var}}{hint}")
    _affine(entries, ("scale", "bias"), (("use_scale", use_scale), ("use_bias", use_bias)), where)
    missing = [n for n in ("mean", "var") if n not in entries]
    if missing:
        raise ValueError(f"{where}: lacks batch_stats {missing}; found {sorted(entries)}")
    return entries, where


def from_flax(
    variables: Mapping[str, Any],
    *,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    values_per_channel: int | None,
    use_scale: bool = True,
    use_bias: bool = True,
    layer: str | None = None,
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Flax ``BatchNorm`` variables (biased variance) -> (our state_dict, ``{"eps", "momentum"}``).

    Args:
        variables: Flax linen variables ``{"params": {"scale", "bias"}, "batch_stats":
            {"mean", "var"}}``, where each collection may nest the layer under its module path
            (``{"params": {"BatchNorm_0": {...}}, ...}``, as ``model.init`` returns); or Flax
            nnx state (``nnx.state(module)``, its ``to_pure_dict()``, or a dict of
            attribute -> variable/array), where the layer sits under its attribute path.
        momentum, epsilon: the Flax layer's (``momentum`` is a decay: 0.99 -> our 0.01).
        values_per_channel: ``m`` for the variance's ``m / (m - 1)`` (module docstring), or None.
        use_scale, use_bias: the Flax layer's flags (False: no scale / bias; ours gets 1 / 0).
        layer: the layer's path (``"Block_0/BatchNorm_0"``, ``"layers/0/bn"``) or its end,
            when ``variables`` holds several BatchNorm layers.
    """
    _flags(use_scale=use_scale, use_bias=use_bias)
    eps = _epsilon(epsilon, "epsilon")
    torch_momentum = momentum_from_decay(momentum)
    factor = _correction(values_per_channel)
    entries, where = _flax_entries(variables, use_scale, use_bias, layer)
    arrays = {name: _tensor(value, f"{where}: {name}") for name, value in entries.items()}
    _same_length(arrays, where)
    state = _state(arrays.get("scale"), arrays.get("bias"), arrays["mean"], arrays["var"] * factor)
    return state, {"eps": eps, "momentum": torch_momentum}


def to_flax(
    state_dict: Mapping[str, Any],
    *,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    values_per_channel: int | None,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """Our BatchNorm state_dict -> (Flax linen variables, ``{"momentum", "epsilon", "use_scale", "use_bias"}``).

    Without affine parameters (``affine=False``) there is no ``params`` collection and
    ``use_scale=use_bias=False``. bfloat16 values are returned as float32."""
    epsilon = _epsilon(eps, "eps")
    decay = decay_from_momentum(momentum)
    factor = _correction(values_per_channel)
    ours = _ours(state_dict)
    variables: dict[str, dict[str, np.ndarray]] = {}
    if "weight" in ours:
        variables["params"] = {"scale": ours["weight"], "bias": ours["bias"]}
    variables["batch_stats"] = {"mean": ours["running_mean"], "var": ours["running_var"] / factor}
    affine = "weight" in ours
    return variables, {"momentum": decay, "epsilon": epsilon, "use_scale": affine, "use_bias": affine}


def _ours(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """running_mean, running_var and (when affine) weight and bias of one BatchNorm's
    state_dict, checked (names, 1-D floats of one length) and copied to NumPy."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"expected a BatchNorm layer's state_dict (a dict), found {type(state_dict).__name__}")
    unknown = sorted(set(state_dict) - set(_OURS))
    if unknown:
        hint = ""
        if any("." in str(k) for k in unknown):
            hint = "; for a layer of a model pass that layer's state_dict (model.bn.state_dict())"
        raise ValueError(f"unexpected keys {unknown} in the state_dict; expected one BatchNorm layer's "
                         f"{list(_OURS)}{hint}")
    missing = {"running_mean", "running_var"} - set(state_dict)
    if missing:
        raise ValueError(
            f"the state_dict lacks {sorted(missing)}: a BatchNorm with track_running_stats=True is needed"
        )
    if ("weight" in state_dict) != ("bias" in state_dict):
        raise ValueError(f"the state_dict has {'weight' if 'weight' in state_dict else 'bias'} without "
                         "the other; expected both (affine=True) or neither (affine=False)")
    names = [n for n in ("weight", "bias", "running_mean", "running_var") if n in state_dict]
    tensors = {n: _tensor(state_dict[n], f"state_dict {n}") for n in names}
    _same_length(tensors, "state_dict")
    return {n: (t.float() if t.dtype == torch.bfloat16 else t).numpy() for n, t in tensors.items()}
