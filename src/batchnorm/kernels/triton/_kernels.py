"""Triton kernels for batch norm (imported only by ``triton_backend``; needs ``triton``).

Every tensor is handled as a row-major matrix in one of two layouts (``CL`` constexpr):

* ``CL=False`` (NCHW-like, ``x.is_contiguous()``): rows are (n, c) pairs, columns are the
  S spatial positions; element (n, c, s) sits at ``(n * C + c) * S + s``.
* ``CL=True`` (channels last, channel axis innermost): rows are the N * S positions,
  columns are the C channels; element (r, c) sits at ``r * C + c``.

Elementwise kernels tile that matrix with ``[BLOCK_R, BLOCK_K]`` blocks (the column axis
is contiguous in memory, so loads coalesce) and read the per-channel coefficients once
per row (NCHW) or once per column (channels last).

In a reduction tile the rows are the N batch entries (NCHW, one channel per program) or
the N * S positions (channels last, BLOCK_K channels per program), and the columns are
the "lanes": each lane keeps its own accumulator, lanes of one channel (NCHW) are merged
at the end. A reduction runs on one of two paths (the backend picks one per call):

* split (large channels): a ``*_partial`` kernel runs on a grid (channel blocks, P
  programs), each program walking a contiguous range of tiles of its channel(s) and
  writing one partial result per channel; a ``*_merge`` kernel combines the P partials of
  each channel; a third, elementwise kernel then normalises (``normalize_kernel``) or
  computes dx (``grad_elemt_kernel``). Many programs per channel keep the GPU busy when C
  is small and the spatial size large. Three launches per forward or backward.
* whole channel (``whole_stats_kernel``, ``whole_grad_kernel``): one program per channel
  (NCHW) or per block of channels (channels last) walks all the tiles of its channels
  twice, the first time for the statistics (or the backward's two sums), the second time
  to write y (or dx), re-reading the data it has just read (from L2 where it still is).
  One launch per forward or backward: the host cost of a Triton launch (tens of us of
  Python) dominates at small and middle shapes.

Statistics are float32 and robust to a large mean on both paths: the values are shifted
by one value of their channel (its first element, ``_channel_shift``), each tile
contributes its count, its mean and its centred sum of squares M2 = sum((x - mean_tile)^2),
and tiles are combined with Chan et al.'s exact pairwise formula (no E[x^2] - E[x]^2
cancellation; the shift keeps the running means near zero, so their rounding, ulp(mean),
does not enter the merge's mean differences, which are of the order of the standard
deviation); the shift is added back to the mean at the end.

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
        z = tl.where(y > 0, y, y * alpha)
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
        y = tl.where(z > 0, z, z / alpha)
    elif ACT == 5:
        # clamp at activations.ELU_FLOOR = -1 + 2^-23 (saturated elu: see activations.py)
        y = tl.where(z > 0, z, tl.log(1.0 + tl.maximum(tl.minimum(z, 0.0) / alpha, -1.0 + 1.1920928955078125e-07)))
    return y


@triton.jit
def _act_grad_from_output(z, alpha, ACT: tl.constexpr):
    """d act(y) / dy through the output z (invertible activations; torch's slope at
    z = 0: leaky_relu's alpha, elu's alpha)."""
    g = tl.full(z.shape, 1.0, tl.float32)
    if ACT == 2:
        g = tl.where(z > 0, 1.0, alpha + 0.0 * z)
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
def _lanes(ptr, chan, C, default, HAS: tl.constexpr):
    """A per-channel vector read for the lanes of a reduction tile (lane i holds channel
    ``chan[i]``), shaped [1, BLOCK_K] to broadcast over its rows: the channels-last form
    of ``_optional_per_channel`` with the lanes as columns."""
    return _optional_per_channel(ptr, chan, chan, C, C, C, default, HAS, True)


@triton.jit
def _store_lanes(ptr, chan, v, C, CL: tl.constexpr, BLOCK_K: tl.constexpr):
    """Store a [1, BLOCK_K] per-lane result at its channels: every lane (channels last,
    lanes past C masked) or lane 0 alone (NCHW: every lane holds channel ``chan[0]``)."""
    if CL:
        ok = chan < C
    else:
        ok = tl.arange(0, BLOCK_K) == 0
    tl.store(ptr + chan[None, :], v, mask=ok[None, :])


@triton.jit
def _tile_offsets(t, n_col_tiles, row_stride, base, rows_total, cols_total,
                  BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Offsets, mask and per-lane count of reduction tile ``t`` (tiles numbered row-block
    major).

    Element (row, col) of the tile sits at ``base + row * row_stride + col``; ``base`` is
    the channel's offset (NCHW: c * S; channels last: the first channel of the block)."""
    t_rows = t // n_col_tiles
    t_cols = t % n_col_tiles
    rows = t_rows * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = t_cols * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows < rows_total)[:, None] & (cols < cols_total)[None, :]
    offs = base + rows.to(tl.int64)[:, None] * row_stride + cols[None, :]
    n_rows = tl.minimum(rows_total - t_rows * BLOCK_R, BLOCK_R)
    count = tl.where(cols < cols_total, n_rows, 0).to(tl.float32)
    return offs, mask, count


@triton.jit
def _reduction_tile(ptr, t, n_col_tiles, row_stride, base, rows_total, cols_total,
                    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Float32 values, mask and per-lane count of reduction tile ``t`` (``_tile_offsets``)."""
    offs, mask, count = _tile_offsets(t, n_col_tiles, row_stride, base, rows_total,
                                      cols_total, BLOCK_R, BLOCK_K)
    v = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return v, mask, count


@triton.jit
def _reduction_setup(C, S, N, tiles_per_prog, n_tiles, CL: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per-program geometry of a reduction: the channel of each lane, the memory layout of
    the channel's data and this program's range of tiles (all of them on the
    whole-channel path: a grid of one program per channel block, tiles_per_prog =
    n_tiles)."""
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
def _channel_shift(x_ptr, chan, C, S, CL: tl.constexpr):
    """The first element of each lane's channel, float32 (0 past C): the statistics are
    accumulated around it."""
    if CL:
        offs = chan.to(tl.int64)
    else:
        offs = chan.to(tl.int64) * S
    return tl.load(x_ptr + offs, mask=chan < C, other=0.0).to(tl.float32)


@triton.jit
def _stats_lanes(x_ptr, shift, t0, t1, n_col_tiles, row_stride, base, rows_total, cols_total,
                 BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per-lane (count, mean - shift, M2) over reduction tiles t0 .. t1 - 1: each tile's
    centred summary of x - shift merged into the lane's with Chan's formula."""
    n = tl.zeros([BLOCK_K], tl.float32)
    mean = tl.zeros([BLOCK_K], tl.float32)
    m2 = tl.zeros([BLOCK_K], tl.float32)
    for t in range(t0, t1):
        v, mask, n_t = _reduction_tile(x_ptr, t, n_col_tiles, row_stride, base, rows_total,
                                       cols_total, BLOCK_R, BLOCK_K)
        v = tl.where(mask, v - shift[None, :], 0.0)
        mean_t = tl.sum(v, axis=0) / tl.maximum(n_t, 1.0)
        d = tl.where(mask, v - mean_t[None, :], 0.0)
        n, mean, m2 = _chan_merge(n, mean, m2, n_t, mean_t, tl.sum(d * d, axis=0))
    return n, mean, m2


@triton.jit
def _merge_lanes(n, mean, m2):
    """One (count, mean, M2) from per-lane summaries of one channel (the parallel form of
    Chan's formula)."""
    n_all = tl.sum(n, axis=0)
    mean_all = tl.sum(n * mean, axis=0) / tl.maximum(n_all, 1.0)
    dev = mean - mean_all
    m2_all = tl.sum(m2, axis=0) + tl.sum(n * dev * dev, axis=0)
    return n_all, mean_all, m2_all


@triton.jit
def stats_partial_kernel(
    x_ptr, shift_ptr, cnt_ptr, mean_ptr, m2_ptr,
    N, C, S, P, tiles_per_prog, n_tiles, n_col_tiles,
    CL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Split path: partial (count, mean - shift, M2) of program (channel block, p), stored
    at [c, p]; programs (cb, 0) also store the channels' shifts."""
    chan, base, row_stride, rows_total, cols_total, t0, t1 = _reduction_setup(
        C, S, N, tiles_per_prog, n_tiles, CL, BLOCK_K)
    shift = _channel_shift(x_ptr, chan, C, S, CL)
    n, mean, m2 = _stats_lanes(x_ptr, shift, t0, t1, n_col_tiles, row_stride, base,
                               rows_total, cols_total, BLOCK_R, BLOCK_K)
    p = tl.program_id(1)
    if p == 0:
        _store_lanes(shift_ptr, chan, shift[None, :], C, CL, BLOCK_K)
    if CL:
        ok = chan < C
        tl.store(cnt_ptr + chan * P + p, n, mask=ok)
        tl.store(mean_ptr + chan * P + p, mean, mask=ok)
        tl.store(m2_ptr + chan * P + p, m2, mask=ok)
    else:  # the lanes all hold channel cb: merge them
        n_all, mean_all, m2_all = _merge_lanes(n, mean, m2)
        c = tl.program_id(0)
        tl.store(cnt_ptr + c * P + p, n_all)
        tl.store(mean_ptr + c * P + p, mean_all)
        tl.store(m2_ptr + c * P + p, m2_all)


@triton.jit
def stats_merge_kernel(
    shift_ptr, cnt_ptr, mean_ptr, m2_ptr, mean_out, var_out, invstd_out,
    C, P, eps,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Split path: merge the P partials of each channel: mean (the shift added back),
    biased variance, 1/sqrt(var + eps)."""
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
    mean += tl.load(shift_ptr + c, mask=c_ok, other=0.0)
    tl.store(mean_out + c, mean, mask=c_ok)
    tl.store(var_out + c, var, mask=c_ok)
    tl.store(invstd_out + c, 1.0 / tl.sqrt(tl.where(c_ok, var + eps, 1.0)), mask=c_ok)


@triton.jit
def whole_stats_kernel(
    x_ptr, y_ptr, mean_out, var_out, invstd_out, w_ptr, b_ptr,
    N, C, S, n_tiles, n_col_tiles, eps, alpha,
    NORMALIZE: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
    CL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Whole-channel path, grid (channel blocks,): program cb reduces all the tiles of its
    channel(s) to (count, mean, M2), stores mean, biased var and 1/sqrt(var + eps), and
    with NORMALIZE walks the same tiles again: y = act((x - mean) * invstd * weight + bias)
    (``normalize_kernel``'s arithmetic)."""
    chan, base, row_stride, rows_total, cols_total, t0, t1 = _reduction_setup(
        C, S, N, n_tiles, n_tiles, CL, BLOCK_K)
    shift = _channel_shift(x_ptr, chan, C, S, CL)
    n, mean, m2 = _stats_lanes(x_ptr, shift, t0, t1, n_col_tiles, row_stride, base,
                               rows_total, cols_total, BLOCK_R, BLOCK_K)
    if not CL:  # every lane holds channel cb: merge them, every lane gets the channel's values
        n_c, mean_c, m2_c = _merge_lanes(n, mean, m2)
        n, mean, m2 = tl.zeros_like(n) + n_c, tl.zeros_like(n) + mean_c, tl.zeros_like(n) + m2_c
    var = (m2 / tl.maximum(n, 1.0))[None, :]
    mean = (mean + shift)[None, :]
    invstd = 1.0 / tl.sqrt(tl.where((chan < C)[None, :], var + eps, 1.0))
    _store_lanes(mean_out, chan, mean, C, CL, BLOCK_K)
    _store_lanes(var_out, chan, var, C, CL, BLOCK_K)
    _store_lanes(invstd_out, chan, invstd, C, CL, BLOCK_K)
    if NORMALIZE:
        scale = invstd * _lanes(w_ptr, chan, C, 1.0, HAS_W)
        shift = _lanes(b_ptr, chan, C, 0.0, HAS_B)
        for t in range(t0, t1):
            offs, mask, _ = _tile_offsets(t, n_col_tiles, row_stride, base, rows_total,
                                          cols_total, BLOCK_R, BLOCK_K)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            y = _act((x - mean) * scale + shift, alpha, ACT)
            tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


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
def _grad_lanes(g_ptr, v_ptr, center, t0, t1, n_col_tiles, row_stride, base, rows_total,
                cols_total, alpha, FROM_OUTPUT: tl.constexpr, ACT: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per-lane sums of g and g * (u - center) over reduction tiles t0 .. t1 - 1.

    From the input (FROM_OUTPUT=False): g = dy, u = x, center = mean.
    From the output of BN + activation: g = dz * act'(z), u = act^-1(z), center = bias.
    ``center`` broadcasts over a tile ([1, BLOCK_K] or [1, 1])."""
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
        acc_gu += tl.where(mask, g * (v - center), 0.0)
    return tl.sum(acc_g, axis=0), tl.sum(acc_gu, axis=0)


@triton.jit
def _scaled(s_gu, scale, SCALE_MODE: tl.constexpr):
    """sum g * (u - center) -> sum dy * x_hat: times scale = invstd (SCALE_MODE 1: x_hat =
    (x - mean) * invstd), over scale = weight (SCALE_MODE 2: x_hat = (y - bias) / weight),
    unchanged (SCALE_MODE 0)."""
    if SCALE_MODE == 1:
        s_gu = s_gu * scale
    elif SCALE_MODE == 2:
        s_gu = s_gu / scale
    return s_gu


@triton.jit
def _dx(g, v, center, invstd, w, mean_dy, mean_dy_xhat, alpha,
        TRAINING: tl.constexpr, FROM_OUTPUT: tl.constexpr, ACT: tl.constexpr):
    """dx of the BN backward for a tile, k = weight * invstd.

    Training: dx = k * (dy - sum_dy / m - x_hat * sum_dy_xhat / m) (the batch statistics
    depend on x); eval: dx = k * dy. From the input: g = dy, v = x, x_hat = (x - center)
    * invstd with center = mean; from the output z of BN + activation: g = dz, v = z,
    dy = dz * act'(z), x_hat = (act^-1(z) - center) / weight with center = bias. The
    per-channel values broadcast over the tile; ``center``, ``mean_dy`` and
    ``mean_dy_xhat`` are read in training only (``v`` also from the output)."""
    k = w * invstd
    if FROM_OUTPUT:
        g = g * _act_grad_from_output(v, alpha, ACT)
    if TRAINING:
        if FROM_OUTPUT:
            x_hat = (_act_inverse(v, alpha, ACT) - center) * (1.0 / w)
        else:
            x_hat = (v - center) * invstd
        dx = k * (g - mean_dy - x_hat * mean_dy_xhat)
    else:
        dx = k * g
    return dx


@triton.jit
def _load_v(v_ptr, offs, mask, g, TRAINING: tl.constexpr, FROM_OUTPUT: tl.constexpr):
    """The tile of v (x or z) where ``_dx`` reads it, else ``g`` as a stand-in."""
    if TRAINING:
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    elif FROM_OUTPUT:
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        v = g
    return v


@triton.jit
def grad_partial_kernel(
    g_ptr, v_ptr, center_ptr, sum_g_ptr, sum_gu_ptr,
    N, C, S, P, tiles_per_prog, n_tiles, n_col_tiles, alpha,
    FROM_OUTPUT: tl.constexpr, HAS_CENTER: tl.constexpr, ACT: tl.constexpr,
    CL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Split path: partial sums of g and g * (u - center) per channel (``_grad_lanes``),
    stored at [c, p]."""
    chan, base, row_stride, rows_total, cols_total, t0, t1 = _reduction_setup(
        C, S, N, tiles_per_prog, n_tiles, CL, BLOCK_K)
    center = _lanes(center_ptr, chan, C, 0.0, HAS_CENTER)
    sum_g, sum_gu = _grad_lanes(g_ptr, v_ptr, center, t0, t1, n_col_tiles, row_stride, base,
                                rows_total, cols_total, alpha, FROM_OUTPUT, ACT, BLOCK_R, BLOCK_K)
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
    """Split path: sum_dy = sum of partials; sum_dy_xhat = ``_scaled`` (sum of partials)
    per channel."""
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
    if SCALE_MODE != 0:
        s_gu = _scaled(s_gu, tl.load(scale_ptr + c, mask=c_ok, other=1.0).to(tl.float32),
                       SCALE_MODE)
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
    """dx (``_dx``) from given sums: split path, eval backward, sync BN's global sums."""
    offs, mask, rows, cols = _elem_tile(R, K, BLOCK_R, BLOCK_K)
    invstd = _per_channel(invstd_ptr, rows, cols, R, K, C, CL)
    w = _optional_per_channel(w_ptr, rows, cols, R, K, C, 1.0, HAS_W, CL)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = _load_v(v_ptr, offs, mask, g, TRAINING, FROM_OUTPUT)
    if TRAINING:
        mean_dy = _per_channel(sum_dy_ptr, rows, cols, R, K, C, CL) * inv_count
        mean_dy_xhat = _per_channel(sum_dy_xhat_ptr, rows, cols, R, K, C, CL) * inv_count
        center = _optional_per_channel(center_ptr, rows, cols, R, K, C, 0.0, HAS_CENTER, CL)
    else:  # not read by the eval formula
        mean_dy, mean_dy_xhat, center = invstd, invstd, invstd
    dx = _dx(g, v, center, invstd, w, mean_dy, mean_dy_xhat, alpha, TRAINING, FROM_OUTPUT, ACT)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def whole_grad_kernel(
    g_ptr, v_ptr, dx_ptr, center_ptr, invstd_ptr, w_ptr, sum_dy_out, sum_dy_xhat_out,
    N, C, S, n_tiles, n_col_tiles, inv_count, alpha,
    DX: tl.constexpr, TRAINING: tl.constexpr, SCALE_MODE: tl.constexpr,
    FROM_OUTPUT: tl.constexpr, HAS_W: tl.constexpr, HAS_CENTER: tl.constexpr,
    ACT: tl.constexpr, CL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Whole-channel path, grid (channel blocks,): program cb sums g and g * (u - center)
    over all the tiles of its channel(s) (``_grad_lanes``), stores sum_dy and sum_dy_xhat
    (``_scaled`` by invstd, SCALE_MODE 1, or 1 / weight, SCALE_MODE 2), and with DX walks
    the same tiles again for dx (``_dx``, with sum / m, m = 1 / inv_count, in training)."""
    chan, base, row_stride, rows_total, cols_total, t0, t1 = _reduction_setup(
        C, S, N, n_tiles, n_tiles, CL, BLOCK_K)
    center = _lanes(center_ptr, chan, C, 0.0, HAS_CENTER)
    invstd = _lanes(invstd_ptr, chan, C, 1.0, True)
    w = _lanes(w_ptr, chan, C, 1.0, HAS_W)
    sum_g, sum_gu = _grad_lanes(g_ptr, v_ptr, center, t0, t1, n_col_tiles, row_stride, base,
                                rows_total, cols_total, alpha, FROM_OUTPUT, ACT, BLOCK_R, BLOCK_K)
    if not CL:  # every lane holds channel cb: every lane gets the channel's sums
        sum_g = tl.zeros_like(sum_g) + tl.sum(sum_g, axis=0)
        sum_gu = tl.zeros_like(sum_gu) + tl.sum(sum_gu, axis=0)
    if SCALE_MODE == 1:
        scale = invstd
    else:
        scale = w
    sum_g = sum_g[None, :]
    sum_gu = _scaled(sum_gu[None, :], scale, SCALE_MODE)
    _store_lanes(sum_dy_out, chan, sum_g, C, CL, BLOCK_K)
    _store_lanes(sum_dy_xhat_out, chan, sum_gu, C, CL, BLOCK_K)
    if DX:
        mean_dy = sum_g * inv_count
        mean_dy_xhat = sum_gu * inv_count
        for t in range(t0, t1):
            offs, mask, _ = _tile_offsets(t, n_col_tiles, row_stride, base, rows_total,
                                          cols_total, BLOCK_R, BLOCK_K)
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            v = _load_v(v_ptr, offs, mask, g, TRAINING, FROM_OUTPUT)
            dx = _dx(g, v, center, invstd, w, mean_dy, mean_dy_xhat, alpha, TRAINING,
                     FROM_OUTPUT, ACT)
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# --- the running statistics ---------------------------------------------------------

_INF = tl.constexpr(float("inf"))


@triton.jit
def _batch_stat_block(mean_ptr, invstd_ptr, c, c_ok, eps, correction):
    """(mean, unbiased variance, finite) of channels ``c`` in float64: var = max(invstd^-2
    - eps, 0) * correction (``batchnorm.stats.update_on_device``'s arithmetic); finite:
    mean and var neither NaN nor infinite."""
    mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0).to(tl.float64)
    s = tl.load(invstd_ptr + c, mask=c_ok, other=1.0).to(tl.float64)
    var = 1.0 / (s * s) - eps  # float64 division: correctly rounded (div.rn.f64)
    finite = (tl.abs(mean) < _INF) & (tl.abs(var) < _INF)  # False for NaN too
    var = tl.where(var < 0.0, 0.0, var) * correction  # a NaN stays NaN (torch's clamp)
    return mean, var, finite


@triton.jit
def _lerp(start, end, weight):
    """ATen's ``lerp``: start + w (end - start) for |w| < 0.5, else end - (end - start)(1 - w)."""
    diff = end - start
    return tl.where(tl.abs(weight) < 0.5, start + weight * diff, end - diff * (1.0 - weight))


@triton.jit(do_not_specialize=["eps_bits", "correction_bits"])  # one compile for any values
def running_update_kernel(
    rm_ptr, rv_ptr, mean_ptr, invstd_ptr, nbt_ptr, ok_ptr, C, eps_bits, correction_bits,
    momentum, CUMULATIVE: tl.constexpr, HAS_NBT: tl.constexpr, BLOCK: tl.constexpr,
):
    """The guarded running update, one program (grid (1,)) looping over the C channels
    twice: first the verdict, every channel's mean and variance finite (the whole layer's:
    one bad channel leaves every buffer as it was), then, if it holds,
    ``running = lerp(running, stat, factor)`` with the batch's mean and unbiased variance
    rounded to the buffers' dtype, in float32 (ATen's ``lerp_``), ``num_batches_tracked``
    incremented (HAS_NBT) and ``factor`` = momentum, or with CUMULATIVE
    1 / num_batches_tracked after the increment (rounded to the buffers' dtype, as
    ``traced.blend``'s). The verdict is stored in ``ok_ptr`` either way. ``eps`` and
    ``correction`` arrive as the bits of float64 values (a float argument is float32)."""
    eps = eps_bits.to(tl.int64).to(tl.float64, bitcast=True)
    correction = correction_bits.to(tl.int64).to(tl.float64, bitcast=True)
    bad = tl.zeros([BLOCK], tl.int32)
    for c0 in range(0, C, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        c_ok = c < C
        _, _, finite = _batch_stat_block(mean_ptr, invstd_ptr, c, c_ok, eps, correction)
        bad += (c_ok & ~finite).to(tl.int32)
    ok = tl.sum(bad, axis=0) == 0
    tl.store(ok_ptr, ok)
    dtype = rm_ptr.dtype.element_ty
    factor = momentum
    if HAS_NBT:
        n = tl.load(nbt_ptr) + ok.to(tl.int64)
        tl.store(nbt_ptr, n)
        if CUMULATIVE:
            n_buf = tl.maximum(n, 1).to(tl.float32).to(dtype).to(tl.float32)
            factor = tl.math.div_rn(tl.full([], 1.0, tl.float32), n_buf).to(dtype).to(tl.float32)
    written = tl.where(ok, C, 0)  # channels to write: all or none
    for c0 in range(0, C, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        write = c < written
        mean, var, _ = _batch_stat_block(mean_ptr, invstd_ptr, c, write, eps, correction)
        rm = tl.load(rm_ptr + c, mask=write, other=0.0).to(tl.float32)
        rv = tl.load(rv_ptr + c, mask=write, other=0.0).to(tl.float32)
        new_m = _lerp(rm, mean.to(tl.float32).to(dtype).to(tl.float32), factor)
        new_v = _lerp(rv, var.to(tl.float32).to(dtype).to(tl.float32), factor)
        tl.store(rm_ptr + c, new_m.to(dtype), mask=write)
        tl.store(rv_ptr + c, new_v.to(dtype), mask=write)
