"""Loops over one contiguous run of one channel's values (the channel-major kernels' leaves).

Every kernel is built from two kinds of loop over a contiguous 1-d run (the caller slices
it, so that every loop index starts at 0: LLVM then drops numba's negative-index checks
and vectorises):

* reductions over values *shifted* by a per-channel constant (so a channel with a large
  mean and a small spread loses nothing to cancellation: the shifted differences of
  nearby floats are exact), summed in the input dtype over runs of ``CHUNK`` values and
  in float64 across runs, with the ``reassoc`` fast-math flag only (so LLVM may split a
  sum over vector lanes; no flag that changes NaN/inf behaviour);
* element loops in the input dtype, compiled without fast-math, so that
  ``(x - mean_hi) - mean_lo`` keeps the low part of a float64 mean that a float32 cannot
  hold.
"""

from __future__ import annotations

from numba import njit

from . import _cpu_act as A

_REDUCE = {"reassoc"}


#: Values per run summed in the input dtype before the run's sum joins a float64 total.
CHUNK = 1024


@njit(error_model="numpy", cache=True, fastmath=_REDUCE)
def _run_sums(p, q, kp, kq, zero):
    """``sums`` of one run of at most CHUNK values, accumulated in the input dtype."""
    s1 = zero
    s2 = zero
    for i in range(p.shape[0]):
        d = p[i] - kp
        s1 += d
        s2 += d * (q[i] - kq)
    return s1, s2


@njit(error_model="numpy", cache=True, inline="always")
def sums(p, q, kp, kq, zero):
    """(sum(p - kp), sum((p - kp) * (q - kq))) as float64; kp, kq, zero in p's dtype.

    Statistics use p = q = x, kp = kq = a value of the channel; the backward uses p = dy,
    kp = 0, q = x, kq = the mean rounded to x's dtype. Runs of ``CHUNK`` values are summed
    in the input dtype, which vectorises twice as wide as float64 (LLVM spreads a run over
    dozens of lane accumulators, so each holds a few values: float32 rounding of a run's
    sum stays near 1e-7 relative); the runs' sums are added in float64."""
    n = p.shape[0]
    if n <= CHUNK:
        r1, r2 = _run_sums(p, q, kp, kq, zero)
        return float(r1), float(r2)
    s1 = 0.0
    s2 = 0.0
    for a in range(0, n, CHUNK):
        b = min(n, a + CHUNK)
        r1, r2 = _run_sums(p[a:b], q[a:b], kp, kq, zero)
        s1 += float(r1)
        s2 += float(r2)
    return s1, s2


@njit(error_model="numpy", cache=True, fastmath=_REDUCE)
def act_sums(dz, z, shift, rscale, code, alpha):
    """(sum(dy), sum(dy * x_hat)) of BN + invertible activation from the output z:
    y = act^-1(z), dy = dz * act'(y), x_hat = (y - shift) * rscale."""
    s1 = 0.0
    s2 = 0.0
    for i in range(z.shape[0]):
        zi = float(z[i])
        dy = float(dz[i]) * A.grad_from_output(zi, code, alpha)
        s1 += dy
        s2 += dy * (A.inverse(zi, code, alpha) - shift) * rscale
    return s1, s2


@njit(error_model="numpy", cache=True, inline="always")
def affine(x, out, hi, lo, scale, shift, code, alpha):
    """out = act(((x - hi) - lo) * scale + shift); scalars in x's dtype.

    One loop per activation (a literal code each), so every loop vectorises where its
    activation can."""
    if code == A.IDENTITY:
        for i in range(out.shape[0]):
            out[i] = ((x[i] - hi) - lo) * scale + shift
    elif code == A.RELU:
        for i in range(out.shape[0]):
            out[i] = A.act(((x[i] - hi) - lo) * scale + shift, A.RELU, alpha)
    elif code == A.LEAKY_RELU:
        for i in range(out.shape[0]):
            out[i] = A.act(((x[i] - hi) - lo) * scale + shift, A.LEAKY_RELU, alpha)
    elif code == A.ELU:
        for i in range(out.shape[0]):
            out[i] = A.act(((x[i] - hi) - lo) * scale + shift, A.ELU, alpha)
    elif code == A.SILU:
        for i in range(out.shape[0]):
            out[i] = A.act(((x[i] - hi) - lo) * scale + shift, A.SILU, alpha)
    else:
        for i in range(out.shape[0]):
            out[i] = A.act(((x[i] - hi) - lo) * scale + shift, A.GELU, alpha)


@njit(error_model="numpy", cache=True, inline="always")
def grad_x(dy, x, out, a, hi, lo, b, c):
    """out = a * dy + (b * ((x - hi) - lo) + c): the training dx with per-channel a, b, c."""
    for i in range(out.shape[0]):
        out[i] = a * dy[i] + (b * ((x[i] - hi) - lo) + c)


@njit(error_model="numpy", cache=True, inline="always")
def act_grad_x(dz, z, out, a, b, c, shift, rscale, code, alpha):
    """dx of BN + invertible activation from z: a * dy + b * x_hat + c (b = c = 0 in eval)."""
    if code == A.IDENTITY:
        for i in range(out.shape[0]):
            out[i] = a * dz[i] + (b * ((z[i] - shift) * rscale) + c)
    elif code == A.LEAKY_RELU:
        for i in range(out.shape[0]):
            zi = float(z[i])
            dy = float(dz[i]) * A.grad_from_output(zi, A.LEAKY_RELU, alpha)
            out[i] = a * dy + (b * ((A.inverse(zi, A.LEAKY_RELU, alpha) - shift) * rscale) + c)
    else:
        for i in range(out.shape[0]):
            zi = float(z[i])
            dy = float(dz[i]) * A.grad_from_output(zi, A.ELU, alpha)
            out[i] = a * dy + (b * ((A.inverse(zi, A.ELU, alpha) - shift) * rscale) + c)
