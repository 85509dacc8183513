"""Per-channel scalars for the element loops, from float64 statistics and sums.

Each function returns vectors in the dtype of ``like`` (the input), so the element loops
run in the input's dtype; the mean is split into ``hi + lo`` (hi rounded to that dtype,
lo the rest), which keeps a float64 mean's precision in float32 arithmetic.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit


@njit(error_model="numpy", cache=True)
def split(mean, like):
    """(hi, lo) in like's dtype with hi + lo = mean to about twice that dtype's precision."""
    C = mean.shape[0]
    hi = np.empty(C, like.dtype)
    lo = np.empty(C, like.dtype)
    for c in range(C):
        hi[c] = mean[c]
        lo[c] = float(mean[c]) - float(hi[c])
    return hi, lo


@njit(error_model="numpy", cache=True)
def invstd(var, eps):
    """1 / sqrt(var + eps) in float64."""
    out = np.empty(var.shape[0])
    for c in range(var.shape[0]):
        out[c] = 1.0 / math.sqrt(float(var[c]) + eps)
    return out


@njit(error_model="numpy", cache=True)
def affine(mean, invstd, weight, bias, like):
    """(hi, lo, scale, shift) for y = ((x - hi) - lo) * scale + shift; ``weight``/``bias``
    empty for none."""
    C = mean.shape[0]
    hi, lo = split(mean, like)
    scale = np.empty(C, like.dtype)
    shift = np.empty(C, like.dtype)
    for c in range(C):
        scale[c] = float(invstd[c]) * (float(weight[c]) if weight.size else 1.0)
        shift[c] = float(bias[c]) if bias.size else 0.0
    return hi, lo, scale, shift


@njit(error_model="numpy", cache=True)
def grad(mean, invstd, weight, sum_dy, sum_dy_xhat, count, like):
    """(ga, hi, lo, gb, gc) for the training dx = ga * dy + (gb * ((x - hi) - lo) + gc):
    with k = weight * invstd, dx = k * (dy - sum_dy / m - x_hat * sum_dy_xhat / m)."""
    C = mean.shape[0]
    hi, lo = split(mean, like)
    ga = np.empty(C, like.dtype)
    gb = np.empty(C, like.dtype)
    gc = np.empty(C, like.dtype)
    for c in range(C):
        inv = float(invstd[c])
        k = inv * (float(weight[c]) if weight.size else 1.0)
        ga[c] = k
        gb[c] = -k * inv * float(sum_dy_xhat[c]) / count
        gc[c] = -k * float(sum_dy[c]) / count
    return ga, hi, lo, gb, gc


@njit(error_model="numpy", cache=True, inline="always")
def _var(inv, eps):
    """The biased variance behind invstd = 1/sqrt(var + eps), in float64."""
    inv = float(inv)
    return max(1.0 / (inv * inv) - eps, 0.0)


@njit(error_model="numpy", cache=True)
def finite_batch(mean, invstd, eps):
    """Whether every mean and every var = max(invstd^-2 - eps, 0) is finite (float64).

    Counts the bad channels without an early exit, so the loop vectorises (``v - v`` is
    0 for a finite v, NaN for inf and NaN): about 1 us for a thousand channels instead
    of 3 with a branch per channel."""
    bad = 0
    for c in range(mean.shape[0]):
        m = float(mean[c])
        v = _var(invstd[c], eps)
        bad += (m - m != 0.0) | (v - v != 0.0)
    return bad == 0


@njit(error_model="numpy", cache=True)
def at_least(w, floor):
    """Whether no |w| is below ``floor`` (a NaN is not below), compared in w's dtype (floor
    is a scalar of it). Counts without an early exit, so the loop vectorises."""
    below = 0
    for c in range(w.shape[0]):
        below += abs(w[c]) < floor
    return below == 0


@njit(error_model="numpy", cache=True)
def running_update(running_mean, running_var, mean, invstd, eps, correction, factor):
    """Fold one batch into the running buffers in place, from (mean, invstd); False, and
    nothing written, if any statistic is not finite.

    var = max(invstd^-2 - eps, 0) is recovered in float64; the stored variance is
    ``var * correction`` (the unbiased one); ``running += factor * (stat - running)``."""
    if not finite_batch(mean, invstd, eps):
        return False
    for c in range(mean.shape[0]):
        var = _var(invstd[c], eps) * correction
        rm = float(running_mean[c])
        rv = float(running_var[c])
        running_mean[c] = rm + factor * (float(mean[c]) - rm)
        running_var[c] = rv + factor * (var - rv)
    return True
