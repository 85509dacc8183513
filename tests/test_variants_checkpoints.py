"""Checkpoint converters between Keras / Flax conventions and ours, tested on dicts built
to those conventions: a Keras/Flax-style training loop (decay momentum, biased stored
variance) written out in NumPy, converted, must equal our BatchNorm trained on the same
batches; and back. With values_per_channel=None eval outputs stay the source's."""

import numpy as np
import pytest
import torch

import batchnorm
from batchnorm import checkpoints

BATCHES = [np.random.default_rng(s).normal(1.5, 2.0, size=(8, 3, 2, 2)) for s in range(40)]
M = 8 * 2 * 2  # values per channel per batch
DECAY = 0.6


def keras_style_running_stats():
    """Keras 3 / Flax's update: moving = decay * moving + (1 - decay) * batch, biased var."""
    mean, var = np.zeros(3), np.ones(3)
    for x in BATCHES:
        mean = DECAY * mean + (1 - DECAY) * x.mean(axis=(0, 2, 3))
        var = DECAY * var + (1 - DECAY) * x.var(axis=(0, 2, 3))  # ddof=0: biased
    return mean, var


def our_trained_bn(momentum):
    bn = batchnorm.BatchNorm2d(3, momentum=momentum, dtype=torch.float64)
    for x in BATCHES:
        bn(torch.from_numpy(x))
    return bn


GAMMA, BETA = np.array([0.5, 1.0, 2.0]), np.array([0.1, -0.2, 0.3])


def test_from_keras_equals_training_in_our_convention():
    mean, var = keras_style_running_stats()
    weights = {"bn/gamma:0": GAMMA, "bn/beta:0": BETA, "bn/moving_mean:0": mean, "bn/moving_variance:0": var}
    state, kwargs = checkpoints.from_keras(weights, momentum=DECAY, epsilon=1e-3, values_per_channel=M)
    assert kwargs == {"eps": 1e-3, "momentum": pytest.approx(0.4)}
    ours = our_trained_bn(kwargs["momentum"])
    # the initial variance 1 still weighs DECAY**40 ~ 1e-9: equal up to that
    torch.testing.assert_close(state["running_mean"], ours.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state["running_var"], ours.running_var, rtol=1e-8, atol=1e-8)
    bn = batchnorm.BatchNorm2d(3, dtype=torch.float64, **kwargs)
    bn.load_state_dict(state)
    assert torch.equal(bn.weight, torch.from_numpy(GAMMA))
    # and back: the Keras dict again
    back, keras_kwargs = checkpoints.to_keras(bn.state_dict(), momentum=bn.momentum, eps=bn.eps,
                                              values_per_channel=M)
    assert keras_kwargs == {"momentum": pytest.approx(DECAY), "epsilon": 1e-3, "center": True, "scale": True}
    assert list(back) == ["gamma", "beta", "moving_mean", "moving_variance"]  # layer.get_weights() order
    for name, value in [("gamma", GAMMA), ("beta", BETA), ("moving_mean", mean), ("moving_variance", var)]:
        np.testing.assert_allclose(back[name], value, rtol=1e-12, atol=1e-12)


def test_to_keras_list_order_and_unbiased_source():
    mean, var = keras_style_running_stats()
    state, _ = checkpoints.from_keras([GAMMA, BETA, mean, var * M / (M - 1)], momentum=DECAY,
                                      values_per_channel=M, stored_variance="unbiased")
    torch.testing.assert_close(state["running_var"], our_trained_bn(1 - DECAY).running_var, rtol=1e-8, atol=1e-8)


def test_values_per_channel_none_keeps_the_source_eval_outputs():
    mean, var = keras_style_running_stats()
    state, kwargs = checkpoints.from_keras([GAMMA, BETA, mean, var], momentum=DECAY, epsilon=1e-3,
                                           values_per_channel=None)
    bn = batchnorm.BatchNorm2d(3, dtype=torch.float64, **kwargs).eval()
    bn.load_state_dict(state)
    x = np.random.default_rng(99).normal(size=(2, 3, 2, 2))
    v = lambda a: a.reshape(1, 3, 1, 1)  # noqa: E731
    keras_eval = (x - v(mean)) / np.sqrt(v(var) + 1e-3) * v(GAMMA) + v(BETA)
    np.testing.assert_allclose(bn(torch.from_numpy(x)).detach().numpy(), keras_eval, rtol=1e-12, atol=1e-12)


def test_flax_round_trip_and_equivalence():
    mean, var = keras_style_running_stats()
    variables = {"params": {"scale": GAMMA, "bias": BETA}, "batch_stats": {"mean": mean, "var": var}}
    state, kwargs = checkpoints.from_flax(variables, momentum=DECAY, values_per_channel=M)
    assert kwargs == {"eps": 1e-5, "momentum": pytest.approx(0.4)}
    ours = our_trained_bn(kwargs["momentum"])
    torch.testing.assert_close(state["running_var"], ours.running_var, rtol=1e-8, atol=1e-8)
    back, flax_kwargs = checkpoints.to_flax(ours.state_dict(), momentum=0.4, values_per_channel=M)
    assert flax_kwargs == {"momentum": pytest.approx(DECAY), "epsilon": 1e-5, "use_scale": True, "use_bias": True}
    np.testing.assert_allclose(back["batch_stats"]["var"], var, rtol=1e-8)
    np.testing.assert_allclose(back["batch_stats"]["mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(back["params"]["scale"], np.ones(3))  # ours trained with gamma 1


def test_missing_affine_and_bad_arguments():
    state, _ = checkpoints.from_keras({"moving_mean": np.zeros(2), "moving_variance": np.ones(2)},
                                      values_per_channel=None, center=False, scale=False)
    assert torch.equal(state["weight"], torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="lacks \\['moving_variance'\\]"):
        checkpoints.from_keras({"moving_mean": np.zeros(2)}, values_per_channel=None, center=False, scale=False)
    with pytest.raises(ValueError, match="expected 4 arrays"):
        checkpoints.from_keras([np.zeros(2)] * 3, values_per_channel=None)
    with pytest.raises(ValueError, match="values_per_channel must be an integer >= 2"):
        checkpoints.from_flax({"batch_stats": {"mean": np.zeros(2), "var": np.ones(2)}}, values_per_channel=1)
    with pytest.raises(ValueError, match="cumulative average"):
        checkpoints.to_keras(batchnorm.BatchNorm1d(2).state_dict(), momentum=None, values_per_channel=None)
    with pytest.raises(ValueError, match="track_running_stats=True"):
        checkpoints.to_flax(batchnorm.BatchNorm1d(2, track_running_stats=False).state_dict(),
                            values_per_channel=None)
    with pytest.raises(ValueError, match="all the same length"):
        checkpoints.from_keras([np.ones(3), np.zeros(3), np.zeros(2), np.ones(2)], values_per_channel=None)
