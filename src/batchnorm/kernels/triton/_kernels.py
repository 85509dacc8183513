"""Triton kernels for batch norm (imported only by ``triton_backend``; needs ``triton``).

Every tensor is handled as a row-major matrix in one of two layouts (``CL`` constexpr):

* ``CL=False`` (NCHW-like, ``x.is_contiguous()``): rows are (n, c) pairs, columns are the
  S spatial positions; element (n, c, s) sits at ``(n * C + c) * S + s``.
* ``CL=True`` (channels last, channel axis innermost): rows are the N * S positions,
  columns are the C channels; element (r, c) sits at ``r * C + c``.

Elementwise kernels tile that matrix with ``[BLOCK_R, BLOCK_K]`` blocks (the column axis
is contiguous in memory, so loads coalesce) and read the per-channel coefficients once
per row (NCHW) or once per column (channels last).

Reductions are split: a ``*_partial`` kernel runs on a grid (channel blocks, P programs),
each program walking a contiguous range of tiles of its channel(s) and writing one
partial result per channel; a ``*_merge`` kernel combines the P partials of each channel.
Many programs per channel keep the GPU busy when C is small and the spatial size large.
In a reduction tile the rows are the N batch entries (NCHW, one channel per program) or
the N * S positions (channels last, BLOCK_K channels per program), and the columns are
the "lanes": each lane keeps its own accumulator, lanes of one channel (NCHW) are merged
at the end of the program.

Statistics are float32 and robust to a large mean: each tile contributes its count, its
mean and its centred sum of squares M2 = sum((x - mean_tile)^2), and tiles are combined
with Chan et al.'s exact pairwise formula (no E[x^2] - E[x]^2 cancellation).

Activation codes (``ACT``): ``activations.CODES``, 0 identity, 1 relu, 2 leaky_relu,
3 silu, 4 gelu (erf), 5 elu.
"""

from __future__ import annotations

import triton
import triton.language as tl

_SQRT1_2 = tl.constexpr(0.7071067811865476)  # globals in kernels must be constexpr


# --- activations -------------------------------------------------------------------


@triton.jit
def _act(y, alpha, ACT: tl.constexpr):
    """z = act(y)."""
    z = y
    if ACT == 1:
        z = tl.maximum(y, 0.0)
    elif ACT == 2:
        z = tl.where(y >= 0, y, y * alpha)
    elif ACT == 3:
        z = y * tl.sigmoid(y)
    elif ACT == 4:
        z = 0.5 * y * (1.0 + tl.erf(y * _SQRT1_2))
    elif ACT == 5:
        z = tl.where(y > 0, y, alpha * (tl.exp(tl.minimum(y, 0.0)) - 1.0))
    return z


@triton.jit
def _act_inverse(z, alpha, ACT: tl.constexpr):
    """y = act^-1(z) for the invertible activations (identity, leaky_relu, elu)."""
    y = z
    if ACT == 2:
        y = tl.where(z >= 0, z, z / alpha)
    elif ACT == 5:
        # clamp at activations.ELU_FLOOR = -1 + 2^-23 (saturated elu: see activations.py)
        y = tl.where(z > 0, z, tl.log(1.0 + tl.maximum(tl.minimum(z, 0.0) / alpha, -1.0 + 1.1920928955078125e-07)))
    return y


@triton.jit
def _act_grad_from_output(z, alpha, ACT: tl.constexpr):
    """d act(y) / dy through the output z (invertible activations)."""
    g = tl.full(z.shape, 1.0, tl.float32)
    if ACT == 2:
        g = tl.where(z >= 0, 1.0, alpha + 0.0 * z)
    elif ACT == 5:
        g = tl.where(z > 0, 1.0, z + alpha)
    return g


# --- tiles -------------------------------------------------------------------------


@triton.jit
def _elem_tile(R, K, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Offsets and mask of this program's [BLOCK_R, BLOCK_K] tile of the (R, K) matrix."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs = rows.to(tl.int64)[:, None] * K + cols[None, :]
    mask = (rows < R)[:, None] & (cols < K)[None, :]
    return offs, mask, rows, cols


@triton.jit
def _per_channel(ptr, rows, cols, R, K, C, CL: tl.constexpr, other=0.0):
    """A per-channel float32 vector read for the elementwise tile, shaped to broadcast:
    one value per column (channels last) or per row (NCHW, channel = row % C); ``other``
    outside the matrix."""
    if CL:
        v = tl.load(ptr + cols, mask=cols < K, other=other).to(tl.float32)[None, :]
    else:
        v = tl.load(ptr + rows % C, mask=rows < R, other=other).to(tl.float32)[:, None]
    return v


@triton.jit
def _optional_per_channel(ptr, rows, cols, R, K, C, default, HAS: tl.constexpr, CL: tl.constexpr):
    """``_per_channel`` for an optional parameter (weight/bias): ``default`` when absent."""
    if HAS:
        v = _per_channel(ptr, rows, cols, R, K, C, CL, default)
    else:
        v = tl.full([1, 1], default, tl.float32)
    return v


@triton.jit
def _reduction_tile(ptr, t, n_col_tiles, row_stride, base, rows_total, cols_total,
                    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Float32 values, mask and per-lane count of reduction tile ``t`` (tiles numbered
    row-block major).

    Element (row, col) of the tile sits at ``base + row * row_stride + col``; ``base`` is
    the channel's offset (NCHW: c * S; channels last: the first channel of the block)."""
    t_rows = t // n_col_tiles
    t_cols = t % n_col_tiles
    rows = t_rows * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = t_cols * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows < rows_total)[:, None] & (cols < cols_total)[None, :]
    offs = base + rows.to(tl.int64)[:, None] * row_stride + cols[None, :]
    v = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    n_rows = tl.minimum(rows_total - t_rows * BLOCK_R, BLOCK_R)
    count = tl.where(cols < cols_total, n_rows, 0).to(tl.float32)
    return v, mask, count


@triton.jit
def _reduction_setup(C, S, N, tiles_per_prog, n_tiles, CL: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per-program geometry of a split reduction: the channel of each lane, the memory
    layout of the channel's data and this program's range of tiles."""
    cb = tl.program_id(0)
    lanes = tl.arange(0, BLOCK_K)
    if CL:
        chan = cb * BLOCK_K + lanes          # a lane is a channel
        base = (cb * BLOCK_K).to(tl.int64)
        row_stride = C
        rows_total = N * S
        cols_total = C - cb * BLOCK_K
    else:
        chan = cb + lanes * 0                # every lane is channel cb
        base = cb.to(tl.int64) * S
        row_stride = C * S
        rows_total = N
        cols_total = S
    t0 = tl.program_id(1) * tiles_per_prog
    t1 = tl.minimum(t0 + tiles_per_prog, n_tiles)
    return chan, base, row_stride, rows_total, cols_total, t0, t1


# --- batch statistics ---------------------------------------------------------------


@triton.jit
def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.: combine two (count, mean, M2) summaries exactly."""
    n = n_a + n_b
    w_b = n_b / tl.maximum(n, 1.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * w_b
    m2 = m2_a + m2_b + delta * delta * n_a * w_b
    return n, mean, m2


@triton.jit
def stats_partial_kernel(
    x_ptr, cnt_ptr, mean_ptr, m2_ptr,
    N, C, S, P, tiles_per_prog, n_tiles, n_col_tiles,
    CL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Partial (count, mean, M2) of program (channel block, p), stored at [c, p]."""
    chan, base, row_stride, rows_total, cols_total, t0, t1 = _reduction_setup(
        C, S, N, tiles_per_prog, n_tiles, CL, BLOCK_K)
    n = tl.zeros([BLOCK_K], tl.float32)
    mean = tl.zeros([BLOCK_K], tl.float32)
    m2 = tl.zeros([BLOCK_K], tl.float32)
    for t in range(t0, t1):
        v, mask, n_t = _reduction_tile(x_ptr, t, n_col_tiles, row_stride, base, rows_total,
                                       cols_total, BLOCK_R, BLOCK_K)
        mean_t = tl.sum(v, axis=0) / tl.maximum(n_t, 1.0)
        d = tl.where(mask, v - mean_t[None, :], 0.0)
        n, mean, m2 = _chan_merge(n, mean, m2, n_t, mean_t, tl.sum(d * d, axis=0))
    p = tl.program_id(1)
    if CL:
        ok = chan < C
        tl.store(cnt_ptr + chan * P + p, n, mask=ok)
        tl.store(mean_ptr + chan * P + p, mean, mask=ok)
        tl.store(m2_ptr + chan * P + p, m2, mask=ok)
    else:  # the lanes all hold channel cb: merge them (the parallel form of Chan's formula)
        n_all = tl.sum(n, axis=0)
        mean_all = tl.sum(n * mean, axis=0) / tl.maximum(n_all, 1.0)
        dev = mean - mean_all
        m2_all = tl.sum(m2, axis=0) + tl.sum(n * dev * dev, axis=0)
        c = tl.program_id(0)
        tl.store(cnt_ptr + c * P + p, n_all)
        tl.store(mean_ptr + c * P + p, mean_all)
        tl.store(m2_ptr + c * P + p, m2_all)


@triton.jit
def stats_merge_kernel(
    cnt_ptr, mean_ptr, m2_ptr, mean_out, var_out, invstd_out,
    C, P, eps,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Merge the P partials of each channel: mean, biased variance, 1/sqrt(var + eps)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    n = tl.zeros([BLOCK_C], tl.float32)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = c_ok[:, None] & (p < P)[None, :]
        offs = c[:, None] * P + p[None, :]
        n_p = tl.load(cnt_ptr + offs, mask=mask, other=0.0)
        mean_p = tl.load(mean_ptr + offs, mask=mask, other=0.0)
        m2_p = tl.load(m2_ptr + offs, mask=mask, other=0.0)
        n_b = tl.sum(n_p, axis=1)
        mean_b = tl.sum(n_p * mean_p, axis=1) / tl.maximum(n_b, 1.0)
        dev = mean_p - mean_b[:, None]
        m2_b = tl.sum(m2_p, axis=1) + tl.sum(n_p * dev * dev, axis=1)
        n, mean, m2 = _chan_merge(n, mean, m2, n_b, mean_b, m2_b)
    var = m2 / tl.maximum(n, 1.0)
    tl.store(mean_out + c, mean, mask=c_ok)
    tl.store(var_out + c, var, mask=c_ok)
    tl.store(invstd_out + c, 1.0 / tl.sqrt(tl.where(c_ok, var + eps, 1.0)), mask=c_ok)


# --- elementwise forward ------------------------------------------------------------


@triton.jit
def normalize_kernel(
    x_ptr, y_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr,
    R, K, C, alpha,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, CL: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y = act((x - mean) * invstd * weight + bias)."""
    offs, mask, rows, cols = _elem_tile(R, K, BLOCK_R, BLOCK_K)
    mean = _per_channel(mean_ptr, rows, cols, R, K, C, CL)
    scale = _per_channel(invstd_ptr, rows, cols, R, K, C, CL) * _optional_per_channel(
        w_ptr, rows, cols, R, K, C, 1.0, HAS_W, CL)
    shift = _optional_per_channel(b_ptr, rows, cols, R, K, C, 0.0, HAS_B, CL)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = _act((x - mean) * scale + shift, alpha, ACT)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


# --- backward -----------------------------------------------------------------------


@triton.jit
def grad_partial_kernel(
    g_ptr, v_ptr, center_ptr, sum_g_ptr, sum_gu_ptr,
    N, C, S, P, tiles_per_prog, n_tiles, n_col_tiles, alpha,
    FROM_OUTPUT: tl.constexpr, HAS_CENTER: tl.constexpr, ACT: tl.constexpr,
    CL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Partial sums of g and g * (u - center) per channel, stored at [c, p].

    From the input (FROM_OUTPUT=False): g = dy, u = x, center = mean.
    From the output of BN + activation: g = dz * act'(z), u = act^-1(z), center = bias."""
    chan, base, row_stride, rows_total, cols_total, t0, t1 = _reduction_setup(
        C, S, N, tiles_per_prog, n_tiles, CL, BLOCK_K)
    if HAS_CENTER:
        center = tl.load(center_ptr + chan, mask=chan < C, other=0.0).to(tl.float32)
    else:
        center = tl.zeros([BLOCK_K], tl.float32)
    acc_g = tl.zeros([BLOCK_R, BLOCK_K], tl.float32)
    acc_gu = tl.zeros([BLOCK_R, BLOCK_K], tl.float32)
    for t in range(t0, t1):
        g, mask, _ = _reduction_tile(g_ptr, t, n_col_tiles, row_stride, base, rows_total,
                                     cols_total, BLOCK_R, BLOCK_K)
        v, _, _ = _reduction_tile(v_ptr, t, n_col_tiles, row_stride, base, rows_total,
                                  cols_total, BLOCK_R, BLOCK_K)
        if FROM_OUTPUT:
            g = g * _act_grad_from_output(v, alpha, ACT)
            v = _act_inverse(v, alpha, ACT)
        acc_g += g
        acc_gu += tl.where(mask, g * (v - center[None, :]), 0.0)
    sum_g = tl.sum(acc_g, axis=0)
    sum_gu = tl.sum(acc_gu, axis=0)
    p = tl.program_id(1)
    if CL:
        ok = chan < C
        tl.store(sum_g_ptr + chan * P + p, sum_g, mask=ok)
        tl.store(sum_gu_ptr + chan * P + p, sum_gu, mask=ok)
    else:
        c = tl.program_id(0)
        tl.store(sum_g_ptr + c * P + p, tl.sum(sum_g, axis=0))
        tl.store(sum_gu_ptr + c * P + p, tl.sum(sum_gu, axis=0))


@triton.jit
def grad_merge_kernel(
    sum_g_ptr, sum_gu_ptr, scale_ptr, sum_dy_out, sum_dy_xhat_out,
    C, P,
    SCALE_MODE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """sum_dy = sum of partials; sum_dy_xhat = (sum of partials) * scale per channel, with
    scale = invstd (SCALE_MODE 1: x_hat = (x - mean) * invstd), 1 / weight (SCALE_MODE 2:
    x_hat = (y - bias) / weight) or 1 (SCALE_MODE 0)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    s_g = tl.zeros([BLOCK_C], tl.float32)
    s_gu = tl.zeros([BLOCK_C], tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = c_ok[:, None] & (p < P)[None, :]
        offs = c[:, None] * P + p[None, :]
        s_g += tl.sum(tl.load(sum_g_ptr + offs, mask=mask, other=0.0), axis=1)
        s_gu += tl.sum(tl.load(sum_gu_ptr + offs, mask=mask, other=0.0), axis=1)
    if SCALE_MODE == 1:
        s_gu = s_gu * tl.load(scale_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    elif SCALE_MODE == 2:
        s_gu = s_gu / tl.load(scale_ptr + c, mask=c_ok, other=1.0).to(tl.float32)
    tl.store(sum_dy_out + c, s_g, mask=c_ok)
    tl.store(sum_dy_xhat_out + c, s_gu, mask=c_ok)


@triton.jit
def grad_elemt_kernel(
    g_ptr, v_ptr, dx_ptr, center_ptr, invstd_ptr, w_ptr, sum_dy_ptr, sum_dy_xhat_ptr,
    R, K, C, inv_count, alpha,
    TRAINING: tl.constexpr, FROM_OUTPUT: tl.constexpr, HAS_W: tl.constexpr,
    HAS_CENTER: tl.constexpr, ACT: tl.constexpr, CL: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx of the BN backward, k = weight * invstd.

    Training: dx = k * (dy - sum_dy / m) - k * (sum_dy_xhat / m) * x_hat (the batch
    statistics depend on x); eval: dx = k * dy. From the input: dy = g, x_hat =
    (x - mean) * invstd; from the output z of BN + activation: dy = dz * act'(z),
    x_hat = (act^-1(z) - bias) / weight."""
    offs, mask, rows, cols = _elem_tile(R, K, BLOCK_R, BLOCK_K)
    invstd = _per_channel(invstd_ptr, rows, cols, R, K, C, CL)
    w = _optional_per_channel(w_ptr, rows, cols, R, K, C, 1.0, HAS_W, CL)
    k = w * invstd
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if FROM_OUTPUT:
        z = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = g * _act_grad_from_output(z, alpha, ACT)
    if TRAINING:
        mean_dy = _per_channel(sum_dy_ptr, rows, cols, R, K, C, CL) * inv_count
        mean_dy_xhat = _per_channel(sum_dy_xhat_ptr, rows, cols, R, K, C, CL) * inv_count
        center = _optional_per_channel(center_ptr, rows, cols, R, K, C, 0.0, HAS_CENTER, CL)
        if FROM_OUTPUT:
            x_hat = (_act_inverse(z, alpha, ACT) - center) * (1.0 / w)
        else:
            x = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            x_hat = (x - center) * invstd
        dx = k * (g - mean_dy - x_hat * mean_dy_xhat)
    else:
        dx = k * g
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
