"""The numba loops' own exp and erf (kernels/cpu/_math.py) against float64 references:
exp within 1.5 ulp down to 2^-125 and exactly 0, inf or NaN where math.exp gives those;
erf within 6e-7 absolute (Abramowitz and Stegun 7.1.26, 1.5e-7 in exact arithmetic, plus
float32 rounding); the derivatives of silu and gelu, as the fused backward computes them,
against float64."""

import math

import numpy as np
import pytest
from numba import njit

from batchnorm.kernels.cpu import _act as A
from batchnorm.kernels.cpu._math import verf_from, vexp

ULP_1 = 2.0**-23  # float32 spacing at 1, relative


@njit
def _exp(x, out):
    for i in range(x.shape[0]):
        out[i] = vexp(x[i])


@njit
def _erf(x, out):
    for i in range(x.shape[0]):
        out[i] = verf_from(x[i], vexp(-(x[i] * x[i])))


@njit
def _grad(x, out, code):
    for i in range(x.shape[0]):
        out[i] = A.smooth_grad(x[i], code)


def _run(fn, x, *args):
    out = np.empty_like(x)
    fn(x, out, *args)
    return out


def _sweep(lo, hi, n=400_001):
    return np.linspace(lo, hi, n, dtype=np.float32)


def test_exp_is_within_one_and_a_half_ulp_over_the_float32_range():
    x = _sweep(-86.5, 88.7)
    got = _run(_exp, x).astype(np.float64)
    want = np.exp(x.astype(np.float64))
    rel = np.abs(got - want) / want
    assert rel.max() <= 1.5 * ULP_1, rel.max() / ULP_1


def test_exp_special_values():
    x = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 89.0, 100.0, -88.0, -1000.0, 1e-30],
                 np.float32)
    got = _run(_exp, x)
    assert np.isnan(got[0])
    assert got[1] == np.inf and got[5] == np.inf and got[6] == np.inf  # overflow -> inf
    assert got[2] == 0.0 and got[7] == 0.0 and got[8] == 0.0  # below 2^-125 -> 0
    assert got[3] == 1.0 and got[4] == 1.0 and got[9] == 1.0


def test_exp_of_float64_is_libm_exp():
    x = np.linspace(-700, 700, 10_001)
    np.testing.assert_array_equal(_run(_exp, x), [math.exp(v) for v in x])


def test_erf_is_within_the_approximation_bound():
    x = _sweep(-6.0, 6.0)
    got = _run(_erf, x).astype(np.float64)
    want = np.array([math.erf(v) for v in x.astype(np.float64)])
    assert np.abs(got - want).max() <= 6e-7
    assert np.isnan(_run(_erf, np.array([np.nan], np.float32))[0])
    big = _run(_erf, np.array([-np.inf, np.inf, 30.0], np.float32))
    np.testing.assert_array_equal(big, [-1.0, 1.0, 1.0])


def _silu_grad(y):
    s = 1.0 / (1.0 + np.exp(-y))
    return s * (1.0 + y * (1.0 - s))


def _gelu_grad(y):
    cdf = 0.5 * (1.0 + np.array([math.erf(v / math.sqrt(2.0)) for v in y]))
    return cdf + y * np.exp(-0.5 * y * y) / math.sqrt(2.0 * math.pi)


@pytest.mark.parametrize("code,fn", [(A.SILU, _silu_grad), (A.GELU, _gelu_grad)])
def test_silu_and_gelu_derivatives_match_float64(code, fn):
    """Errors relative to max(1, |value|): the erf bound is absolute (5e-7 covers it and
    a few float32 roundings of the surrounding arithmetic)."""
    x = _sweep(-20.0, 20.0, 80_001)
    got = _run(_grad, x, code)
    want = fn(x.astype(np.float64))
    err = np.abs(got.astype(np.float64) - want) / np.maximum(1.0, np.abs(want))
    assert err.max() <= 5e-7, err.max()


def test_silu_and_gelu_derivatives_propagate_nan():
    for code in (A.SILU, A.GELU):
        assert np.isnan(_run(_grad, np.array([np.nan], np.float32), code)[0])
