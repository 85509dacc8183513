"""Scalar activations for the numba kernels (compiled inline into their element loops).

Codes follow ``activations.ACTIVATIONS``: 0 identity, 1 relu, 2 leaky_relu, 3 elu,
4 silu, 5 gelu (erf form). The kernels branch on the code *outside* their element loops
and pass it as a literal, so each loop compiles to straight-line (vectorisable) code.
NaN propagates through every activation, as in torch.
"""

from __future__ import annotations

import math

from numba import njit

from .activations import ACTIVATIONS

CODES = {name: i for i, name in enumerate(ACTIVATIONS)}
IDENTITY, RELU, LEAKY_RELU, ELU, SILU, GELU = (CODES[a] for a in ACTIVATIONS)
INVERTIBLE = (IDENTITY, LEAKY_RELU, ELU)

_SQRT1_2 = 1.0 / math.sqrt(2.0)


@njit(error_model="numpy", cache=True, inline="always")
def act(v, code, alpha):
    """z = act(v)."""
    if code == RELU:
        return 0.0 if v < 0.0 else v
    if code == LEAKY_RELU:
        return v * alpha if v < 0.0 else v
    if code == ELU:
        return alpha * math.expm1(v) if v <= 0.0 else v
    if code == SILU:
        return v / (1.0 + math.exp(-v))
    if code == GELU:
        return 0.5 * v * (1.0 + math.erf(v * _SQRT1_2))
    return v


@njit(error_model="numpy", cache=True, inline="always")
def inverse(z, code, alpha):
    """y = act^-1(z) for the invertible activations (identity, leaky_relu, elu)."""
    if code == LEAKY_RELU:
        return z / alpha if z < 0.0 else z
    if code == ELU:
        # clamp at activations.ELU_FLOOR = -1 + 2^-23 (saturated elu: see activations.py)
        return math.log1p(max(z / alpha, -1.0 + 1.1920928955078125e-07)) if z <= 0.0 else z
    return z


@njit(error_model="numpy", cache=True, inline="always")
def grad_from_output(z, code, alpha):
    """d act(y) / dy written through the output z, for the invertible activations."""
    if code == LEAKY_RELU:
        return alpha if z < 0.0 else 1.0
    if code == ELU:
        return z + alpha if z <= 0.0 else 1.0
    return 1.0
