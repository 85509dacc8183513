"""Scalar activations for the numba kernels (compiled inline into their element loops).

``act``: the piecewise linear activations identity, relu, leaky_relu (codes of
``activations.CODES``), computed in the forward loops. ``smooth_grad``: the derivatives of
silu and gelu (exact,
erf-based), for the fused input-saving backward only; their exp and erf come from
``_cpu_math`` (vectorisable in float32). Their forward stays BN's kernel followed by
ATen's in-place activation: measured faster than a fused loop with these exp/erf, and it
keeps the exp code out of every plain BN kernel, whose first call compiles it (8.5 s ->
12.4 s on a new install when the forward loops carried silu and gelu). elu stays with
ATen's kernels (its memory-saving backward needs log1p). The kernels branch on the code
*outside* their element loops and pass it as a literal, so each loop compiles to
straight-line (vectorisable) code. NaN propagates through every activation, as in torch.
"""

from __future__ import annotations

import math

from numba import njit

from ._math import like, verf_from, vexp
from ..activations import CODES

IDENTITY, RELU, LEAKY_RELU = CODES["identity"], CODES["relu"], CODES["leaky_relu"]
SILU, GELU = CODES["silu"], CODES["gelu"]
#: 1/sqrt(2) and 1/sqrt(2 pi), of GELU's normal cdf and pdf.
SQRT1_2 = 1.0 / math.sqrt(2.0)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@njit(error_model="numpy", cache=True, inline="always")
def act(v, code, alpha):
    """z = act(v)."""
    if code == RELU:
        return 0.0 if v < 0.0 else v
    if code == LEAKY_RELU:
        return v * alpha if v < 0.0 else v
    return v


@njit(error_model="numpy", cache=True, inline="always")
def smooth_grad(v, code):
    """d act(v) / dv of silu or gelu, in v's dtype."""
    one = like(v, 1.0)
    if code == SILU:
        e = vexp(-v)
        s = one / (one + e)
        return s * (one + v * (e * s))  # 1 - s as e * s: no cancellation where s ~ 1
    a = v * like(v, SQRT1_2)
    e = vexp(-(a * a))  # exp(-v^2 / 2): erf's factor and the pdf's
    return like(v, 0.5) * (one + verf_from(a, e)) + v * e * like(v, INV_SQRT_2PI)


@njit(error_model="numpy", cache=True, inline="always")
def inverse(z, code, alpha):
    """y = act^-1(z) for the invertible ones (identity, leaky_relu with alpha > 0)."""
    if code == LEAKY_RELU:
        return z / alpha if z < 0.0 else z
    return z


@njit(error_model="numpy", cache=True, inline="always")
def grad_from_output(z, code, alpha):
    """d act(y) / dy written through the output z, for the invertible ones (leaky_relu:
    ``alpha`` at z = 0 and NaN, as torch's)."""
    if code == LEAKY_RELU:
        return 1.0 if z > 0.0 else alpha
    return 1.0
