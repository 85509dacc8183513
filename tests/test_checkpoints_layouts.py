"""The Keras / Flax converters read every layout those libraries save, or refuse it with an
error that names what was found and what was expected; no trained value is ever replaced
by a default.

Keras, TensorFlow, JAX and Flax are not dependencies: the layouts are built here from NumPy
arrays with the names and nesting these libraries produce (read from their sources):

- Keras 3 ``layer.get_weights()``: the list [gamma, beta, moving_mean, moving_variance],
  trainable weights first, without gamma when ``scale=False`` and beta when ``center=False``
  (keras/src/layers/layer.py ``weights``); ``{v.path: v.numpy() for v in layer.weights}``
  gives "batch_normalization/gamma"; tf-keras names carry ":0".
- Keras 3 ``.weights.h5``: ``layers/<layer>/vars/0, 1, ...`` in the same order
  (``Layer.save_own_variables``), next to other layers and ``optimizer/vars``.
- tf-keras legacy ``.h5``: ``<layer>/<layer>/gamma:0``; TensorFlow checkpoints
  (``tf.train.list_variables``): ``<object path>/gamma/.ATTRIBUTES/VARIABLE_VALUE``, next to
  ``save_counter`` and ``_CHECKPOINTABLE_OBJECT_GRAPH``.
- Flax linen ``model.init``: ``{"params": {"BatchNorm_0": {"scale", "bias"}, ...},
  "batch_stats": {"BatchNorm_0": {"mean", "var"}}}`` (flax/linen/normalization.py).
- Flax nnx ``nnx.state(model)``: attribute path -> variables holding the array in ``.value``
  (``Param`` scale/bias, ``BatchStat`` mean/var; flax/nnx/nn/normalization.py); list
  attributes give integer keys; ``to_pure_dict()`` gives the raw arrays.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import batchnorm
from batchnorm import checkpoints

C = 3
GAMMA = np.array([0.5, 1.5, 2.0], dtype=np.float32)
BETA = np.array([0.1, -0.2, 0.3], dtype=np.float32)
MEAN = np.array([1.0, -2.0, 3.0], dtype=np.float32)
VAR = np.array([0.25, 4.0, 9.0], dtype=np.float32)


class Variable:
    """The shape of Flax nnx's ``Param``/``BatchStat``/``VariableState`` and Keras 3's
    ``Variable``: the array is in ``.value``."""

    def __init__(self, value):
        self.value = value


class JaxLike:
    """An array type of another library (JAX, TensorFlow, h5py datasets): only ``__array__``."""

    def __init__(self, a: np.ndarray):
        self._a = a

    def __array__(self, dtype=None, copy=None):
        return self._a if dtype is None else self._a.astype(dtype)


def assert_state(state, gamma=GAMMA, beta=BETA, mean=MEAN, var=VAR):
    """The converted state holds exactly the given arrays (values_per_channel=None)."""
    for name, expected in [("weight", gamma), ("bias", beta), ("running_mean", mean), ("running_var", var)]:
        np.testing.assert_array_equal(state[name].float().numpy(), np.asarray(expected, dtype=np.float32), err_msg=name)
    bn = batchnorm.BatchNorm2d(C)
    bn.load_state_dict(state)  # loads into our module as it is


def keras(**kw):
    return checkpoints.from_keras(values_per_channel=None, **kw)


def flax(**kw):
    return checkpoints.from_flax(values_per_channel=None, **kw)


# --- Keras ------------------------------------------------------------------------------

@pytest.mark.parametrize("weights", [
    pytest.param({"batch_normalization/gamma": GAMMA, "batch_normalization/beta": BETA,
                  "batch_normalization/moving_mean": MEAN, "batch_normalization/moving_variance": VAR},
                 id="keras3-variable-paths"),
    pytest.param({"gamma": GAMMA, "beta": BETA, "moving_mean": MEAN, "moving_variance": VAR}, id="names"),
    pytest.param({"bn/gamma:0": GAMMA, "bn/beta:0": BETA, "bn/moving_mean:0": MEAN, "bn/moving_variance:0": VAR},
                 id="tf-keras-names"),
    pytest.param({"bn": {"bn": {"gamma:0": GAMMA, "beta:0": BETA, "moving_mean:0": MEAN, "moving_variance:0": VAR}}},
                 id="tf-keras-legacy-h5"),
    pytest.param({"layers": {"batch_normalization": {"vars": {"0": GAMMA, "1": BETA, "2": MEAN, "3": VAR}}}},
                 id="keras3-weights-h5"),
    pytest.param({"0": GAMMA, "1": BETA, "2": MEAN, "3": VAR}, id="keras3-weights-h5-vars-group"),
    pytest.param({"_CHECKPOINTABLE_OBJECT_GRAPH": b"\x0a\x10", "save_counter/.ATTRIBUTES/VARIABLE_VALUE": np.int64(1),
                  **{f"layer_with_weights-0/{n}/.ATTRIBUTES/VARIABLE_VALUE": a
                     for n, a in [("gamma", GAMMA), ("beta", BETA), ("moving_mean", MEAN), ("moving_variance", VAR)]},
                  "layer_with_weights-0/gamma/.OPTIMIZER_SLOT/optimizer/m/.ATTRIBUTES/VARIABLE_VALUE": GAMMA * 0},
                 id="tf-checkpoint"),
    pytest.param([GAMMA, BETA, MEAN, VAR], id="get_weights"),
    pytest.param((Variable(GAMMA), Variable(BETA), Variable(MEAN), Variable(VAR)), id="keras3-variables"),
])
def test_keras_layouts_are_read_exactly(weights) -> None:
    state, kwargs = keras(weights=weights)
    assert_state(state)
    assert kwargs == {"eps": 1e-3, "momentum": pytest.approx(0.01)}


def test_keras_without_gamma_or_beta_needs_the_layer_flags() -> None:
    ones, zeros = np.ones(C, np.float32), np.zeros(C, np.float32)
    # scale=False: get_weights() is [beta, moving_mean, moving_variance]
    assert_state(keras(weights=[BETA, MEAN, VAR], scale=False)[0], gamma=ones)
    assert_state(keras(weights=[GAMMA, MEAN, VAR], center=False)[0], beta=zeros)
    assert_state(keras(weights={"layers": {"bn": {"vars": {"0": MEAN, "1": VAR}}}}, center=False, scale=False)[0],
                 gamma=ones, beta=zeros)
    with pytest.raises(ValueError, match=r"found 3.*scale=False \(beta, moving_mean, moving_variance\) or "
                                         r"center=False \(gamma, moving_mean, moving_variance\): pass that flag"):
        keras(weights=[BETA, MEAN, VAR])
    # a dict without gamma is not silently given gamma = 1
    with pytest.raises(ValueError, match=r"no 'gamma' found .* since scale=True; pass scale=False"):
        keras(weights={"beta": BETA, "moving_mean": MEAN, "moving_variance": VAR})
    with pytest.raises(ValueError, match=r"found 'beta' but center=False"):
        keras(weights={"beta": BETA, "moving_mean": MEAN, "moving_variance": VAR}, center=False, scale=False)
    with pytest.raises(TypeError, match="scale must be True or False"):
        keras(weights=[BETA, MEAN, VAR], scale="False")


def test_keras_flag_names_used_as_weight_names_are_refused() -> None:
    """{"scale": ..., "center": ...} used to give gamma = 1 and beta = 0 silently."""
    with pytest.raises(ValueError, match=r"unexpected names \['center', 'scale'\].*expected Keras BatchNormalization "
                                         r"weights \['gamma', 'beta', 'moving_mean', 'moving_variance'\].*"
                                         r"'scale' and 'center' are the layer's flags"):
        keras(weights={"scale": GAMMA, "center": BETA, "moving_mean": MEAN, "moving_variance": VAR})
    with pytest.raises(ValueError, match="Flax's names: use from_flax"):
        keras(weights={"scale": GAMMA, "bias": BETA, "mean": MEAN, "var": VAR})


def test_keras_several_layers_need_layer() -> None:
    other = GAMMA + 10
    h5 = {"layers": {"dense": {"vars": {"0": np.ones((4, C), np.float32), "1": BETA}},
                     "batch_normalization": {"vars": {"0": GAMMA, "1": BETA, "2": MEAN, "3": VAR}},
                     "batch_normalization_1": {"vars": {"0": other, "1": BETA, "2": MEAN, "3": VAR}}},
          "optimizer": {"vars": {"0": np.int64(3)}}}
    with pytest.raises(ValueError, match=r"the weights of 4 layers \(layers/dense, layers/batch_normalization, "
                                         r"layers/batch_normalization_1, optimizer\); pass layer='<name>'"):
        keras(weights=h5)
    assert_state(keras(weights=h5, layer="batch_normalization")[0])
    assert_state(keras(weights=h5, layer="layers/batch_normalization_1")[0], gamma=other)
    with pytest.raises(ValueError, match=r"layer='bn' matches none; expected exactly one of the layers found: layers/dense"):
        keras(weights=h5, layer="bn")
    names = {"bn1/gamma:0": GAMMA, "bn1/beta:0": BETA, "bn1/moving_mean:0": MEAN, "bn1/moving_variance:0": VAR,
             "bn2/gamma:0": other, "bn2/beta:0": BETA, "bn2/moving_mean:0": MEAN, "bn2/moving_variance:0": VAR}
    with pytest.raises(ValueError, match=r"2 layers \(bn1, bn2\)"):
        keras(weights=names)  # used to keep the last layer's values silently
    assert_state(keras(weights=names, layer="bn2")[0], gamma=other)


def test_a_layer_with_a_missing_statistic_never_takes_its_neighbours_values() -> None:
    """A layer whose statistics are stored as None is still a layer: with a complete layer
    beside it the converter asks which one, never reads the neighbour silently (found by
    the hypothesis tests below)."""
    complete_keras = {"gamma": GAMMA, "beta": BETA, "moving_mean": MEAN, "moving_variance": VAR}
    with pytest.raises(ValueError, match=r"2 layers \(\(top level\), other\)"):
        keras(weights={"moving_mean": None, "moving_variance": VAR, "other": complete_keras})
    complete_flax = {"scale": GAMMA, "bias": BETA, "mean": MEAN, "var": VAR}
    with pytest.raises(ValueError, match=r"2 layers \(\(top level\), other\)"):
        batchnorm.checkpoints.from_flax({"bias": BETA, "mean": None, "var": None, "other": complete_flax},
                                        values_per_channel=None)


def test_keras_malformed_inputs_say_what_was_expected() -> None:
    with pytest.raises(TypeError, match="expected Keras weights as a dict .* or the list of layer.get_weights"):
        keras(weights=np.stack([GAMMA, BETA, MEAN, VAR]))
    with pytest.raises(TypeError, match="found NoneType"):
        keras(weights=None)
    with pytest.raises(TypeError, match=r"moving_variance: expected float16, bfloat16, float32 or float64 values, found <U5"):
        keras(weights=[GAMMA, BETA, MEAN, "hello"])
    with pytest.raises(TypeError, match=r"gamma: expected .* values, found int64"):
        keras(weights=[np.arange(C), BETA, MEAN, VAR])
    with pytest.raises(TypeError, match=r"beta: expected float16, bfloat16, float32 or float64 values, found object"):
        keras(weights=[GAMMA, object(), MEAN, VAR])
    with pytest.raises(ValueError, match=r"moving_mean: expected a 1-D array of one value per channel, found shape \(1, 3\)"):
        keras(weights=[GAMMA, BETA, MEAN[None], VAR])
    with pytest.raises(ValueError, match=r"found lengths \{'gamma': 3, 'beta': 3, 'moving_mean': 3, 'moving_variance': 2\}"):
        keras(weights={"gamma": GAMMA, "beta": BETA, "moving_mean": MEAN, "moving_variance": VAR[:2]})
    with pytest.raises(ValueError, match=r"expected numbered weights 0 .. n-1, found \['0', '1', '3'\]"):
        keras(weights={"vars": {"0": GAMMA, "1": MEAN, "3": VAR}}, scale=False)
    with pytest.raises(ValueError, match=r"'gamma' appears twice"):
        keras(weights={"bn/gamma:0": GAMMA, "bn": {"gamma": GAMMA}, "bn/beta": BETA})
    for bad, message in [(0.0, "epsilon must be a finite number > 0"), (float("nan"), "finite number > 0"),
                         ("1e-3", "epsilon must be a number")]:
        with pytest.raises((ValueError, TypeError), match=message):
            keras(weights=[GAMMA, BETA, MEAN, VAR], epsilon=bad)
    with pytest.raises(ValueError, match=r"decay momentum must lie in \[0, 1\], got nan"):
        keras(weights=[GAMMA, BETA, MEAN, VAR], momentum=float("nan"))
    with pytest.raises(TypeError, match="momentum .* must be a number"):
        keras(weights=[GAMMA, BETA, MEAN, VAR], momentum="0.99")
    with pytest.raises(ValueError, match="values_per_channel must be an integer >= 2"):
        checkpoints.from_keras([GAMMA, BETA, MEAN, VAR], values_per_channel=float("inf"))


# --- arrays and dtypes ------------------------------------------------------------------

@pytest.mark.parametrize(("make", "dtype"), [
    pytest.param(lambda a: torch.nn.Parameter(torch.from_numpy(a.copy())), torch.float32, id="torch-parameter"),
    pytest.param(lambda a: JaxLike(a), torch.float32, id="__array__"),
    pytest.param(lambda a: Variable(JaxLike(a)), torch.float32, id="variable-of-jax-array"),
    pytest.param(lambda a: a.astype(">f4"), torch.float32, id="big-endian"),
    pytest.param(lambda a: a.tolist(), torch.float64, id="python-list"),
])
def test_array_kinds(make, dtype) -> None:
    inputs = [make(a) for a in (GAMMA, BETA, MEAN, VAR)]
    state, _ = keras(weights=inputs)
    assert_state(state)
    assert state["weight"].dtype == dtype and not state["weight"].requires_grad
    if isinstance(inputs[0], torch.Tensor):  # a copy: the source is not changed through the result
        state["weight"].add_(1)
        np.testing.assert_array_equal(inputs[0].detach().numpy(), GAMMA)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_numpy_dtypes_are_kept(dtype) -> None:
    state, _ = flax(variables={"params": {"scale": GAMMA.astype(dtype), "bias": BETA.astype(dtype)},
                               "batch_stats": {"mean": MEAN.astype(dtype), "var": VAR.astype(dtype)}})
    assert state["running_var"].dtype == torch.from_numpy(np.zeros(1, dtype)).dtype
    for name, a in [("weight", GAMMA), ("bias", BETA), ("running_mean", MEAN), ("running_var", VAR)]:
        np.testing.assert_array_equal(state[name].numpy(), a.astype(dtype))


def test_bfloat16_from_torch_and_from_jax() -> None:
    values = [torch.from_numpy(a).bfloat16() for a in (GAMMA, BETA, MEAN, VAR)]
    state, _ = keras(weights=values)
    for name, v in zip(("weight", "bias", "running_mean", "running_var"), values):
        assert state[name].dtype == torch.bfloat16 and torch.equal(state[name], v)
    ml_dtypes = pytest.importorskip("ml_dtypes")  # what JAX's np.asarray gives for bfloat16
    state, _ = keras(weights=[a.astype(ml_dtypes.bfloat16) for a in (GAMMA, BETA, MEAN, VAR)])
    for name, v in zip(("weight", "bias", "running_mean", "running_var"), values):
        assert state[name].dtype == torch.bfloat16 and torch.equal(state[name], v)  # same bits


def test_variance_correction_keeps_the_dtype() -> None:
    state, _ = checkpoints.from_keras([GAMMA, BETA, MEAN, VAR.astype(np.float16)], values_per_channel=5)
    assert state["running_var"].dtype == torch.float16
    np.testing.assert_allclose(state["running_var"].numpy(), VAR * 5 / 4, rtol=1e-3)


# --- Flax -------------------------------------------------------------------------------

def linen_model(scale=GAMMA):
    """``model.init`` of a Dense -> BatchNorm linen model."""
    return {"params": {"Dense_0": {"kernel": np.ones((4, C), np.float32), "bias": np.zeros(C, np.float32)},
                       "BatchNorm_0": {"scale": scale, "bias": BETA}},
            "batch_stats": {"BatchNorm_0": {"mean": MEAN, "var": VAR}}}


def nnx_state(wrap=Variable):
    """``nnx.state(model)`` of a model with ``self.linear``, ``self.bn`` and ``self.blocks = [Block(...)]``."""
    bn = {"bias": wrap(BETA), "mean": wrap(MEAN), "scale": wrap(GAMMA), "var": wrap(VAR)}
    other = {"bias": wrap(BETA), "mean": wrap(MEAN), "scale": wrap(GAMMA + 10), "var": wrap(VAR)}
    return {"linear": {"kernel": wrap(np.ones((4, C), np.float32)), "bias": wrap(BETA)},
            "bn": bn, "blocks": {0: {"bn": other}}}


@pytest.mark.parametrize("variables", [
    pytest.param({"params": {"scale": GAMMA, "bias": BETA}, "batch_stats": {"mean": MEAN, "var": VAR}}, id="linen-layer"),
    pytest.param(linen_model(), id="linen-model"),
    pytest.param({"params": {"Block_0": {"BatchNorm_0": {"scale": GAMMA, "bias": BETA}}},
                  "batch_stats": {"Block_0": {"BatchNorm_0": {"mean": MEAN, "var": VAR}}}}, id="linen-nested"),
    pytest.param({"params": {"bn": {"scale": GAMMA, "bias": BETA}}, "batch_stats": {"bn": {"mean": MEAN, "var": VAR}},
                  "intermediates": {"bn": {"__call__": (np.zeros((2, C)),)}}}, id="linen-with-other-collections"),
    pytest.param({"bias": Variable(BETA), "mean": Variable(MEAN), "scale": Variable(GAMMA), "var": Variable(VAR)},
                 id="nnx-layer-state"),
    pytest.param({"bias": BETA, "mean": MEAN, "scale": GAMMA, "var": VAR}, id="nnx-pure-dict"),
    pytest.param({"params": {"bn": {"scale": Variable(GAMMA), "bias": Variable(BETA)}},
                  "batch_stats": {"bn": {"mean": Variable(MEAN), "var": Variable(VAR)}}}, id="nnx-split-by-filter"),
])
def test_flax_layouts_are_read_exactly(variables) -> None:
    state, kwargs = flax(variables=variables)
    assert_state(state)
    assert kwargs == {"eps": 1e-5, "momentum": pytest.approx(0.01)}


def test_flax_params_nested_by_layer_name_are_not_replaced_by_defaults() -> None:
    """params -> layer -> scale/bias with flat batch_stats used to give gamma = 1, beta = 0."""
    with pytest.raises(ValueError, match=r"Flax layer \(top level\): no 'scale' found \(names found: \['mean', 'var'\]\); "
                                         r"expected it since use_scale=True"):
        flax(variables={"params": {"bn": {"scale": GAMMA, "bias": BETA}}, "batch_stats": {"mean": MEAN, "var": VAR}})


def test_flax_several_layers_and_flags() -> None:
    variables = {"params": {"BatchNorm_0": {"scale": GAMMA, "bias": BETA}, "BatchNorm_1": {"scale": GAMMA + 10, "bias": BETA}},
                 "batch_stats": {"BatchNorm_0": {"mean": MEAN, "var": VAR}, "BatchNorm_1": {"mean": MEAN, "var": VAR}}}
    with pytest.raises(ValueError, match=r"the weights of 2 layers \(BatchNorm_0, BatchNorm_1\); pass layer="):
        flax(variables=variables)
    assert_state(flax(variables=variables, layer="BatchNorm_1")[0], gamma=GAMMA + 10)
    state = nnx_state()
    with pytest.raises(ValueError, match=r"2 layers \(bn, blocks/0/bn\)"):
        flax(variables=state)
    assert_state(flax(variables=state, layer="blocks/0/bn")[0], gamma=GAMMA + 10)
    assert_state(flax(variables=nnx_state(wrap=lambda a: a), layer="bn")[0])  # to_pure_dict()
    # use_scale=False, use_bias=False: linen has no params for the layer, nnx keeps None
    ones, zeros = np.ones(C, np.float32), np.zeros(C, np.float32)
    no_affine = {"params": {"Dense_0": {"kernel": np.ones((4, C), np.float32)}},
                 "batch_stats": {"BatchNorm_0": {"mean": MEAN, "var": VAR}}}
    assert_state(flax(variables=no_affine, use_scale=False, use_bias=False)[0], gamma=ones, beta=zeros)
    assert_state(flax(variables={"scale": None, "bias": None, "mean": Variable(MEAN), "var": Variable(VAR)},
                      use_scale=False, use_bias=False)[0], gamma=ones, beta=zeros)
    with pytest.raises(ValueError, match=r"no 'scale' found .* pass use_scale=False"):
        flax(variables=no_affine)
    with pytest.raises(ValueError, match=r"found 'scale' but use_scale=False"):
        flax(variables=linen_model(), use_scale=False)


def test_flax_malformed_inputs_say_what_was_expected() -> None:
    with pytest.raises(ValueError, match=r"unexpected names \['beta', 'gamma'\].*Keras's names: use from_keras"):
        flax(variables={"gamma": GAMMA, "beta": BETA, "mean": MEAN, "var": VAR})
    with pytest.raises(ValueError, match=r"lacks batch_stats \['mean', 'var'\]; found \['bias', 'scale'\]"):
        flax(variables={"params": {"scale": GAMMA, "bias": BETA}})
    with pytest.raises(ValueError, match=r"no BatchNorm layer found; found Dense_0: \['bias', 'kernel'\]; "
                                         r"LayerNorm_0: \['bias', 'scale'\]"):
        flax(variables={"params": {"Dense_0": {"kernel": GAMMA, "bias": BETA}, "LayerNorm_0": {"scale": GAMMA, "bias": BETA}}})
    with pytest.raises(TypeError, match=r"expected Flax variables as a dict .* found list"):
        flax(variables=[GAMMA, BETA, MEAN, VAR])
    with pytest.raises(ValueError, match=r"Flax layer BatchNorm_0: var: expected a 1-D array .* found shape \(\)"):
        flax(variables={"params": {"BatchNorm_0": {"scale": GAMMA, "bias": BETA}},
                        "batch_stats": {"BatchNorm_0": {"mean": MEAN, "var": np.float32(1.0)}}})
    with pytest.raises(ValueError, match=r"'mean' appears twice"):
        flax(variables={"params": {"mean": MEAN}, "batch_stats": {"mean": MEAN, "var": VAR}}, use_scale=False, use_bias=False)


# --- to_keras / to_flax ------------------------------------------------------------------

def test_to_keras_checks_the_state_dict() -> None:
    bn = batchnorm.BatchNorm1d(C)
    bad = {**bn.state_dict(), "weight": torch.ones(C + 1)}
    with pytest.raises(ValueError, match=r"found lengths \{'weight': 4, 'bias': 3, 'running_mean': 3, 'running_var': 3\}"):
        checkpoints.to_keras(bad, values_per_channel=None)
    with pytest.raises(ValueError, match=r"unexpected keys \['0.bias', .*pass that layer's state_dict"):
        checkpoints.to_keras(torch.nn.Sequential(batchnorm.BatchNorm1d(C)).state_dict(), values_per_channel=None)
    with pytest.raises(ValueError, match="weight without the other"):
        checkpoints.to_flax({k: v for k, v in bn.state_dict().items() if k != "bias"}, values_per_channel=None)
    with pytest.raises(TypeError, match="running_var: expected .* found torch.int64"):
        checkpoints.to_keras({**bn.state_dict(), "running_var": torch.ones(C, dtype=torch.long)}, values_per_channel=None)
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        checkpoints.to_keras(bn.state_dict(), eps=-1.0, values_per_channel=None)
    with pytest.raises(TypeError, match="expected a BatchNorm layer's state_dict"):
        checkpoints.to_flax(bn, values_per_channel=None)


def test_affine_false_round_trips_without_inventing_gamma() -> None:
    bn = batchnorm.BatchNorm2d(C, affine=False)
    bn.running_mean.copy_(torch.from_numpy(MEAN))
    bn.running_var.copy_(torch.from_numpy(VAR))
    weights, kwargs = checkpoints.to_keras(bn.state_dict(), values_per_channel=None)
    assert list(weights) == ["moving_mean", "moving_variance"] and kwargs["center"] is kwargs["scale"] is False
    state, _ = checkpoints.from_keras(list(weights.values()), values_per_channel=None,
                                      center=kwargs["center"], scale=kwargs["scale"])
    assert_state(state, gamma=np.ones(C), beta=np.zeros(C))
    variables, kwargs = checkpoints.to_flax(bn.state_dict(), values_per_channel=None)
    assert list(variables) == ["batch_stats"] and kwargs["use_scale"] is kwargs["use_bias"] is False
    state, _ = checkpoints.from_flax(variables, values_per_channel=None, use_scale=False, use_bias=False)
    np.testing.assert_array_equal(state["running_var"].numpy(), VAR)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_to_keras_lengths_and_dtypes(dtype) -> None:
    bn = batchnorm.BatchNorm1d(C, dtype=dtype) if dtype in (torch.float32, torch.float64) else batchnorm.BatchNorm1d(C).to(dtype)
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(GAMMA))
        bn.running_var.copy_(torch.from_numpy(VAR))
    weights, _ = checkpoints.to_keras(bn.state_dict(), values_per_channel=None)
    assert {k: v.shape for k, v in weights.items()} == {k: (C,) for k in ("gamma", "beta", "moving_mean", "moving_variance")}
    expected = np.float32 if dtype == torch.bfloat16 else torch.empty(0, dtype=dtype).numpy().dtype
    assert all(v.dtype == expected for v in weights.values())
    np.testing.assert_array_equal(weights["gamma"], GAMMA.astype(expected))
    np.testing.assert_array_equal(weights["moving_variance"], VAR.astype(expected))


def test_library_doc_example_runs() -> None:
    """docs/library.md "Weights from Keras and Flax": its example runs as written."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "library.md").read_text()
    section = text.split("## Weights from Keras and Flax", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/library.md", "exec"), {})


# --- any layout: the exact values or a clean error (hypothesis) --------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

KERAS_NAMES = ("gamma", "beta", "moving_mean", "moving_variance")
FLAX_NAMES = ("scale", "bias", "mean", "var")
OTHER_NAMES = ["scale", "center", "bias", "mean", "gamma", "moving_mean", "kernel", "0"]


@st.composite
def arrays(draw, n: int):
    """A stored value: mostly a 1-D float array of length ``n``, sometimes anything else."""
    kind = draw(st.sampled_from(["f32"] * 40 + ["f16", "f64", "bf16-torch", "list"] * 3 +
                                ["other-length", "int", "2d", "scalar", "str", "none"]))
    values = np.array(draw(st.lists(st.floats(-4, 4, width=16), min_size=n, max_size=n)), dtype=np.float32)
    return {"f32": values, "f16": values.astype(np.float16), "f64": values.astype(np.float64),
            "bf16-torch": torch.from_numpy(values).bfloat16(), "list": values.tolist(),
            "other-length": np.ones(n + 1, np.float32), "int": values.astype(np.int64), "2d": values[None],
            "scalar": np.float32(1.0), "str": "abc", "none": None}[kind]


@st.composite
def layouts(draw, names: tuple[str, ...]):
    """One layer's dict (gamma/beta each maybe missing, sometimes a wrong name more), nested
    under a random path, sometimes beside a second layer with the same names."""
    n = draw(st.sampled_from([1, 2, 3]))
    present = [name for i, name in enumerate(names) if i >= 2 and draw(st.integers(0, 9)) > 0 or draw(st.booleans())]
    if draw(st.integers(0, 4)) == 0:
        present.append(draw(st.sampled_from(OTHER_NAMES)))
    layer = {name: draw(arrays(n)) for name in dict.fromkeys(present)}
    path = draw(st.lists(st.sampled_from(["params", "batch_stats", "bn", "layers", "0"]), max_size=2))
    tree: dict = layer
    for part in reversed(path):
        tree = {part: tree}
    if draw(st.integers(0, 4)) == 0:
        tree = {**tree, "other": {name: draw(arrays(n)) for name in layer}}
    flags = (names[0] in layer, names[1] in layer)  # the layer's flags, or (1 in 4) random ones
    if draw(st.integers(0, 3)) == 0:
        flags = (draw(st.booleans()), draw(st.booleans()))
    return tree, layer, flags


def exact_or_refused(convert, layer: dict, names: tuple[str, str, str, str], flags: tuple[bool, bool]) -> None:
    """``convert()`` returns the layer's values exactly, or raises ValueError / TypeError."""
    try:
        state, _ = convert()
    except (ValueError, TypeError):
        return
    gamma, beta, mean, var = names
    found = {name: layer[name] for name in names if layer.get(name) is not None}
    assert set(layer) - {name for name, value in layer.items() if value is None} <= set(names)  # no unknown name
    assert (gamma in found) == flags[0] and (beta in found) == flags[1]  # never a default for a stored value
    for ours, theirs in [("weight", gamma), ("bias", beta), ("running_mean", mean), ("running_var", var)]:
        if theirs in found:
            value = found[theirs]
            expected = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
            assert state[ours].dtype == expected.dtype and torch.equal(state[ours], expected), ours
        else:
            assert torch.equal(state[ours], torch.full_like(state["running_mean"], float(ours == "weight"))), ours


@settings(max_examples=300, deadline=None)
@given(layouts(KERAS_NAMES))
def test_any_keras_layout_is_read_exactly_or_refused(layout) -> None:
    tree, layer, (scale, center) = layout
    exact_or_refused(lambda: keras(weights=tree, center=center, scale=scale), layer, KERAS_NAMES, (scale, center))


@settings(max_examples=300, deadline=None)
@given(layouts(FLAX_NAMES))
def test_any_flax_layout_is_read_exactly_or_refused(layout) -> None:
    tree, layer, (use_scale, use_bias) = layout
    exact_or_refused(lambda: flax(variables=tree, use_scale=use_scale, use_bias=use_bias), layer, FLAX_NAMES,
                     (use_scale, use_bias))
