"""numba kernels for channel-major tensors, viewed as (N, C, M) with M = prod(spatial).

Work is split into tasks of (channel, part): part p of channel c covers the flat range
``span(p, parts, N * M)`` of that channel's N * M values, a few contiguous runs of
length <= M. With many channels ``parts`` is 1 (parallel over channels); with few, each
channel is split over the batch and spatial axes and the per-part float64 sums are added.

The *fused* kernels compute a block of channels' sums and then write its output while
the block's values are still in the core's cache: the training forward then reads x from
memory once, the backward reads dy and x once. Each of ``tasks`` tasks (one per thread)
owns a run of consecutive blocks and pipelines them (``_stage``): while it writes block
k's output from cache it reduces block k + 1, ``group`` channels of each in turn within a
sample's row, so that the reads from memory overlap the writes (one stream after the
other left a core's memory bandwidth half used: benchmarks/cache_regime.py).

Per-channel scalars handed to element loops are in x's dtype; statistics and sums are
float64 (the caller casts them to the accumulation dtype).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from . import _act as A
from . import _loops as L
from . import _params as P
from ._math import like

#: Channel blocks of the unfused element kernels: a few per thread, for balance.
BLOCK_TASKS = 8


@njit(error_model="numpy", cache=True, inline="always")
def span(p, parts, n):
    """The flat range [a, b) of part p when n items are cut into ``parts`` parts."""
    return n * p // parts, n * (p + 1) // parts


@njit(error_model="numpy", cache=True)
def _channel_sums(p, q, c, k, zero, mode, sg, low, a, b):
    """``_cpu_loops.sums(p, q, k, zero, mode, sg, 0, low)`` of channel c over its flat
    range [a, b) (float64)."""
    M = p.shape[2]
    s1 = 0.0
    s2 = 0.0
    n = a // M
    while a < b:
        i0 = a - n * M
        i1 = min(M, i0 + b - a)
        r1, r2 = L.sums(p[n, c, i0:i1], q[n, c, i0:i1], k, zero, mode, sg, 0.0, low)
        s1 += r1
        s2 += r2
        a += i1 - i0
        n += 1
    return s1, s2


@njit(error_model="numpy", cache=True)
def _channel_affine(x, out, c, hi, lo, scale, shift, code, alpha, a, b):
    """``_cpu_loops.affine_rows`` of channel c over its flat range [a, b); the per-channel
    vectors whole."""
    M = x.shape[2]
    n = a // M
    while a < b:
        i0 = a - n * M
        i1 = min(M, i0 + b - a)
        L.affine_rows(x[n, c, i0:i1].reshape(1, i1 - i0), out[n, c, i0:i1].reshape(1, i1 - i0),
                      hi[c:c + 1], lo[c:c + 1], scale[c:c + 1], shift[c:c + 1], code, alpha)
        a += i1 - i0
        n += 1


@njit(error_model="numpy", cache=True)
def _channel_grad_x(dy, x, out, c, ga, hi, lo, gb, gc, a, b):
    M = x.shape[2]
    n = a // M
    while a < b:
        i0 = a - n * M
        i1 = min(M, i0 + b - a)
        L.grad_x(dy[n, c, i0:i1], x[n, c, i0:i1], out[n, c, i0:i1], ga, hi, lo, gb, gc)
        a += i1 - i0
        n += 1


@njit(error_model="numpy", cache=True)
def _total(v):
    """Sum of a short vector of partial sums (a plain loop: in a parallel kernel numba
    would turn ``v.sum()`` into a parallel region of its own)."""
    s = 0.0
    for i in range(v.shape[0]):
        s += v[i]
    return s


@njit(error_model="numpy", cache=True)
def _totals(parts):
    """Row sums of a (C, parts) array of partial sums."""
    out = np.empty(parts.shape[0])
    for c in range(parts.shape[0]):
        out[c] = _total(parts[c])
    return out


@njit(error_model="numpy", cache=True)
def _moments(s1, s2, k, count):
    """(mean, biased var) from shifted sums s1 = sum(x - k), s2 = sum((x - k)^2)."""
    d = s1 / count
    return k + d, max(s2 / count - d * d, 0.0)


@njit(parallel=True, error_model="numpy", cache=True)
def stats(x, parts):
    """Per-channel (mean, biased var) in float64, one read of x."""
    N, C, M = x.shape
    count = N * M
    s1 = np.empty((C, parts))
    s2 = np.empty((C, parts))
    zero = np.zeros(1, x.dtype)[0]
    for t in prange(C * parts):
        c = t // parts
        k = x[0, c, 0]
        a, b = span(t % parts, parts, count)
        r1, r2 = _channel_sums(x, x, c, k, zero, L.MOMENTS, 1.0, zero, a, b)
        s1[c, t % parts] = r1
        s2[c, t % parts] = r2
    mean = np.empty(C)
    var = np.empty(C)
    for c in range(C):
        mean[c], var[c] = _moments(_total(s1[c]), _total(s2[c]), float(x[0, c, 0]), count)
    return mean, var


@njit(parallel=True, error_model="numpy", cache=True)
def affine(x, out, hi, lo, scale, shift, parts, code, alpha):
    """out = act(((x - hi) - lo) * scale + shift) with per-channel vectors in x's dtype.

    ``parts`` 1: tasks are blocks of channels walked batch row by batch row (long
    contiguous runs, as in ``forward_fused``); otherwise each channel is cut in parts."""
    N, C, M = x.shape
    if parts == 1:
        block = -(-C // BLOCK_TASKS)
        for blk in prange(BLOCK_TASKS):
            c0 = blk * block
            c1 = min(C, c0 + block)
            for n in range(N):
                L.affine_rows(x[n, c0:c1], out[n, c0:c1], hi[c0:c1], lo[c0:c1],
                              scale[c0:c1], shift[c0:c1], code, alpha)
        return
    for t in prange(C * parts):
        c = t // parts
        a, b = span(t % parts, parts, N * M)
        _channel_affine(x, out, c, hi, lo, scale, shift, code, alpha, a, b)


@njit(error_model="numpy", cache=True, inline="always")
def _task(t, tasks, C, block, group):
    """(b0, b1, stages, g) of task t of ``tasks``: its blocks [b0, b1) of ``block``
    channels, how many stages its pipeline has (``_stage``), and the channels of a block
    handled per step of a stage (``group``, or the whole block when it is 0)."""
    b0, b1 = span(t, tasks, (C + block - 1) // block)
    return b0, b1, b1 - b0 + 1 if group else 2 * (b1 - b0), group if group else block


@njit(error_model="numpy", cache=True, inline="always")
def _stage(i, b0, b1, block, C, group):
    """Stage i of a task's pipeline over its blocks [b0, b1): (w0, w1, r0, r1), the
    channels whose output it writes (from cache) and those it reduces (from memory).
    ``group`` > 0 (overlapped): stage i writes block b0 + i - 1 and reduces block b0 + i
    (nothing at the two ends). ``group`` 0 (blocks too large for two to share a core's
    cache): block b0 + i // 2 is reduced (i even), then written (i odd)."""
    if group:
        w = b0 + i - 1 if i > 0 else b1
        r = b0 + i
    else:
        w = b0 + i // 2 if i % 2 else b1
        r = b1 if i % 2 else b0 + i // 2
    w0 = w * block if w < b1 else 0
    r0 = r * block if r < b1 else 0
    return w0, min(C, w0 + block) if w < b1 else 0, r0, min(C, r0 + block) if r < b1 else 0


@njit(parallel=True, error_model="numpy", cache=True)
def forward_fused(x, weight, bias, eps, out, code, alpha, block, tasks, group):
    """Training forward, pipelined over blocks of ``block`` channels (module docstring):
    a block's statistics, then its output while the next block's statistics are summed.

    Each sample's rows of a block are one contiguous run (short spatial rows alone would
    defeat the hardware prefetcher). ``weight``/``bias`` are float vectors, empty for none.
    Returns (mean, invstd = 1 / sqrt(var + eps)), formed in float64 and rounded to x's
    dtype (the accumulation dtype of the contract for float32/float64)."""
    N, C, M = x.shape
    count = N * M
    mean = np.empty(C, x.dtype)
    invstd = np.empty(C, x.dtype)
    s1 = np.zeros(C)
    s2 = np.zeros(C)
    # per-channel scalars rounded to x's dtype: hi + lo carries the float64 mean
    hi = np.empty(C, x.dtype)
    lo = np.empty(C, x.dtype)
    scales = np.empty(C, x.dtype)
    shifts = np.empty(C, x.dtype)
    zero = np.zeros(1, x.dtype)[0]
    for t in prange(tasks):
        b0, b1, stages, g = _task(t, tasks, C, block, group)
        for i in range(stages):
            w0, w1, r0, r1 = _stage(i, b0, b1, block, C, group)
            for n in range(N):
                for j in range(0, max(w1 - w0, r1 - r0), g):
                    a, b = w0 + j, min(w1, w0 + j + g)
                    if a < b:
                        L.affine_rows(x[n, a:b], out[n, a:b], hi[a:b], lo[a:b], scales[a:b],
                                      shifts[a:b], code, alpha)
                    for c in range(r0 + j, min(r1, r0 + j + g)):
                        m1, m2 = L.moments(x[n, c], x[0, c, 0], zero)
                        s1[c] += m1
                        s2[c] += m2
            for c in range(r0, r1):
                mu, v = _moments(s1[c], s2[c], float(x[0, c, 0]), count)
                scale = 1.0 / math.sqrt(v + eps)
                mean[c] = mu
                invstd[c] = scale
                if weight.size:
                    scale *= weight[c]
                hi[c] = mu
                lo[c] = mu - hi[c]
                scales[c] = scale
                shifts[c] = bias[c] if bias.size else 0.0
    return mean, invstd


@njit(parallel=True, error_model="numpy", cache=True)
def reduce(dy, x, mean, parts):
    """Per-channel float64 (sum(dy), sum(dy * (x - mean))).

    The sums shift x by the mean rounded to x's dtype (hi), and sum(dy * (x - mean)) =
    sum(dy * (x - hi)) - lo * sum(dy) restores the rest (lo = mean - hi) in float64."""
    N, C, M = x.shape
    s1 = np.empty((C, parts))
    s2 = np.empty((C, parts))
    hi, lo = P.split(mean, x)
    zero = np.zeros(1, x.dtype)[0]
    for t in prange(C * parts):
        c = t // parts
        a, b = span(t % parts, parts, N * M)
        r1, r2 = _channel_sums(dy, x, c, hi[c], zero, L.GRAD, 1.0, zero, a, b)
        s1[c, t % parts] = r1
        s2[c, t % parts] = r2
    sd = _totals(s1)
    sdx = _totals(s2)
    for c in range(C):
        sdx[c] -= float(lo[c]) * sd[c]
    return sd, sdx


@njit(parallel=True, error_model="numpy", cache=True)
def grad_x(dy, x, out, ga, hi, lo, gb, gc, parts):
    """out = ga * dy + (gb * ((x - hi) - lo) + gc), per-channel vectors in x's dtype.
    Tasks as in ``affine``."""
    N, C, M = x.shape
    if parts == 1:
        block = -(-C // BLOCK_TASKS)
        for blk in prange(BLOCK_TASKS):
            for n in range(N):
                for c in range(blk * block, min(C, (blk + 1) * block)):
                    L.grad_x(dy[n, c], x[n, c], out[n, c], ga[c], hi[c], lo[c], gb[c], gc[c])
        return
    for t in prange(C * parts):
        c = t // parts
        a, b = span(t % parts, parts, N * M)
        _channel_grad_x(dy, x, out, c, ga[c], hi[c], lo[c], gb[c], gc[c], a, b)


@njit(error_model="numpy", cache=True, inline="always")
def _dx_coefficients(invstd, weight, sd, sdx, count, c, training, par):
    """par[c] = (a, b, c) of dx = a * dy + (b * (x - mean) + c) for channel c, from the
    float64 sums sd = sum(dy), sdx = sum(dy * (x - mean)): with k = weight * invstd,
    a = k and, in training, b = -k * invstd^2 * sdx / m, c = -k * sd / m (0 in eval)."""
    inv = float(invstd[c])
    k = inv * weight[c] if weight.size else inv
    par[c, 0] = k
    par[c, 1] = -k * inv * inv * sdx[c] / count if training else 0.0
    par[c, 2] = -k * sd[c] / count if training else 0.0


@njit(error_model="numpy", cache=True)
def _rounded(sd, sdx, invstd, x):
    """(sum(dy), sum(dy * x_hat)) in x's dtype from the float64 sum(dy) and
    sum(dy * (x - mean))."""
    C = sd.shape[0]
    a = np.empty(C, x.dtype)
    b = np.empty(C, x.dtype)
    for c in range(C):
        a[c] = sd[c]
        b[c] = sdx[c] * float(invstd[c])
    return a, b


@njit(parallel=True, error_model="numpy", cache=True)
def backward_fused(dy, x, mean, invstd, weight, out, want_dx, block, tasks, group):
    """Training backward, pipelined as ``forward_fused``: a block's two sums, then its dx
    while the next block's sums are taken.

    Returns (sum(dy), sum(dy * x_hat)), summed in float64 and rounded to x's dtype; writes
    dx into ``out`` if ``want_dx``."""
    N, C, M = x.shape
    count = N * M
    sd = np.zeros(C)
    sdx = np.zeros(C)
    par = np.empty((C, 3), x.dtype)  # per-channel scalars rounded to x's dtype
    hi, lo = P.split(mean, x)  # x is shifted by hi in the sums; lo restored in float64
    zero = np.zeros(1, x.dtype)[0]
    for t in prange(tasks):
        b0, b1, stages, g = _task(t, tasks, C, block, group)
        for i in range(stages):
            w0, w1, r0, r1 = _stage(i, b0, b1, block, C, group)
            if not want_dx:
                w1 = w0
            for n in range(N):
                for j in range(0, max(w1 - w0, r1 - r0), g):
                    for c in range(w0 + j, min(w1, w0 + j + g)):
                        L.grad_x(dy[n, c], x[n, c], out[n, c], par[c, 0], hi[c], lo[c],
                                 par[c, 1], par[c, 2])
                    for c in range(r0 + j, min(r1, r0 + j + g)):
                        g1, g2 = L.grad_sums(dy[n, c], x[n, c], hi[c], zero)
                        sd[c] += g1
                        sdx[c] += g2
            for c in range(r0, r1):
                sdx[c] -= float(lo[c]) * sd[c]
                if want_dx:
                    _dx_coefficients(invstd, weight, sd, sdx, count, c, True, par)
    return _rounded(sd, sdx, invstd, x)


@njit(error_model="numpy", cache=True)
def _gate(mean, invstd, weight, bias):
    """Per channel (sg, t) such that y = (x - mean) * invstd * weight + bias > 0 exactly
    when float(x) * sg > t, in float64."""
    C = mean.shape[0]
    sg = np.empty(C)
    t = np.empty(C)
    for c in range(C):
        scale = float(invstd[c]) * (float(weight[c]) if weight.size else 1.0)
        shift = float(bias[c]) if bias.size else 0.0
        if scale == 0.0:  # y = shift everywhere
            sg[c] = 1.0
            t[c] = -math.inf if shift > 0.0 else math.inf
        else:
            sg[c] = 1.0 if scale > 0.0 else -1.0
            t[c] = sg[c] * (float(mean[c]) - shift / scale)
    return sg, t


@njit(parallel=True, error_model="numpy", cache=True)
def act_backward_fused(dz, x, mean, invstd, weight, bias, out, code, low, training, block,
                       tasks, group):
    """Backward of BN + activation from the input x, pipelined as ``backward_fused``: a
    pass reads dz and x only, dy = dz * act'(y) is made on the way.

    * relu (``low`` 0) and leaky_relu (``low`` alpha): the slope is decided on x
      (``_gate``: y's sign without computing y; y = 0 takes ``low``, as torch);
    * silu and gelu: y is recomputed from x and dy written to a scratch copy of the block
      (``_cpu_loops.smooth_dy``, compiled without fast-math; two, one per block in the
      pipeline), which the sums and then dx read: the derivative, a dozen times the cost
      of a plain pass, is evaluated once.

    ``training`` False: fixed statistics, dx = weight * invstd * dy. Returns float64
    (sum(dy), sum(dy * x_hat)); writes dx into ``out``."""
    N, C, M = x.shape
    count = N * M
    sd = np.zeros(C)
    sdx = np.zeros(C)
    par = np.empty((C, 3), x.dtype)
    hi, lo, scale, shift = P.affine(mean, invstd, weight, bias, x)
    smooth = code == A.SILU or code == A.GELU
    sg, t = _gate(mean, invstd, weight, bias)
    zero = np.zeros(1, x.dtype)[0]
    for task in prange(tasks):
        b0, b1, stages, g = _task(task, tasks, C, block, group)
        dy = np.empty((2, N, block, M) if smooth else (2, 0, 0, 0), x.dtype)
        for i in range(stages):
            w0, w1, r0, r1 = _stage(i, b0, b1, block, C, group)
            dw = dy[w0 // block % 2]  # the written block's dy (reduced at a stage before)
            dr = dy[r0 // block % 2]
            for n in range(N):
                for j in range(0, max(w1 - w0, r1 - r0), g):
                    for c in range(w0 + j, min(w1, w0 + j + g)):
                        if smooth:
                            L.grad_x(dw[n, c - w0], x[n, c], out[n, c], par[c, 0], hi[c],
                                     lo[c], par[c, 1], par[c, 2])
                        else:
                            L.gated_grad_x(dz[n, c], x[n, c], out[n, c], par[c, 0], hi[c],
                                           lo[c], par[c, 1], par[c, 2], sg[c], t[c], low)
                    for c in range(r0 + j, min(r1, r0 + j + g)):
                        if smooth:
                            L.smooth_dy(dz[n, c], x[n, c], dr[n, c - r0], hi[c], lo[c],
                                        scale[c], shift[c], code)
                            g1, g2 = L.grad_sums(dr[n, c - r0], x[n, c], hi[c], zero)
                        else:
                            g1, g2 = L.gated_sums(dz[n, c], x[n, c], hi[c], zero, sg[c], t[c],
                                                  low)
                        sd[c] += g1
                        sdx[c] += g2
            for c in range(r0, r1):
                sdx[c] -= float(lo[c]) * sd[c]
                _dx_coefficients(invstd, weight, sd, sdx, count, c, training, par)
    for c in range(C):
        sdx[c] *= float(invstd[c])
    return sd, sdx


@njit(parallel=True, error_model="numpy", cache=True)
def act_reduce(dz, z, shift, rscale, parts, low, inverse):
    """Per-channel float64 (sum(dy), sum(dy * x_hat)) of BN + leaky_relu from its output z:
    dy = dz * act'(y), y = act^-1(z) (``low`` = alpha and ``inverse`` = 1 / alpha in z's
    dtype: ``_cpu_loops``' FROM_OUTPUT), x_hat = (y - shift) * rscale (float64 vectors).
    Summed as ``reduce``: y shifted by the shift rounded to z's dtype (hi), the rest (lo)
    restored in float64."""
    N, C, M = z.shape
    s1 = np.empty((C, parts))
    s2 = np.empty((C, parts))
    hi, lo = P.split(shift, z)
    zero = np.zeros(1, z.dtype)[0]
    for t in prange(C * parts):
        c = t // parts
        a, b = span(t % parts, parts, N * M)
        r1, r2 = _channel_sums(dz, z, c, hi[c], zero, L.FROM_OUTPUT, inverse, low, a, b)
        s1[c, t % parts] = r1
        s2[c, t % parts] = r2
    sd = _totals(s1)
    sdx = _totals(s2)
    for c in range(C):
        sdx[c] = (sdx[c] - float(lo[c]) * sd[c]) * rscale[c]
    return sd, sdx


@njit(parallel=True, error_model="numpy", cache=True)
def act_grad_x(dz, z, out, ga, gb, gc, shift, rscale, parts, low, inverse):
    """dx = ga * dy + (gb * x_hat + gc) of BN + leaky_relu from z (float64 vectors; dy, y
    and x_hat as in ``act_reduce``), computed in z's dtype as ``grad_x``:
    a * dy + (b * ((y - hi) - lo) + c) with b = gb * rscale."""
    N, C, M = z.shape
    hi, lo = P.split(shift, z)
    inverse = like(low, inverse)
    k = np.empty((C, 3), z.dtype)  # (a, b, c) per channel, rounded to z's dtype
    for c in range(C):
        k[c, 0] = ga[c]
        k[c, 1] = gb[c] * rscale[c]
        k[c, 2] = gc[c]
    for t in prange(C * parts):
        c = t // parts
        a, b = span(t % parts, parts, N * M)
        n = a // M
        while a < b:
            i0 = a - n * M
            i1 = min(M, i0 + b - a)
            L.leaky_grad_x(dz[n, c, i0:i1], z[n, c, i0:i1], out[n, c, i0:i1], k[c, 0], hi[c],
                           lo[c], k[c, 1], k[c, 2], low, inverse)
            a += i1 - i0
            n += 1
