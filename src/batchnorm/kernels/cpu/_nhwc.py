"""numba kernels for channels-last tensors, viewed as (R, C): R = N * prod(spatial) rows
of C contiguous channel values (also (N, C) inputs of BatchNorm1d).

The rows are cut into ``parts`` blocks, one task each (parallel over the batch and
spatial axes); the inner loops run over the channels, so every per-channel quantity is a
contiguous vector and the loops vectorise across channels. Reductions keep one float64
accumulator row per task (shifted by the first row, as in the channel-major kernels)
and add the rows at the end.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import _act as A


@njit(error_model="numpy", cache=True, inline="always")
def span(p, parts, n):
    """The flat range [a, b) of part p when n items are cut into ``parts`` parts."""
    return n * p // parts, n * (p + 1) // parts


@njit(error_model="numpy", cache=True)
def _block_sums(p, q, kp, kq, s1, s2):
    """s1 += sum over rows of (p - kp); s2 += sum of (p - kp) * (q - kq); per channel.

    Four rows per sweep, so the accumulator rows are loaded and stored a quarter as often."""
    R, C = p.shape
    r = 0
    while r + 4 <= R:
        for c in range(C):
            a0 = float(p[r, c]) - kp[c]
            a1 = float(p[r + 1, c]) - kp[c]
            a2 = float(p[r + 2, c]) - kp[c]
            a3 = float(p[r + 3, c]) - kp[c]
            s1[c] += (a0 + a1) + (a2 + a3)
            s2[c] += (a0 * (float(q[r, c]) - kq[c]) + a1 * (float(q[r + 1, c]) - kq[c])) + (
                a2 * (float(q[r + 2, c]) - kq[c]) + a3 * (float(q[r + 3, c]) - kq[c])
            )
        r += 4
    for i in range(r, R):
        for c in range(C):
            d = float(p[i, c]) - kp[c]
            s1[c] += d
            s2[c] += d * (float(q[i, c]) - kq[c])


@njit(error_model="numpy", cache=True)
def _block_moments(x, k, s1, s2):
    """s1 += sum over rows of (x - k); s2 += sum of (x - k)^2; four rows per sweep."""
    R, C = x.shape
    r = 0
    while r + 4 <= R:
        for c in range(C):
            a0 = float(x[r, c]) - k[c]
            a1 = float(x[r + 1, c]) - k[c]
            a2 = float(x[r + 2, c]) - k[c]
            a3 = float(x[r + 3, c]) - k[c]
            s1[c] += (a0 + a1) + (a2 + a3)
            s2[c] += (a0 * a0 + a1 * a1) + (a2 * a2 + a3 * a3)
        r += 4
    for i in range(r, R):
        for c in range(C):
            d = float(x[i, c]) - k[c]
            s1[c] += d
            s2[c] += d * d


@njit(error_model="numpy", cache=True)
def _sum_rows(parts):
    out = np.zeros(parts.shape[1])
    for p in range(parts.shape[0]):
        for c in range(parts.shape[1]):
            out[c] += parts[p, c]
    return out


@njit(parallel=True, error_model="numpy", cache=True)
def stats(x, parts):
    """Per-channel float64 (mean, biased var), one read of x."""
    R, C = x.shape
    k = np.empty(C)
    for c in range(C):
        k[c] = x[0, c]
    s1 = np.zeros((parts, C))
    s2 = np.zeros((parts, C))
    for p in prange(parts):
        a, b = span(p, parts, R)
        _block_moments(x[a:b], k, s1[p], s2[p])
    t1 = _sum_rows(s1)
    t2 = _sum_rows(s2)
    mean = np.empty(C)
    var = np.empty(C)
    for c in range(C):
        d = t1[c] / R
        mean[c] = k[c] + d
        var[c] = max(t2[c] / R - d * d, 0.0)
    return mean, var


@njit(parallel=True, error_model="numpy", cache=True)
def reduce(dy, x, mean, parts):
    """Per-channel float64 (sum(dy), sum(dy * (x - mean)))."""
    R, C = x.shape
    zero = np.zeros(C)
    mu = np.empty(C)
    for c in range(C):
        mu[c] = mean[c]
    s1 = np.zeros((parts, C))
    s2 = np.zeros((parts, C))
    for p in prange(parts):
        a, b = span(p, parts, R)
        _block_sums(dy[a:b], x[a:b], zero, mu, s1[p], s2[p])
    return _sum_rows(s1), _sum_rows(s2)


@njit(error_model="numpy", cache=True)
def _block_affine(x, out, hi, lo, scale, shift, code, alpha):
    """One call of ``_affine_rows`` per activation with a literal code, so that each
    compiles to straight-line, vectorised code."""
    if code == A.IDENTITY:
        _affine_rows(x, out, hi, lo, scale, shift, A.IDENTITY, alpha)
    elif code == A.RELU:
        _affine_rows(x, out, hi, lo, scale, shift, A.RELU, alpha)
    else:
        _affine_rows(x, out, hi, lo, scale, shift, A.LEAKY_RELU, alpha)


@njit(error_model="numpy", cache=True, inline="always")
def _affine_rows(x, out, hi, lo, scale, shift, code, alpha):
    for r in range(x.shape[0]):
        for c in range(x.shape[1]):
            out[r, c] = A.act(((x[r, c] - hi[c]) - lo[c]) * scale[c] + shift[c], code, alpha)


@njit(parallel=True, error_model="numpy", cache=True)
def affine(x, out, hi, lo, scale, shift, parts, code, alpha):
    """out = act(((x - hi) - lo) * scale + shift) with per-channel vectors in x's dtype."""
    R = x.shape[0]
    for p in prange(parts):
        a, b = span(p, parts, R)
        _block_affine(x[a:b], out[a:b], hi, lo, scale, shift, code, alpha)


@njit(error_model="numpy", cache=True)
def _block_grad_x(dy, x, out, ga, hi, lo, gb, gc):
    C = x.shape[1]
    for r in range(x.shape[0]):
        for c in range(C):
            out[r, c] = ga[c] * dy[r, c] + (gb[c] * ((x[r, c] - hi[c]) - lo[c]) + gc[c])


@njit(parallel=True, error_model="numpy", cache=True)
def grad_x(dy, x, out, ga, hi, lo, gb, gc, parts):
    """out = ga * dy + (gb * ((x - hi) - lo) + gc), per-channel vectors in x's dtype."""
    R = x.shape[0]
    for p in prange(parts):
        a, b = span(p, parts, R)
        _block_grad_x(dy[a:b], x[a:b], out[a:b], ga, hi, lo, gb, gc)


@njit(error_model="numpy", cache=True)
def _block_act_sums(dz, z, shift, rscale, code, alpha, s1, s2):
    C = z.shape[1]
    for r in range(z.shape[0]):
        for c in range(C):
            zi = float(z[r, c])
            dy = float(dz[r, c]) * A.grad_from_output(zi, code, alpha)
            s1[c] += dy
            s2[c] += dy * (A.inverse(zi, code, alpha) - shift[c]) * rscale[c]


@njit(parallel=True, error_model="numpy", cache=True)
def act_reduce(dz, z, shift, rscale, parts, code, alpha):
    """Per-channel float64 (sum(dy), sum(dy * x_hat)) of BN + invertible activation from z."""
    R, C = z.shape
    s1 = np.zeros((parts, C))
    s2 = np.zeros((parts, C))
    for p in prange(parts):
        a, b = span(p, parts, R)
        _block_act_sums(dz[a:b], z[a:b], shift, rscale, code, alpha, s1[p], s2[p])
    return _sum_rows(s1), _sum_rows(s2)


@njit(error_model="numpy", cache=True)
def _block_act_grad_x(dz, z, out, ga, gb, gc, shift, rscale, code, alpha):
    C = z.shape[1]
    for r in range(z.shape[0]):
        for c in range(C):
            zi = float(z[r, c])
            dy = float(dz[r, c]) * A.grad_from_output(zi, code, alpha)
            xhat = (A.inverse(zi, code, alpha) - shift[c]) * rscale[c]
            out[r, c] = ga[c] * dy + (gb[c] * xhat + gc[c])


@njit(parallel=True, error_model="numpy", cache=True)
def act_grad_x(dz, z, out, ga, gb, gc, shift, rscale, parts, code, alpha):
    """dx = ga * dy + (gb * x_hat + gc) of BN + invertible activation, from z."""
    R = z.shape[0]
    for p in prange(parts):
        a, b = span(p, parts, R)
        _block_act_grad_x(dz[a:b], z[a:b], out[a:b], ga, gb, gc, shift, rscale, code, alpha)
