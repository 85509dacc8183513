"""Properties that hold for any input (hypothesis): it normalises, and it is scale
invariant with the 1/a gradient scaling of claims.md C4."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import batchnorm

#: The properties are exact for eps = 0, which training refuses (eps must be positive, as in
#: torch.nn); 1e-300 is positive and float64 does not see it: var + 1e-300 == var for every
#: var above ~1e-284 (the lab's C4 uses the same, as EXACT_EPS).
EXACT_EPS = 1e-300

shapes = st.tuples(
    st.integers(2, 6), st.integers(1, 4), st.integers(1, 5)
)


def _x(shape, seed, loc, scale):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, dtype=torch.float64, generator=g) * scale + loc


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(0, 10_000), st.floats(-100, 100), st.floats(0.1, 100))
def test_training_output_has_mean_0_and_variance_1_per_channel(shape, seed, loc, scale):
    x = _x(shape, seed, loc, scale)
    y = batchnorm.BatchNorm1d(shape[1], affine=False, eps=EXACT_EPS, dtype=torch.float64)(x)
    var, mean = torch.var_mean(y, dim=(0, 2), correction=0)
    torch.testing.assert_close(mean, torch.zeros_like(mean), rtol=0, atol=1e-10)
    torch.testing.assert_close(var, torch.ones_like(var), rtol=0, atol=1e-8)


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(0, 10_000), st.floats(1e-2, 1e2))
def test_scale_invariance_and_inverse_gradient_scaling(shape, seed, a):
    x = _x(shape, seed, 0.5, 2.0)
    dy = _x(shape, seed + 1, 0.0, 1.0)
    bn = batchnorm.BatchNorm1d(shape[1], eps=EXACT_EPS, dtype=torch.float64)
    x1, xa = x.clone().requires_grad_(), (a * x).requires_grad_()
    y1, ya = bn(x1), bn(xa)
    torch.testing.assert_close(ya, y1, rtol=1e-9, atol=1e-9)  # BN(a x) = BN(x)
    (g1,) = torch.autograd.grad(y1, x1, dy)
    (ga,) = torch.autograd.grad(ya, xa, dy)
    torch.testing.assert_close(ga * a, g1, rtol=1e-7, atol=1e-9)  # dBN(ax)/d(ax) = dBN(x)/dx / a
