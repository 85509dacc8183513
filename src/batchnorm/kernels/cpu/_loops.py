"""Loops over contiguous runs of one channel's values (the channel-major kernels' leaves).

Every kernel is built from two kinds of loop over a contiguous 1-d run, or over each row
of a block of such runs (the caller slices them, so that every loop index starts at 0:
LLVM then drops numba's negative-index checks and vectorises):

* reductions over values *shifted* by a per-channel constant (so a channel with a large
  mean and a small spread loses nothing to cancellation: the shifted differences of
  nearby floats are exact), summed in the input dtype over runs of ``CHUNK`` values and
  in float64 across runs, with the ``reassoc`` and ``contract`` fast-math flags only (so
  LLVM may split a sum over vector lanes and use fused multiply-adds; no flag that
  changes NaN/inf behaviour);
* element loops in the input dtype, compiled without fast-math, so that
  ``(x - mean_hi) - mean_lo`` keeps the low part of a float64 mean that a float32 cannot
  hold.
"""

from __future__ import annotations

from numba import njit

from . import _act as A
from ._math import like

#: Reductions may split a sum over vector lanes (``reassoc``) and fuse a multiply into the
#: following add (``contract``, one rounding instead of two); neither changes NaN/inf.
_REDUCE = {"reassoc", "contract"}


#: Values per run summed in the input dtype before the run's sum joins a float64 total.
CHUNK = 1024


#: What ``_run_sums`` adds up (see there).
MOMENTS, GRAD, GATED, FROM_OUTPUT = 0, 1, 2, 3


@njit(error_model="numpy", cache=True, fastmath=_REDUCE)
def _run_sums(p, q, k, zero, mode, sg, t, low):
    """The sums of one run of at most CHUNK values, accumulated in the input dtype:

    * MOMENTS: (sum(q - k), sum((q - k)^2)) (p unused);
    * GRAD: (sum(p), sum(p * (q - k)));
    * GATED: GRAD of g = p where float(q) * sg > t, p * low elsewhere: dy = dz * act'(y)
      of relu (low 0) or leaky_relu (low alpha) after BN, decided on x itself (see
      ``_cpu_nchw.act_backward_fused``); y = 0 (and NaN) takes ``low``, as torch;
    * FROM_OUTPUT: (sum(g), sum(g * (y - k))) of leaky_relu from its output q = z: g = p
      where z > 0, p * low elsewhere (z = 0 and NaN too, as torch), and y = act^-1(z) = z
      * sg (sg = 1 / alpha, rounded once to q's dtype) where z < 0, z elsewhere.

    One loop per mode, so that each does only its own arithmetic: a shared loop would
    subtract a shift from p too (zero in the backward), and the subtractions and additions
    share the same two vector ports, which bounds these loops (about 1.6x faster split)."""
    s1 = zero
    s2 = zero
    if mode == MOMENTS:
        for i in range(q.shape[0]):
            d = q[i] - k
            s1 += d
            s2 += d * d
    elif mode == GRAD:
        for i in range(q.shape[0]):
            s1 += p[i]
            s2 += p[i] * (q[i] - k)
    elif mode == GATED:
        for i in range(q.shape[0]):
            g = p[i] if float(q[i]) * sg > t else p[i] * low
            s1 += g
            s2 += g * (q[i] - k)
    else:
        inverse = like(zero, sg)
        for i in range(q.shape[0]):
            z = q[i]
            g = p[i] if z > zero else p[i] * low
            s1 += g
            s2 += g * ((z * inverse if z < zero else z) - k)
    return s1, s2


@njit(error_model="numpy", cache=True, inline="always")
def sums(p, q, k, zero, mode, sg, t, low):
    """``_run_sums`` over runs of ``CHUNK`` values, the runs' sums added in float64."""
    n = q.shape[0]
    if n <= CHUNK:
        r1, r2 = _run_sums(p, q, k, zero, mode, sg, t, low)
        return float(r1), float(r2)
    s1 = 0.0
    s2 = 0.0
    for a in range(0, n, CHUNK):
        b = min(n, a + CHUNK)
        r1, r2 = _run_sums(p[a:b], q[a:b], k, zero, mode, sg, t, low)
        s1 += float(r1)
        s2 += float(r2)
    return s1, s2


@njit(error_model="numpy", cache=True, inline="always")
def moments(x, k, zero):
    """(sum(x - k), sum((x - k)^2)) as float64; k, zero in x's dtype, k a value of the
    channel (so a channel with a large mean and a small spread loses nothing to
    cancellation).

    Runs of ``CHUNK`` values are summed in the input dtype, which vectorises twice as wide
    as float64 (LLVM spreads a run over dozens of lane accumulators, so each holds a few
    values: float32 rounding of a run's sum stays near 1e-7 relative); the runs' sums are
    added in float64."""
    return sums(x, x, k, zero, MOMENTS, 1.0, 0.0, zero)


@njit(error_model="numpy", cache=True, inline="always")
def grad_sums(dy, x, k, zero):
    """(sum(dy), sum(dy * (x - k))) as float64, summed as in ``moments``; k is the mean
    rounded to x's dtype (the caller restores the rest in float64)."""
    return sums(dy, x, k, zero, GRAD, 1.0, 0.0, zero)


@njit(error_model="numpy", cache=True, inline="always")
def gated_sums(dz, x, k, zero, sg, t, low):
    """``grad_sums`` of dy = dz where float(x) * sg > t, dz * low elsewhere (``low`` in x's
    dtype)."""
    return sums(dz, x, k, zero, GATED, sg, t, low)


@njit(error_model="numpy", cache=True, inline="always")
def affine_rows(x, out, hi, lo, scale, shift, code, alpha):
    """out[r] = act(((x[r] - hi[r]) - lo[r]) * scale[r] + shift[r]) for each row r of the
    2-d x and out (contiguous rows; per-row scalars in x's dtype); one loop per activation
    (a literal code each), so every loop vectorises."""
    for r in range(x.shape[0]):
        xr = x[r]
        o = out[r]
        h, lw, sc, sh = hi[r], lo[r], scale[r], shift[r]
        if code == A.IDENTITY:
            for i in range(o.shape[0]):
                o[i] = ((xr[i] - h) - lw) * sc + sh
        elif code == A.RELU:
            for i in range(o.shape[0]):
                o[i] = A.act(((xr[i] - h) - lw) * sc + sh, A.RELU, alpha)
        else:
            for i in range(o.shape[0]):
                o[i] = A.act(((xr[i] - h) - lw) * sc + sh, A.LEAKY_RELU, alpha)


@njit(error_model="numpy", cache=True, inline="always")
def grad_x(dy, x, out, a, hi, lo, b, c):
    """out = a * dy + (b * ((x - hi) - lo) + c): the training dx with per-channel a, b, c."""
    for i in range(out.shape[0]):
        out[i] = a * dy[i] + (b * ((x[i] - hi) - lo) + c)


@njit(error_model="numpy", cache=True, inline="always")
def gated_grad_x(dz, x, out, a, hi, lo, b, c, sg, t, low):
    """``grad_x`` of the gated dy of ``gated_sums``."""
    for i in range(out.shape[0]):
        g = dz[i] if float(x[i]) * sg > t else dz[i] * low
        out[i] = a * g + (b * ((x[i] - hi) - lo) + c)


@njit(error_model="numpy", cache=True, inline="always")
def smooth_dy(dz, x, out, hi, lo, scale, shift, code):
    """out = dz * act'(y) of silu or gelu, y = ((x - hi) - lo) * scale + shift (scalars in
    x's dtype): the dy of BN + activation, recomputed from x. No fast-math here (see
    ``_cpu_math``); the caller sums or uses ``out`` in the loops above."""
    if code == A.SILU:
        for i in range(out.shape[0]):
            out[i] = dz[i] * A.smooth_grad(((x[i] - hi) - lo) * scale + shift, A.SILU)
    else:
        for i in range(out.shape[0]):
            out[i] = dz[i] * A.smooth_grad(((x[i] - hi) - lo) * scale + shift, A.GELU)


@njit(error_model="numpy", cache=True, inline="always")
def leaky_grad_x(dz, z, out, a, hi, lo, b, c, low, inverse):
    """``grad_x`` of BN + leaky_relu from its output z: out = a * g + (b * ((y - hi) - lo)
    + c), with g and y = act^-1(z) as FROM_OUTPUT of ``_run_sums`` (``inverse`` = 1 / alpha
    and ``low`` = alpha in z's dtype; b = c = 0 in eval)."""
    zero = like(low, 0.0)
    for i in range(out.shape[0]):
        zi = z[i]
        g = dz[i] if zi > zero else dz[i] * low
        out[i] = a * g + (b * (((zi * inverse if zi < zero else zi) - hi) - lo) + c)
