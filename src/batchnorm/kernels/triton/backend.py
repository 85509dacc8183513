"""Triton backend: fused batch-norm kernels for CUDA tensors (``pip install batchnorm[gpu]``).

Implements the contract of ``torch_backend`` (same functions, signatures and results) for
float32, float16 and bfloat16 tensors laid out NCHW-contiguous or channels last (channel
axis innermost), with statistics in float32. Anything else (float64, other strides, CPU
tensors) is left to the pure-torch backend.

``triton`` is optional: importing this module raises ImportError without it, and the
dispatcher then treats the backend as absent. When the environment variable
``TRITON_INTERPRET=1`` is set before this module is first imported, the kernels run in
Triton's interpreter on CPU tensors instead (slow; for tests without a GPU).

Kernels (``_kernels``): every reduction (the batch statistics; the backward's two sums)
runs on one of two paths, chosen once per call from the tensor's geometry (``_plan``):

* split: a partial kernel on many programs per channel, a merge kernel, then an
  elementwise kernel (normalise + activation, or dx): three launches per training forward
  or backward, for channels too large for one program each;
* whole channel: one launch per training forward (statistics, then normalise in a second
  pass over the same program's data) or backward (the two sums, then dx), one program per
  channel (NCHW) or per block of channels (channels last).

On the GPU each Triton launch costs tens of microseconds of Python on the host, more than
the data of a small or middle layer takes to move (benchmarks/README.md, H200): the
whole-channel path is taken when a program's share is small enough (``Tuning.whole_small``
elements), or when there are enough programs to fill the GPU (``Tuning.whole_fill``
programs per SM) and a program's share is not too large (``Tuning.whole_large``).
``BATCHNORM_TRITON_PATH=split`` or ``=whole`` (read at import) forces one path for
every call, to measure the crossover (benchmarks/gpu/README.md).

Channels last, whole-channel path: a program takes BLOCK_K adjacent channels (one row of
the tile is BLOCK_K contiguous values), so C / BLOCK_K programs exist; the block is the
widest power of two up to ``max_cols_cl`` that still gives ``whole_fill`` programs per SM,
but never narrower than ``whole_min_cols_cl`` channels (16: 32 bytes in float16/bfloat16,
64 in float32, whole 32-byte memory sectors, so a narrow block wastes no bandwidth, only
load instructions).

The launch geometry of a (shape, strides, tuning, SM count) is computed once and cached
(``_plan``): a call then costs its allocations and its launches.
"""

from __future__ import annotations

import functools
import math
import os
import struct
from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from . import _kernels as kern
from .. import activations, torch_backend

name = "triton"
OPS = (torch_backend.OPS - {"backward_act_input"}) | {"update_running"}
records_autograd = False
blends_running = False
takes_backup = False

# The kernels were built for Triton's CPU interpreter (decided when triton.jit ran).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: Values of ``Tuning.path`` and of the environment variable ``BATCHNORM_TRITON_PATH``.
PATHS = ("auto", "split", "whole")


@dataclass(frozen=True)
class Tuning:
    """Block sizes, grid targets and the choice between the two reduction paths (powers
    of two where they size a block)."""

    tile: int             # elements per tile of a program, BLOCK_R * BLOCK_K
    max_cols_ncs: int     # widest block of contiguous spatial positions (NCHW)
    max_cols_cl: int      # widest block of channels (channels last)
    programs_per_sm: int  # a split reduction aims for this many programs per SM in all
    merge_block: int      # channels and partials per step of a merge kernel
    num_warps: int
    whole_small: int      # whole-channel path whenever a program has at most this many elements,
    whole_large: int      # or at most this many when it gives at least
    whole_fill: float     # this many programs per SM (also the channels-last block's target)
    whole_min_cols_cl: int  # narrowest channel block of the whole-channel path (channels last)
    update_block: int     # channels per step of the running update's one program
    path: str = "auto"    # PATHS: "auto" chooses per call; "split" / "whole" force one


def _forced_path() -> str:
    path = os.environ.get("BATCHNORM_TRITON_PATH", "auto")
    if path not in PATHS:
        raise ValueError(f"BATCHNORM_TRITON_PATH: expected one of {', '.join(PATHS)}, got "
                         f"{path!r}; unset it to let the backend choose per call")
    return path


# The whole-channel thresholds (whole_*) were first guesses: 2^17 elements (512 KiB of
# float32) is about what one program streams in the host cost of the two launches it saves
# (guessing ~25 GB/s per program: ~20 us a pass); up to 2^19 with at least one program per SM.
# Measured crossover (H200, 132 SMs, 2026-12-04 run 4: both paths forced, every ResNet-50
# shape at batch 32 and 128, NCHW and channels last, float32 and bfloat16;
# benchmarks/gpu/results/2026-12-04-run4/paths.json, compare_paths.py): of the 384 kernel
# rows (train fwd, fwd+relu, fwd+bwd, fwd+bwd leaky_relu) the rule takes the faster path or
# one within 1.3x in 371, and the faster one by more than 1.3x in 286. The 13 others (the
# chosen whole path 1.31-1.91x slower) are forward-only or leaky rows at 6,272-100,352
# elements per channel, 8 of them NCHW with 64-128 channels (32x64x56x56, 32x128x56x56,
# 128x128x28x28) at 100,352; the same shapes' train fwd+bwd, which runs the same forward
# kernel, is 1.5-2x FASTER on the whole path (32x64x56x56 float32: 0.13 vs 0.26 ms).
# Launch-bound timings of 0.03-0.3 ms, not a repeatable margin: the rule is unchanged.
# Rerun compare_paths (benchmarks/gpu/README.md) with more repetitions to move it.
GPU_TUNING = Tuning(tile=4096, max_cols_ncs=512, max_cols_cl=128, programs_per_sm=4,
                    merge_block=64, num_warps=8, whole_small=1 << 17, whole_large=1 << 19,
                    whole_fill=1.0, whole_min_cols_cl=16, update_block=1024,
                    path=_forced_path())
# Tiny blocks under the interpreter: small test shapes then cross many block edges and
# split their reductions over several programs; the tests' shapes take both paths.
INTERPRETER_TUNING = Tuning(tile=64, max_cols_ncs=16, max_cols_cl=8, programs_per_sm=4,
                            merge_block=2, num_warps=1, whole_small=128, whole_large=512,
                            whole_fill=1.0, whole_min_cols_cl=2, update_block=4,
                            path=_forced_path())


def _tuning(device: torch.device) -> Tuning:
    return GPU_TUNING if device.type == "cuda" else INTERPRETER_TUNING


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --- layout -------------------------------------------------------------------------


def _dense(shape: tuple[int, ...], stride: tuple[int, ...], order) -> bool:
    """torch's ``is_contiguous`` of the dims in ``order`` (outermost first): size-1 dims
    may have any stride."""
    if 0 in shape:
        return True
    expected = 1
    for d in reversed(order):
        if shape[d] != 1:
            if stride[d] != expected:
                return False
            expected *= shape[d]
    return True


@functools.lru_cache(maxsize=4096)
def _layout(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool | None:
    """True when the channel axis is innermost in memory, False for NCHW-contiguous, None
    for any other layout. Where both hold (one spatial position), channels last."""
    dims = range(len(shape))
    ncs = _dense(shape, stride, dims)
    cl = _dense(shape, stride, (0, *dims[2:], 1))
    spatial = math.prod(shape[2:]) if 0 not in shape else 0
    if ncs and (spatial > 1 or not cl):
        return False
    return True if cl else None


# --- launch plans -------------------------------------------------------------------


@dataclass(frozen=True)
class _Reduction:
    """Grid and tiles of a reduction kernel (split: partial kernel; whole channel: one
    program per channel block, ``programs`` = 1)."""

    channel_blocks: int  # grid axis 0
    programs: int        # P, grid axis 1: programs per channel block
    tiles_per_prog: int
    n_tiles: int         # tiles per channel block
    n_col_tiles: int     # column blocks per row block (NCHW: spatial blocks; else 1)
    block_r: int
    block_k: int


def _reduction(cl: bool, N: int, C: int, S: int, block_k: int, target: int, t: Tuning) -> _Reduction:
    """Tiles of ``block_k`` columns, and up to ``target`` programs in all (at least one
    per channel block; target 0: exactly one)."""
    if cl:
        rows, channel_blocks, n_col_tiles = N * S, _cdiv(C, block_k), 1
    else:
        rows, channel_blocks, n_col_tiles = N, C, _cdiv(S, block_k)
    block_r = min(max(1, t.tile // block_k), _pow2(rows))
    n_tiles = _cdiv(rows, block_r) * n_col_tiles
    programs = min(n_tiles, max(1, _cdiv(target, channel_blocks)))
    tiles_per_prog = _cdiv(n_tiles, programs)
    programs = _cdiv(n_tiles, tiles_per_prog)
    return _Reduction(channel_blocks, programs, tiles_per_prog, n_tiles, n_col_tiles,
                      block_r, block_k)


@dataclass(frozen=True)
class _Plan:
    """How every kernel runs on a tensor of one shape and memory layout (see ``_plan``)."""

    cl: bool
    N: int
    C: int
    S: int
    whole: bool             # the whole-channel path (else the split one)
    reduction: _Reduction   # the path's reduction
    block_c: int            # merge kernels (split path)
    block_p: int
    elem_grid: tuple[int, int]  # elementwise kernels over the (rows, cols) matrix
    elem_meta: dict
    rows: int
    cols: int
    num_warps: int


@functools.lru_cache(maxsize=4096)
def _plan(shape: tuple[int, ...], stride: tuple[int, ...], t: Tuning, sms: int) -> _Plan | None:
    """The launch geometry for a tensor (None: neither layout), the path included:
    whole channel when a program's elements ``E <= t.whole_small``, or when the
    whole-channel grid has at least ``t.whole_fill * sms`` programs and ``E <=
    t.whole_large``; ``t.path`` other than "auto" forces one."""
    cl = _layout(shape, stride)
    if cl is None:
        return None
    N, C = shape[0], shape[1]
    S = math.prod(shape[2:])
    target = max(1, math.ceil(t.whole_fill * sms))
    if cl:
        block_k = min(_pow2(C), t.max_cols_cl)
        while block_k > t.whole_min_cols_cl and _cdiv(C, block_k) < target:
            block_k //= 2
        per_program = N * S * min(block_k, C)
    else:
        block_k = min(_pow2(S), t.max_cols_ncs)
        per_program = N * S
    whole = _reduction(cl, N, C, S, block_k, 0, t)
    if t.path == "auto":
        use_whole = per_program <= t.whole_small or (
            whole.channel_blocks >= target and per_program <= t.whole_large)
    else:
        use_whole = t.path == "whole"
    if use_whole:
        reduction = whole
    else:
        split_k = min(_pow2(C), t.max_cols_cl) if cl else block_k
        reduction = _reduction(cl, N, C, S, split_k, t.programs_per_sm * sms, t)
    rows, cols = (N * S, C) if cl else (N * C, S)
    elem_k = min(_pow2(cols), t.max_cols_cl if cl else t.max_cols_ncs)
    elem_r = min(max(1, t.tile // elem_k), _pow2(rows))
    return _Plan(
        cl=cl, N=N, C=C, S=S, whole=use_whole, reduction=reduction,
        block_c=min(_pow2(C), t.merge_block),
        block_p=min(_pow2(reduction.programs), t.merge_block),
        elem_grid=(_cdiv(rows, elem_r), _cdiv(cols, elem_k)),
        elem_meta=dict(CL=cl, BLOCK_R=elem_r, BLOCK_K=elem_k, num_warps=t.num_warps),
        rows=rows, cols=cols, num_warps=t.num_warps,
    )


def _planned(x: Tensor) -> tuple[_Plan, Tensor]:
    """The plan of ``x``, made NCHW-contiguous first if it has neither layout."""
    device = x.device
    t, sms = _tuning(device), _sm_count(device)
    p = _plan(x.shape, x.stride(), t, sms)
    if p is None:
        x = x.contiguous()
        p = _plan(x.shape, x.stride(), t, sms)
    return p, x


def _like(x: Tensor, p: _Plan, other: Tensor) -> Tensor:
    """``other`` (same shape as ``x``) in ``x``'s memory order, copied where it differs."""
    if other.stride() == x.stride() and other.shape == x.shape:
        return other
    if other.shape != x.shape:
        raise ValueError(f"expected a tensor of shape {tuple(x.shape)}, got {tuple(other.shape)}")
    if _layout(other.shape, other.stride()) == p.cl:
        return other
    return other.movedim(1, -1).contiguous().movedim(-1, 1) if p.cl else other.contiguous()


def _vec(v: Tensor | None, like: Tensor) -> Tensor:
    """A contiguous per-channel vector, or ``like`` as a placeholder pointer for None."""
    return like if v is None else v.contiguous()


def _f32(p: _Plan, x: Tensor, *shape: int) -> Tensor:
    return torch.empty(shape or (p.C,), dtype=torch.float32, device=x.device)


# --- the two paths ------------------------------------------------------------------


def _stats(
    p: _Plan, x: Tensor, eps: float, norm: tuple | None = None,
) -> tuple[Tensor | None, Tensor, Tensor, Tensor]:
    """(y, mean, biased var, 1 / sqrt(var + eps)) per channel, float32; with ``norm`` =
    (weight, bias, act, alpha), y = act((x - mean) * invstd * weight + bias), else None.
    The results are separate tensors (a torch.library custom op may not return outputs
    that share storage); the split path's partials share one."""
    mean, var, invstd = _f32(p, x), _f32(p, x), _f32(p, x)
    r = p.reduction
    if p.whole:
        weight, bias, act, alpha = norm if norm is not None else (None, None, "identity", 0.0)
        y = torch.empty_like(x) if norm is not None else None
        kern.whole_stats_kernel[(r.channel_blocks,)](
            x, x if y is None else y, mean, var, invstd, _vec(weight, mean), _vec(bias, mean),
            p.N, p.C, p.S, r.n_tiles, r.n_col_tiles, float(eps), float(alpha),
            NORMALIZE=norm is not None, HAS_W=weight is not None, HAS_B=bias is not None,
            ACT=activations.CODES[act], CL=p.cl, BLOCK_R=r.block_r, BLOCK_K=r.block_k,
            num_warps=p.num_warps,
        )
        return y, mean, var, invstd
    cnt, mean_p, m2_p = _f32(p, x, 3, p.C, r.programs).unbind(0)
    shift = _f32(p, x)
    kern.stats_partial_kernel[(r.channel_blocks, r.programs)](
        x, shift, cnt, mean_p, m2_p,
        p.N, p.C, p.S, r.programs, r.tiles_per_prog, r.n_tiles, r.n_col_tiles,
        CL=p.cl, BLOCK_R=r.block_r, BLOCK_K=r.block_k, num_warps=p.num_warps,
    )
    kern.stats_merge_kernel[(_cdiv(p.C, p.block_c),)](
        shift, cnt, mean_p, m2_p, mean, var, invstd, p.C, r.programs, float(eps),
        BLOCK_C=p.block_c, BLOCK_P=p.block_p,
    )
    y = None if norm is None else _normalize(p, x, mean, invstd, *norm)
    return y, mean, var, invstd


def _normalize(
    p: _Plan, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
    bias: Tensor | None, act: str, alpha: float,
) -> Tensor:
    """y = act((x - mean) * invstd * weight + bias), one elementwise launch."""
    y = torch.empty_like(x)
    kern.normalize_kernel[p.elem_grid](
        x, y, mean.contiguous(), invstd.contiguous(), _vec(weight, mean), _vec(bias, mean),
        p.rows, p.cols, p.C, float(alpha),
        HAS_W=weight is not None, HAS_B=bias is not None, ACT=activations.CODES[act],
        **p.elem_meta,
    )
    return y


def _grad(
    p: _Plan, g_in: Tensor, v: Tensor, center: Tensor | None, invstd: Tensor,
    weight: Tensor | None, scale_mode: int, from_output: bool, act: str, alpha: float,
    dx_mode: str | None,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """(dx, sum g, scaled sum g * (u - center)) per channel (see ``_kernels.whole_grad_kernel``):
    dx for ``dx_mode`` "training" (from the batch's own sums) or "eval", None for None;
    the scale is invstd (scale_mode 1), 1 / weight (2) or 1 (0)."""
    f32 = dict(dtype=torch.float32, device=v.device)
    sum_dy, sum_dy_xhat = torch.empty(p.C, **f32), torch.empty(p.C, **f32)
    invstd = invstd.contiguous()
    count = p.N * p.S
    r = p.reduction
    if p.whole:
        dx = None if dx_mode is None else torch.empty_like(v)
        kern.whole_grad_kernel[(r.channel_blocks,)](
            g_in, v, v if dx is None else dx, _vec(center, invstd), invstd,
            _vec(weight, invstd), sum_dy, sum_dy_xhat,
            p.N, p.C, p.S, r.n_tiles, r.n_col_tiles, 1.0 / count, float(alpha),
            DX=dx is not None, TRAINING=dx_mode == "training", SCALE_MODE=scale_mode,
            FROM_OUTPUT=from_output, HAS_W=weight is not None, HAS_CENTER=center is not None,
            ACT=activations.CODES[act], CL=p.cl, BLOCK_R=r.block_r, BLOCK_K=r.block_k,
            num_warps=p.num_warps,
        )
        return dx, sum_dy, sum_dy_xhat
    part_g, part_gu = torch.empty((2, p.C, r.programs), **f32).unbind(0)
    kern.grad_partial_kernel[(r.channel_blocks, r.programs)](
        g_in, v, _vec(center, part_g), part_g, part_gu,
        p.N, p.C, p.S, r.programs, r.tiles_per_prog, r.n_tiles, r.n_col_tiles, float(alpha),
        FROM_OUTPUT=from_output, HAS_CENTER=center is not None, ACT=activations.CODES[act],
        CL=p.cl, BLOCK_R=r.block_r, BLOCK_K=r.block_k, num_warps=p.num_warps,
    )
    scale = invstd if scale_mode == 1 else _vec(weight, part_g)
    kern.grad_merge_kernel[(_cdiv(p.C, p.block_c),)](
        part_g, part_gu, scale, sum_dy, sum_dy_xhat, p.C, r.programs,
        SCALE_MODE=scale_mode, BLOCK_C=p.block_c, BLOCK_P=p.block_p,
    )
    dx = None
    if dx_mode is not None:
        sums = (sum_dy, sum_dy_xhat) if dx_mode == "training" else None
        dx = _grad_elemt(p, g_in, v, center, invstd, weight, sums, count, from_output, act, alpha)
    return dx, sum_dy, sum_dy_xhat


def _grad_elemt(
    p: _Plan, g_in: Tensor, v: Tensor, center: Tensor | None, invstd: Tensor,
    weight: Tensor | None, sums: tuple[Tensor, Tensor] | None, count: float,
    from_output: bool, act: str, alpha: float,
) -> Tensor:
    """dx (see grad_elemt_kernel); ``sums`` = (sum_dy, sum_dy_xhat) in training, else None."""
    dx = torch.empty_like(v)
    sum_dy, sum_dy_xhat = sums if sums is not None else (invstd, invstd)
    kern.grad_elemt_kernel[p.elem_grid](
        g_in, v, dx, _vec(center, invstd), invstd.contiguous(), _vec(weight, invstd),
        sum_dy.contiguous(), sum_dy_xhat.contiguous(), p.rows, p.cols, p.C,
        1.0 / float(count), float(alpha),
        TRAINING=sums is not None, FROM_OUTPUT=from_output, HAS_W=weight is not None,
        HAS_CENTER=center is not None, ACT=activations.CODES[act], **p.elem_meta,
    )
    return dx


# --- the contract -------------------------------------------------------------------


def supports(x: Tensor) -> bool:
    """CUDA tensors (CPU ones under the interpreter) of float32/float16/bfloat16, at least
    2-d, non-empty, NCHW-contiguous or channels last."""
    on_device = x.is_cuda or (INTERPRETED and x.device.type == "cpu")
    return (
        on_device and x.dtype in _DTYPES and x.dim() >= 2 and x.numel() > 0
        and _layout(x.shape, x.stride()) is not None
    )


def prefers(op: str, x: Tensor) -> bool:
    """``auto`` takes these kernels wherever they run."""
    return supports(x)


def accepts_running(x: Tensor, running_mean: Tensor, running_var: Tensor) -> bool:
    return False


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance in float32 (Welford/Chan reduction)."""
    p, x = _planned(x)
    _, mean, var, _ = _stats(p, x, 0.0)
    return mean, var


def normalize(
    x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    """y = (x - mean) * invstd * weight + bias, in float32, stored in x's dtype and layout."""
    p, x = _planned(x)
    return _normalize(p, x, mean, invstd, weight, bias, "identity", 0.0)


def forward_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Training forward: batch statistics, then normalise. Returns (y, mean, invstd)."""
    p, x = _planned(x)
    y, mean, _, invstd = _stats(p, x, eps, (weight, bias, "identity", 0.0))
    return y, mean, invstd


def backward_reduce(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor) -> tuple[Tensor, Tensor]:
    """sum(dy) and sum(dy * x_hat) per channel (x_hat = (x - mean) * invstd), float32."""
    p, x = _planned(x)
    _, sum_dy, sum_dy_xhat = _grad(p, _like(x, p, dy), x, mean, invstd, None, 1, False,
                                   "identity", 0.0, None)
    return sum_dy, sum_dy_xhat


def backward_elemt(
    dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
    sum_dy: Tensor, sum_dy_xhat: Tensor, count: float,
) -> Tensor:
    """dx = weight * invstd * (dy - sum_dy / m - x_hat * sum_dy_xhat / m), m = ``count``."""
    p, x = _planned(x)
    return _grad_elemt(p, _like(x, p, dy), x, mean, invstd, weight, (sum_dy, sum_dy_xhat),
                       count, False, "identity", 0.0)


def backward(
    dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
    output_mask: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Closed-form training backward: (dx, dweight, dbias), None where masked off."""
    p, x = _planned(x)
    dx, sum_dy, sum_dy_xhat = _grad(p, _like(x, p, dy), x, mean, invstd, weight, 1, False,
                                    "identity", 0.0, "training" if output_mask[0] else None)
    return dx, sum_dy_xhat if output_mask[1] else None, sum_dy if output_mask[2] else None


def backward_eval(
    dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
    output_mask: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Backward of the eval forward (fixed statistics): dx = dy * weight * invstd."""
    p, x = _planned(x)
    dy = _like(x, p, dy)
    if not (output_mask[1] or output_mask[2]):
        dx = None
        if output_mask[0]:
            dx = _grad_elemt(p, dy, x, None, invstd, weight, None, 1.0, False, "identity", 0.0)
        return dx, None, None
    dx, db, dw = _grad(p, dy, x, mean, invstd, weight, 1, False, "identity", 0.0,
                       "eval" if output_mask[0] else None)
    return dx, dw if output_mask[1] else None, db if output_mask[2] else None


def forward_train_act(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, act: str, alpha: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Training forward of BN followed by an activation, fused. Returns (z, mean, invstd)."""
    activations.check(act, alpha)
    p, x = _planned(x)
    z, mean, _, invstd = _stats(p, x, eps, (weight, bias, act, alpha))
    return z, mean, invstd


def forward_eval_act(
    x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None,
    act: str, alpha: float,
) -> Tensor:
    """Eval forward of BN (given statistics) followed by an activation, fused."""
    activations.check(act, alpha)
    p, x = _planned(x)
    return _normalize(p, x, mean, invstd, weight, bias, act, alpha)


def backward_act(
    dz: Tensor, z: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
    bias: Tensor | None, act: str, alpha: float, training: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of BN + invertible activation from the output z alone (see torch_backend).
    Returns (dx, dweight, dbias); dweight and dbias in float32."""
    activations.check(act, alpha)
    if not activations.is_invertible(act, alpha):
        raise ValueError(f"activation {act!r} (alpha={alpha}) is not invertible")
    p, z = _planned(z)
    dx, sum_dy, sum_dy_xhat = _grad(p, _like(z, p, dz), z, bias, invstd, weight,
                                    2 if weight is not None else 0, True, act, alpha,
                                    "training" if training else "eval")
    return dx, sum_dy_xhat, sum_dy


# --- the running statistics ---------------------------------------------------------


def _vector(t: Tensor, c: int, dtypes: tuple, device: torch.device) -> bool:
    return (t.dtype in dtypes and t.dim() == 1 and t.numel() == c and t.is_contiguous()
            and t.device == device and not t.requires_grad)


@functools.lru_cache(maxsize=256)
def _f64_bits(value: float) -> int:
    """The bits of a float64 (a Triton float argument is float32); a layer's eps and count
    repeat, hence the cache."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def update_running(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, invstd: Tensor, eps: float,
    correction: float, momentum: float | None, num_batches_tracked: Tensor | None = None,
    backup=None,
) -> Tensor | None:
    """``batchnorm.stats``' guarded running update as one launch, without a host read
    (the cpu backend's ``update_running`` on the GPU; ``running_update_kernel``): with
    var = max(invstd^-2 - eps, 0) in float64, if every channel's mean and var is finite,
    ``running_mean.lerp_(mean, f)``, ``running_var.lerp_(var * correction, f)`` and
    ``num_batches_tracked += 1``, with f = ``momentum``, or 1 / num_batches_tracked (after
    the increment) for ``momentum=None``; otherwise nothing is written.

    Args: the buffers (float32/float16/bfloat16 vectors of C elements on the kernels'
    device, not requiring grad), the batch's float32 ``mean`` and ``invstd`` (C each),
    ``eps``, ``correction`` = count / (count - 1), ``momentum`` (None: the cumulative
    average, which needs ``num_batches_tracked``), the int64 0-d ``num_batches_tracked``
    or None; ``backup`` (a layer's CPU-side RunningBackup) is not used here.

    Returns the verdict as a 0-d bool tensor on the device (True: applied), which the
    host has not read; None where the kernel does not apply (the caller then runs torch
    operations)."""
    device, c = running_mean.device, running_mean.numel()
    if not (
        (device.type == "cuda" or (INTERPRETED and device.type == "cpu"))
        and _vector(running_mean, c, _DTYPES, device)
        and _vector(running_var, c, (running_mean.dtype,), device)
        and _vector(mean, c, (torch.float32,), device)
        and _vector(invstd, c, (torch.float32,), device)
        and (num_batches_tracked is None or (
            num_batches_tracked.dtype == torch.int64 and num_batches_tracked.numel() == 1
            and num_batches_tracked.device == device))
    ):
        return None
    if momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    ok = torch.empty((), dtype=torch.bool, device=device)
    kern.running_update_kernel[(1,)](
        running_mean, running_var, mean, invstd,
        ok if num_batches_tracked is None else num_batches_tracked, ok, c,
        _f64_bits(eps), _f64_bits(correction), 0.0 if momentum is None else float(momentum),
        CUMULATIVE=momentum is None, HAS_NBT=num_batches_tracked is not None,
        BLOCK=min(_pow2(c), _tuning(device).update_block), num_warps=4,
    )
    # written by the kernel: tell autograd, as torch's lerp_ / add_ would
    torch.autograd.graph.increment_version((running_mean, running_var))
    if num_batches_tracked is not None:
        torch.autograd.graph.increment_version(num_batches_tracked)
    return ok
