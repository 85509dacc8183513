"""The NumPy float64 reference against its twins: the formula's own properties, the staged
backward against the closed form, both against finite differences, and all of it against
torch.nn.functional.batch_norm and torch's autograd in float64."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from batchnorm import reference as ref

SHAPES = [(2, 3), (5, 3), (2, 3, 4), (2, 3, 4, 5), (2, 3, 2, 3, 4)]
MODULE_FOR_NDIM = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d,
                   4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}
EPS = 1e-5


def assert_close(actual: np.ndarray, expected: np.ndarray, tol: float,
                 scale: float | None = None) -> None:
    """Equal to ``tol`` relative to ``scale``, by default the largest magnitude in
    ``expected``, so entries that cancel to near zero are judged against the array, not
    themselves. Pass ``scale`` when the whole array cancels (dx is exactly 0 for m = 2)."""
    expected = np.asarray(expected, dtype=np.float64)
    if scale is None:
        scale = max(float(np.abs(expected).max(initial=0.0)), 1e-300)
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale)


def dx_scale(dy: np.ndarray, cache: ref.Cache) -> float:
    """The size of the terms of dx, gamma * invstd * dy, whatever cancels between them:
    the scale to judge dx against (dx is exactly 0 when a channel has two values)."""
    gamma = 1.0 if cache.gamma is None else np.abs(cache.gamma).max()
    return float(gamma * cache.invstd.max() * np.abs(dy).max())


def numerical_gradient(f: Callable[[np.ndarray], float], x: np.ndarray,
                       eps: float = 1e-6) -> np.ndarray:
    """Central finite differences of a scalar function: (f(x + h) - f(x - h)) / 2h per
    element, truncation error O(eps^2)."""
    x = np.array(x, dtype=np.float64)
    grad = np.empty_like(x)
    for i in np.ndindex(x.shape):
        saved = x[i]
        x[i] = saved + eps
        up = f(x)
        x[i] = saved - eps
        down = f(x)
        x[i] = saved
        grad[i] = (up - down) / (2 * eps)
    return grad


def sample(shape: tuple[int, ...], seed: int = 0, affine: bool = True):
    """x with a non-zero mean and a non-unit spread, dy, and gamma/beta (or None)."""
    rng = np.random.default_rng(seed)
    x = 1.5 + 3.0 * rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    channels = shape[1]
    gamma = 1.0 + 0.5 * rng.standard_normal(channels) if affine else None
    beta = rng.standard_normal(channels) if affine else None
    return x, dy, gamma, beta


def reduce_axes(x: np.ndarray, axis: int = 1) -> tuple[int, ...]:
    return tuple(a for a in range(x.ndim) if a != axis % x.ndim)


def t(a: np.ndarray | None, grad: bool = False) -> torch.Tensor | None:
    return None if a is None else torch.tensor(a, dtype=torch.float64, requires_grad=grad)


shapes = st.builds(
    lambda n, c, spatial: (n, c, *spatial),
    st.integers(2, 4), st.integers(1, 3), st.lists(st.integers(1, 3), max_size=3),
)


# --- the formula's own properties -------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**32 - 1),
       offset=st.floats(-100, 100), scale=st.floats(1e-3, 1e3))
def test_it_normalises(shape, seed, offset, scale):
    """With eps = 0 every channel of x_hat has mean 0 and (biased) variance 1, to 1e-12
    for inputs whose spread is not tiny beside their size (max|x| / std <= 1e3: beyond
    that the rounding of x itself, about 1e-16 * max|x| / std, takes over)."""
    x = scale * (offset + np.random.default_rng(seed).standard_normal(shape))
    axes = reduce_axes(x)
    assume(np.all(np.abs(x).max(axis=axes) <= 1e3 * x.std(axis=axes)))
    y, _ = ref.forward(x, eps=0.0)
    np.testing.assert_allclose(y.mean(axis=axes), 0.0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=axes), 1.0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_batch_stats_are_the_per_channel_mean_and_biased_variance(shape):
    x, *_ = sample(shape)
    mean, var = ref.batch_stats(x)
    columns = np.moveaxis(x, 1, 0).reshape(shape[1], -1)
    assert_close(mean, np.array([np.mean(c) for c in columns]), 1e-13)
    assert_close(var, np.array([np.var(c) for c in columns]), 1e-13)


@pytest.mark.parametrize("shape", SHAPES)
def test_identity_recovery(shape):
    """gamma = sqrt(var + eps), beta = mean undo the normalisation: y == x."""
    x, *_ = sample(shape)
    mean, var = ref.batch_stats(x)
    y, _ = ref.forward(x, np.sqrt(var + EPS), mean, eps=EPS)
    assert_close(y, x, 1e-12)


@settings(max_examples=30, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**32 - 1), a=st.floats(1e-3, 1e3),
       eps=st.sampled_from([0.0, EPS]))
def test_scale_invariance(shape, seed, a, eps):
    """Claim C4: BN(a x) = BN(x) for a > 0, and the gradient with respect to the input
    scales by 1/a. Exact for eps = 0; for eps > 0 exact when eps scales with a^2 (the
    module's fixed eps makes it approximate)."""
    x, dy, gamma, beta = sample(shape, seed % 2**31)
    y, cache = ref.forward(x, gamma, beta, eps=eps)
    y_a, cache_a = ref.forward(a * x, gamma, beta, eps=eps * a * a)
    assert_close(y_a, y, 1e-12)
    dx, dgamma, dbeta = ref.backward(dy, cache)
    dx_a, dgamma_a, dbeta_a = ref.backward(dy, cache_a)
    assert_close(a * dx_a, dx, 1e-11, scale=dx_scale(dy, cache))
    assert_close(dgamma_a, dgamma, 1e-11)
    assert_close(dbeta_a, dbeta, 1e-12)


# --- the backward: staged == closed form == finite differences ----------------------------

@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_staged_backward_equals_closed_form(shape, affine):
    x, dy, gamma, beta = sample(shape, affine=affine)
    _, cache = ref.forward(x, gamma, beta, eps=EPS)
    staged = ref.backward_staged(dy, cache)
    closed = ref.backward(dy, cache)
    for name, s, c in zip(("dx", "dgamma", "dbeta"), staged, closed):
        assert s.shape == c.shape, name
        assert_close(s, c, 1e-12, scale=dx_scale(dy, cache) if name == "dx" else None)


def test_two_values_per_channel_give_zero_dx():
    """With m = 2, x_hat = (+1, -1) whatever x is, so y does not depend on x."""
    x, dy, gamma, beta = sample((2, 3))
    _, cache = ref.forward(x, gamma, beta, eps=0.0)
    np.testing.assert_allclose(np.abs(cache.x_hat), 1.0, rtol=1e-12)
    for backward in (ref.backward_staged, ref.backward):
        np.testing.assert_allclose(backward(dy, cache)[0], 0.0, atol=1e-15 * dx_scale(dy, cache))


@pytest.mark.parametrize("backward", [ref.backward_staged, ref.backward])
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_matches_finite_differences(shape, backward):
    """L = sum(dy * y); its gradients by central differences against the analytic ones."""
    x, dy, gamma, beta = sample(shape)
    _, cache = ref.forward(x, gamma, beta, eps=EPS)
    dx, dgamma, dbeta = backward(dy, cache)

    def loss(x_=x, gamma_=gamma, beta_=beta) -> float:
        return float(np.sum(dy * ref.forward(x_, gamma_, beta_, eps=EPS)[0]))

    assert_close(dx, numerical_gradient(lambda v: loss(x_=v), x), 1e-7, dx_scale(dy, cache))
    assert_close(dgamma, numerical_gradient(lambda v: loss(gamma_=v), gamma), 1e-7)
    assert_close(dbeta, numerical_gradient(lambda v: loss(beta_=v), beta), 1e-7)


# --- against torch in float64 -------------------------------------------------------------

@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_match_torch(shape, affine):
    x, dy, gamma, beta = sample(shape, affine=affine)
    y, cache = ref.forward(x, gamma, beta, eps=EPS)
    xt, wt, bt = t(x, True), t(gamma, True), t(beta, True)
    yt = F.batch_norm(xt, None, None, wt, bt, training=True, eps=EPS)
    yt.backward(t(dy))
    assert_close(y, yt.detach().numpy(), 1e-12)
    for backward in (ref.backward_staged, ref.backward):
        dx, dgamma, dbeta = backward(dy, cache)
        assert_close(dx, xt.grad.numpy(), 1e-12, dx_scale(dy, cache))
        if affine:
            assert_close(dgamma, wt.grad.numpy(), 1e-12)
            assert_close(dbeta, bt.grad.numpy(), 1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_each_stage_matches_torch_autograd(shape):
    """The forward graph of backward_stages built in torch; every intermediate's .grad
    against the stage of the same name."""
    x, dy, gamma, beta = sample(shape)
    _, cache = ref.forward(x, gamma, beta, eps=EPS)
    stages = ref.backward_stages(dy, cache)

    xt, wt, bt = t(x, True), t(gamma, True), t(beta, True)
    dims = reduce_axes(x)
    view = (1, -1) + (1,) * (x.ndim - 2)
    mean = xt.mean(dim=dims)
    xmu = xt - mean.view(view)
    var = (xmu * xmu).mean(dim=dims)
    invstd = (var + EPS) ** -0.5
    x_hat = xmu * invstd.view(view)
    y = wt.view(view) * x_hat + bt.view(view)
    for v in (mean, var, x_hat):
        v.retain_grad()
    y.backward(t(dy))

    assert_close(stages.dbeta, bt.grad.numpy(), 1e-12)
    assert_close(stages.dgamma, wt.grad.numpy(), 1e-12)
    assert_close(stages.dx_hat, x_hat.grad.numpy(), 1e-12)
    assert_close(stages.dvar, var.grad.numpy(), 1e-12)
    assert_close(stages.dmean, mean.grad.numpy(), 1e-11)
    assert_close(stages.dx, xt.grad.numpy(), 1e-12, dx_scale(dy, cache))


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("shape", SHAPES)
def test_running_statistics_match_torch_and_eval_forward(shape, momentum):
    """Statistics update in training as torch's BatchNorm updates them (unbiased variance,
    momentum on the new batch, cumulative average for None); in eval both use them alike."""
    channels, m = shape[1], int(np.prod(shape)) // shape[1]
    module = MODULE_FOR_NDIM[len(shape)](channels, momentum=momentum, dtype=torch.float64)
    module.train()
    running_mean, running_var = np.zeros(channels), np.ones(channels)
    for step in range(1, 5):
        x, *_ = sample(shape, seed=step)
        x = x * step + step  # batches that differ, so the average is not trivial
        module(t(x))
        mean, var = ref.batch_stats(x)
        running_mean, running_var = ref.update_running(
            running_mean, running_var, mean, var, m, momentum, num_batches_tracked=step)
        assert_close(running_mean, module.running_mean.numpy(), 1e-12)
        assert_close(running_var, module.running_var.numpy(), 1e-12)

    module.eval()
    with torch.no_grad():
        module.weight.copy_(t(1.0 + np.arange(channels)))
        module.bias.copy_(t(-np.arange(channels, dtype=np.float64)))
    x, *_ = sample(shape, seed=99)
    y = ref.forward_eval(x, running_mean, running_var, module.weight.detach().numpy(),
                         module.bias.detach().numpy(), eps=module.eps)
    assert_close(y, module(t(x)).detach().numpy(), 1e-12)


# --- channels-last --------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [s for s in SHAPES if len(s) > 2])
def test_channels_last_agrees_with_transposing(shape):
    x, dy, gamma, beta = sample(shape)
    to_last = lambda a: np.moveaxis(a, 1, -1)  # noqa: E731
    to_first = lambda a: np.moveaxis(a, -1, 1)  # noqa: E731
    y, cache = ref.forward(x, gamma, beta, eps=EPS)
    y_cl, cache_cl = ref.forward(to_last(x), gamma, beta, eps=EPS, channel_axis=-1)
    assert_close(to_first(y_cl), y, 1e-14)
    for s, s_cl in zip(ref.batch_stats(x), ref.batch_stats(to_last(x), channel_axis=-1)):
        assert_close(s_cl, s, 1e-14)
    for backward in (ref.backward_staged, ref.backward):
        dx, dgamma, dbeta = backward(dy, cache)
        dx_cl, dgamma_cl, dbeta_cl = backward(to_last(dy), cache_cl)
        assert_close(to_first(dx_cl), dx, 1e-14, dx_scale(dy, cache))
        assert_close(dgamma_cl, dgamma, 1e-14)
        assert_close(dbeta_cl, dbeta, 1e-14)
    mean, var = ref.batch_stats(x)
    y_eval = ref.forward_eval(x, mean, var, gamma, beta)
    y_eval_cl = ref.forward_eval(to_last(x), mean, var, gamma, beta, channel_axis=-1)
    assert_close(to_first(y_eval_cl), y_eval, 1e-14)


# --- bad input: a clear error, never a NaN -------------------------------------------------

@pytest.mark.parametrize("call, message", [
    (lambda: ref.forward(np.ones(3)), "at least 2 axes"),
    (lambda: ref.forward(np.ones((2, 3)), channel_axis=2), "channel_axis=2 is out of range"),
    (lambda: ref.forward(np.ones((2, 3)), gamma=np.ones(4)), r"gamma of shape \(3,\)"),
    (lambda: ref.forward(np.ones((2, 3)), eps=0.0), "zero variance and eps=0"),
    (lambda: ref.forward(np.ones((2, 3)), eps=-1.0), "eps >= 0"),
    (lambda: ref.forward(np.eye(2, 3), eps=float("nan")), "a finite eps >= 0, got eps=nan"),
    (lambda: ref.forward(np.eye(2, 3), eps=float("inf")), "a finite eps >= 0, got eps=inf"),
    (lambda: ref.batch_stats(np.ones((0, 3))), "at least one value per channel"),
    (lambda: ref.backward(np.ones((2, 4)), ref.forward(np.eye(2, 3))[1]), "dy of the output"),
    (lambda: ref.update_running(np.zeros(3), np.ones(3), np.zeros(3), np.ones(3), 1),
     "more than 1 value per channel"),
    (lambda: ref.update_running(np.zeros(3), np.ones(3), np.zeros(3), np.ones(3), 4, None),
     "num_batches_tracked >= 1"),
    (lambda: ref.update_running(np.zeros(3), np.ones(3), np.zeros(3), np.ones(3), 4, 1.5),
     r"momentum in \[0, 1\]"),
    (lambda: ref.update_running(np.zeros(3), np.ones(2), np.zeros(3), np.ones(3), 4),
     r"running_var of shape \(3,\)"),
])
def test_bad_input_raises_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
