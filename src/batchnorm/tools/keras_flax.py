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

Every function returns the converted weights and the layer arguments in the target's
convention, e.g.::

    state, kwargs = batchnorm.checkpoints.from_keras(layer.get_weights(), momentum=0.99,
                                                     epsilon=1e-3, values_per_channel=32*14*14)
    bn = batchnorm.BatchNorm2d(len(state["weight"]), **kwargs)   # eps=1e-3, momentum=0.01
    bn.load_state_dict(state)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "momentum_from_decay", "decay_from_momentum",
    "from_keras", "to_keras", "from_flax", "to_flax",
]

_KERAS = ("gamma", "beta", "moving_mean", "moving_variance")


def momentum_from_decay(decay: float) -> float:
    """Keras/Flax momentum (decay, weight of the old value) -> ours (weight of the new)."""
    if not 0 <= decay <= 1:
        raise ValueError(f"a decay momentum must lie in [0, 1], got {decay}")
    return 1.0 - decay


def decay_from_momentum(momentum: float | None) -> float:
    """Our momentum (weight of the new batch) -> Keras/Flax decay."""
    if momentum is None:
        raise ValueError(
            "momentum=None (PyTorch's cumulative average) has no Keras/Flax equivalent; "
            "pass the momentum to use there"
        )
    if not 0 <= momentum <= 1:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
    return 1.0 - momentum


def _correction(values_per_channel: int | None) -> float:
    """m / (m - 1), or 1 for None."""
    if values_per_channel is None:
        return 1.0
    if int(values_per_channel) != values_per_channel or values_per_channel < 2:
        raise ValueError(
            f"values_per_channel must be an integer >= 2 (batch size x spatial size), "
            f"got {values_per_channel}"
        )
    return values_per_channel / (values_per_channel - 1)


def _tensor(a: Any) -> Tensor:
    return torch.as_tensor(np.asarray(a)).clone()


def _state(gamma, beta, mean, var_unbiased) -> dict[str, Tensor]:
    mean = _tensor(mean)
    c = mean.shape
    out = {
        "weight": _tensor(gamma) if gamma is not None else torch.ones(c, dtype=mean.dtype),
        "bias": _tensor(beta) if beta is not None else torch.zeros(c, dtype=mean.dtype),
        "running_mean": mean,
        "running_var": var_unbiased,
        "num_batches_tracked": torch.tensor(0, dtype=torch.long),
    }
    for name, t in out.items():
        if name != "num_batches_tracked" and t.shape != c:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(c)}")
    return out


def _check_variance_kind(stored_variance: str) -> None:
    if stored_variance not in ("biased", "unbiased"):
        raise ValueError(f"stored_variance must be 'biased' or 'unbiased', got {stored_variance!r}")


def _keras_entries(weights: Mapping[str, Any] | Sequence[Any]) -> dict[str, Any]:
    """Keras weights as {gamma, beta, moving_mean, moving_variance}, from a dict (keys may
    be full variable names such as 'bn/gamma:0') or ``layer.get_weights()`` (4 arrays)."""
    if isinstance(weights, Mapping):
        entries = {}
        for key, value in weights.items():
            short = str(key).split("/")[-1].split(":")[0]
            if short in _KERAS:
                entries[short] = value
        missing = {"moving_mean", "moving_variance"} - set(entries)
        if missing:
            raise ValueError(f"Keras BatchNormalization weights lack {sorted(missing)}; got keys {list(weights)}")
        return entries
    if len(weights) != 4:
        raise ValueError(
            "a list of Keras weights must be [gamma, beta, moving_mean, moving_variance] "
            f"(4 arrays), got {len(weights)}; pass a dict for layers without gamma or beta"
        )
    return dict(zip(_KERAS, weights))


def from_keras(
    weights: Mapping[str, Any] | Sequence[Any],
    *,
    momentum: float = 0.99,
    epsilon: float = 1e-3,
    values_per_channel: int | None,
    stored_variance: Literal["biased", "unbiased"] = "biased",
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Keras ``BatchNormalization`` weights -> (our state_dict, ``{"eps", "momentum"}``).

    ``momentum``/``epsilon`` are the Keras layer's (decay convention). A missing gamma
    (``scale=False``) becomes 1, a missing beta (``center=False``) 0."""
    _check_variance_kind(stored_variance)
    w = _keras_entries(weights)
    factor = _correction(values_per_channel) if stored_variance == "biased" else 1.0
    var = _tensor(w["moving_variance"]) * factor
    state = _state(w.get("gamma"), w.get("beta"), w["moving_mean"], var)
    return state, {"eps": float(epsilon), "momentum": momentum_from_decay(momentum)}


def to_keras(
    state_dict: Mapping[str, Tensor],
    *,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    values_per_channel: int | None,
    stored_variance: Literal["biased", "unbiased"] = "biased",
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Our BatchNorm state_dict -> (Keras weights dict, ``{"momentum", "epsilon"}``).

    ``layer.set_weights([w[k] for k in ("gamma", "beta", "moving_mean", "moving_variance")])``
    loads them. A state_dict without affine parameters gives gamma 1 and beta 0."""
    _check_variance_kind(stored_variance)
    mean, var, gamma, beta = _ours(state_dict)
    factor = _correction(values_per_channel) if stored_variance == "biased" else 1.0
    weights = {
        "gamma": gamma, "beta": beta, "moving_mean": mean, "moving_variance": var / factor,
    }
    return weights, {"momentum": decay_from_momentum(momentum), "epsilon": float(eps)}


def from_flax(
    variables: Mapping[str, Mapping[str, Any]],
    *,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    values_per_channel: int | None,
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Flax ``nn.BatchNorm`` variables ``{"params": {"scale", "bias"}, "batch_stats":
    {"mean", "var"}}`` (biased variance) -> (our state_dict, ``{"eps", "momentum"}``)."""
    if "batch_stats" not in variables or not {"mean", "var"} <= set(variables["batch_stats"]):
        raise ValueError(
            "Flax BatchNorm variables need batch_stats with 'mean' and 'var'; got "
            f"{ {k: list(v) for k, v in variables.items()} }"
        )
    params = variables.get("params", {})
    stats = variables["batch_stats"]
    var = _tensor(stats["var"]) * _correction(values_per_channel)
    state = _state(params.get("scale"), params.get("bias"), stats["mean"], var)
    return state, {"eps": float(epsilon), "momentum": momentum_from_decay(momentum)}


def to_flax(
    state_dict: Mapping[str, Tensor],
    *,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    values_per_channel: int | None,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, float]]:
    """Our BatchNorm state_dict -> (Flax variables, ``{"momentum", "epsilon"}``)."""
    mean, var, gamma, beta = _ours(state_dict)
    variables = {
        "params": {"scale": gamma, "bias": beta},
        "batch_stats": {"mean": mean, "var": var / _correction(values_per_channel)},
    }
    return variables, {"momentum": decay_from_momentum(momentum), "epsilon": float(eps)}


def _ours(state_dict: Mapping[str, Tensor]) -> tuple[np.ndarray, ...]:
    """(running_mean, running_var, weight, bias) of our state_dict as float arrays."""
    missing = {"running_mean", "running_var"} - set(state_dict)
    if missing:
        raise ValueError(
            f"the state_dict lacks {sorted(missing)}: a BatchNorm with "
            "track_running_stats=True is needed"
        )
    mean = state_dict["running_mean"].detach().cpu().numpy().copy()
    var = state_dict["running_var"].detach().cpu().numpy().copy()
    gamma = state_dict.get("weight")
    beta = state_dict.get("bias")
    gamma = np.ones_like(mean) if gamma is None else gamma.detach().cpu().numpy().copy()
    beta = np.zeros_like(mean) if beta is None else beta.detach().cpu().numpy().copy()
    return mean, var, gamma, beta
