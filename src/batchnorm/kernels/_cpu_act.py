"""Scalar activations for the numba kernels (compiled inline into their element loops).

Only the piecewise linear activations (``cpu_backend.LINEAR``): 0 identity, 1 relu,
2 leaky_relu. elu, silu and gelu need exp/erf, which numba calls per element; the CPU
backend leaves those to ATen's vectorised kernels. The kernels branch on the code
*outside* their element loops and pass it as a literal, so each loop compiles to
straight-line (vectorisable) code. NaN propagates through every activation, as in torch.
"""

from __future__ import annotations

from numba import njit

IDENTITY, RELU, LEAKY_RELU = 0, 1, 2
CODES = {"identity": IDENTITY, "relu": RELU, "leaky_relu": LEAKY_RELU}


@njit(error_model="numpy", cache=True, inline="always")
def act(v, code, alpha):
    """z = act(v)."""
    if code == RELU:
        return 0.0 if v < 0.0 else v
    if code == LEAKY_RELU:
        return v * alpha if v < 0.0 else v
    return v


@njit(error_model="numpy", cache=True, inline="always")
def inverse(z, code, alpha):
    """y = act^-1(z) for the invertible ones (identity, leaky_relu with alpha > 0)."""
    if code == LEAKY_RELU:
        return z / alpha if z < 0.0 else z
    return z


@njit(error_model="numpy", cache=True, inline="always")
def grad_from_output(z, code, alpha):
    """d act(y) / dy written through the output z, for the invertible ones."""
    if code == LEAKY_RELU:
        return alpha if z < 0.0 else 1.0
    return 1.0
