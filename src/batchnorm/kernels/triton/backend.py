"""Triton backend: fused batch-norm kernels for CUDA tensors (``pip install batchnorm[gpu]``).

Implements the contract of ``torch_backend`` (same functions, signatures and results) for
float32, float16 and bfloat16 tensors laid out NCHW-contiguous or channels last (channel
axis innermost), with statistics in float32. Anything else (float64, other strides, CPU
tensors) is left to the pure-torch backend.

``triton`` is optional: importing this module raises ImportError without it, and the
dispatcher then treats the backend as absent. When the environment variable
``TRITON_INTERPRET=1`` is set before this module is first imported, the kernels run in
Triton's interpreter on CPU tensors instead (slow; for tests without a GPU).

Kernels (``_triton_kernels``): a split reduction for the batch statistics (per-tile
centred partials merged with Chan's formula), another for the two sums of the backward,
and one elementwise pass each for normalise (+ activation) and for dx.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from . import _kernels as kern
from .. import activations, torch_backend

name = "triton"
OPS = torch_backend.OPS - {"backward_act_input"}
records_autograd = False
blends_running = False

# The kernels were built for Triton's CPU interpreter (decided when triton.jit ran).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Tuning:
    """Block sizes and grid targets (powers of two where they size a block)."""

    tile: int             # elements per tile of a program, BLOCK_R * BLOCK_K
    max_cols_ncs: int     # widest block of contiguous spatial positions (NCHW)
    max_cols_cl: int      # widest block of channels (channels last)
    programs_per_sm: int  # a split reduction aims for this many programs per SM in all
    merge_block: int      # channels and partials per step of a merge kernel
    num_warps: int


# Not yet tuned on a GPU (no GPU was lent to the session that wrote this; see
# benchmarks/README.md).
GPU_TUNING = Tuning(tile=4096, max_cols_ncs=512, max_cols_cl=128, programs_per_sm=4,
                    merge_block=64, num_warps=8)
# Tiny blocks under the interpreter: small test shapes then cross many block edges and
# split their reductions over several programs.
INTERPRETER_TUNING = Tuning(tile=64, max_cols_ncs=16, max_cols_cl=8, programs_per_sm=4,
                            merge_block=2, num_warps=1)


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


def _channels_last(x: Tensor) -> bool | None:
    """True when the channel axis is innermost in memory, False for NCHW-contiguous, None
    for any other layout. Where both hold (one spatial position), channels last."""
    ncs = x.is_contiguous()
    cl = x.movedim(1, -1).is_contiguous()
    spatial = x.numel() // (x.shape[0] * x.shape[1]) if x.numel() else 0
    if ncs and (spatial > 1 or not cl):
        return False
    return True if cl else None


@dataclass(frozen=True)
class _Geometry:
    """A tensor (N, C, *spatial) seen as N x C x S in one of the two layouts."""

    cl: bool
    N: int
    C: int
    S: int

    @property
    def matrix(self) -> tuple[int, int]:
        """(rows, columns) of the row-major matrix the elementwise kernels tile."""
        return (self.N * self.S, self.C) if self.cl else (self.N * self.C, self.S)


def _prepare(x: Tensor, *others: Tensor) -> tuple[_Geometry, Tensor, list[Tensor]]:
    """The geometry of ``x`` (made NCHW-contiguous if it has neither layout) and the
    ``others`` (same shape) in the same memory order as ``x``, copied where they differ."""
    cl = _channels_last(x)
    if cl is None:
        x = x.contiguous()
        cl = _channels_last(x)
    N, C = x.shape[0], x.shape[1]
    geom = _Geometry(cl, N, C, x.numel() // (N * C))
    matched = []
    for t in others:
        if t.shape != x.shape:
            raise ValueError(f"expected a tensor of shape {tuple(x.shape)}, got {tuple(t.shape)}")
        same_order = t.movedim(1, -1).is_contiguous() if cl else t.is_contiguous()
        if not same_order:
            t = t.movedim(1, -1).contiguous().movedim(-1, 1) if cl else t.contiguous()
        matched.append(t)
    return geom, x, matched


def _vec(v: Tensor | None, like: Tensor) -> Tensor:
    """A contiguous per-channel vector, or ``like`` as a placeholder pointer for None."""
    return like if v is None else v.contiguous()


# --- launch helpers -----------------------------------------------------------------


@dataclass(frozen=True)
class _ReductionPlan:
    channel_blocks: int  # grid axis 0
    programs: int        # P, grid axis 1: programs per channel block
    tiles_per_prog: int
    n_tiles: int         # tiles per channel block
    n_col_tiles: int     # column blocks per row block (NCHW: spatial blocks; else 1)
    block_r: int
    block_k: int


def _reduction_plan(g: _Geometry, device: torch.device) -> _ReductionPlan:
    t = _tuning(device)
    if g.cl:
        rows, block_k = g.N * g.S, min(_pow2(g.C), t.max_cols_cl)
        channel_blocks, n_col_tiles = _cdiv(g.C, block_k), 1
    else:
        rows, block_k = g.N, min(_pow2(g.S), t.max_cols_ncs)
        channel_blocks, n_col_tiles = g.C, _cdiv(g.S, block_k)
    block_r = min(max(1, t.tile // block_k), _pow2(rows))
    n_tiles = _cdiv(rows, block_r) * n_col_tiles
    target = t.programs_per_sm * _sm_count(device)
    programs = min(n_tiles, max(1, _cdiv(target, channel_blocks)))
    tiles_per_prog = _cdiv(n_tiles, programs)
    programs = _cdiv(n_tiles, tiles_per_prog)
    return _ReductionPlan(channel_blocks, programs, tiles_per_prog, n_tiles, n_col_tiles,
                          block_r, block_k)


def _elementwise_grid(g: _Geometry, device: torch.device) -> tuple[tuple[int, int], dict]:
    """Grid and block sizes of an elementwise kernel over ``g.matrix``."""
    t = _tuning(device)
    rows, cols = g.matrix
    block_k = min(_pow2(cols), t.max_cols_cl if g.cl else t.max_cols_ncs)
    block_r = min(max(1, t.tile // block_k), _pow2(rows))
    grid = (_cdiv(rows, block_r), _cdiv(cols, block_k))
    return grid, dict(CL=g.cl, BLOCK_R=block_r, BLOCK_K=block_k, num_warps=t.num_warps)


def _stats(x: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, biased var, 1 / sqrt(var + eps)) per channel, float32."""
    g, x, _ = _prepare(x)
    plan = _reduction_plan(g, x.device)
    t = _tuning(x.device)
    f32 = dict(dtype=torch.float32, device=x.device)
    cnt, mean_p, m2_p = (torch.empty((g.C, plan.programs), **f32) for _ in range(3))
    kern.stats_partial_kernel[(plan.channel_blocks, plan.programs)](
        x, cnt, mean_p, m2_p,
        g.N, g.C, g.S, plan.programs, plan.tiles_per_prog, plan.n_tiles, plan.n_col_tiles,
        CL=g.cl, BLOCK_R=plan.block_r, BLOCK_K=plan.block_k, num_warps=t.num_warps,
    )
    mean, var, invstd = (torch.empty(g.C, **f32) for _ in range(3))
    block_c = min(_pow2(g.C), t.merge_block)
    kern.stats_merge_kernel[(_cdiv(g.C, block_c),)](
        cnt, mean_p, m2_p, mean, var, invstd, g.C, plan.programs, float(eps),
        BLOCK_C=block_c, BLOCK_P=min(_pow2(plan.programs), t.merge_block),
    )
    return mean, var, invstd


def _normalize(
    x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None,
    act: str, alpha: float,
) -> Tensor:
    g, x, _ = _prepare(x)
    y = torch.empty_like(x)
    grid, meta = _elementwise_grid(g, x.device)
    rows, cols = g.matrix
    kern.normalize_kernel[grid](
        x, y, mean.contiguous(), invstd.contiguous(), _vec(weight, mean), _vec(bias, mean),
        rows, cols, g.C, float(alpha),
        HAS_W=weight is not None, HAS_B=bias is not None, ACT=activations.CODES[act], **meta,
    )
    return y


def _grad_sums(
    g_in: Tensor, v: Tensor, center: Tensor | None, scale: Tensor | None, scale_mode: int,
    from_output: bool, act: str, alpha: float,
) -> tuple[Tensor, Tensor]:
    """(sum g, scale * sum g * (u - center)) per channel, float32 (see grad_partial_kernel)."""
    geom, v, (g_in,) = _prepare(v, g_in)
    plan = _reduction_plan(geom, v.device)
    t = _tuning(v.device)
    f32 = dict(dtype=torch.float32, device=v.device)
    part_g, part_gu = (torch.empty((geom.C, plan.programs), **f32) for _ in range(2))
    kern.grad_partial_kernel[(plan.channel_blocks, plan.programs)](
        g_in, v, _vec(center, part_g), part_g, part_gu,
        geom.N, geom.C, geom.S, plan.programs, plan.tiles_per_prog, plan.n_tiles,
        plan.n_col_tiles, float(alpha),
        FROM_OUTPUT=from_output, HAS_CENTER=center is not None, ACT=activations.CODES[act],
        CL=geom.cl, BLOCK_R=plan.block_r, BLOCK_K=plan.block_k, num_warps=t.num_warps,
    )
    sum_dy, sum_dy_xhat = (torch.empty(geom.C, **f32) for _ in range(2))
    block_c = min(_pow2(geom.C), t.merge_block)
    kern.grad_merge_kernel[(_cdiv(geom.C, block_c),)](
        part_g, part_gu, _vec(scale, part_g), sum_dy, sum_dy_xhat, geom.C, plan.programs,
        SCALE_MODE=scale_mode, BLOCK_C=block_c,
        BLOCK_P=min(_pow2(plan.programs), t.merge_block),
    )
    return sum_dy, sum_dy_xhat


def _grad_elemt(
    g_in: Tensor, v: Tensor, center: Tensor | None, invstd: Tensor, weight: Tensor | None,
    sums: tuple[Tensor, Tensor] | None, count: float, from_output: bool, act: str, alpha: float,
) -> Tensor:
    """dx (see grad_elemt_kernel); ``sums`` = (sum_dy, sum_dy_xhat) in training, else None."""
    geom, v, (g_in,) = _prepare(v, g_in)
    dx = torch.empty_like(v)
    grid, meta = _elementwise_grid(geom, v.device)
    rows, cols = geom.matrix
    sum_dy, sum_dy_xhat = sums if sums is not None else (invstd, invstd)
    kern.grad_elemt_kernel[grid](
        g_in, v, dx, _vec(center, invstd), invstd.contiguous(), _vec(weight, invstd),
        sum_dy.contiguous(), sum_dy_xhat.contiguous(), rows, cols, geom.C,
        1.0 / float(count), float(alpha),
        TRAINING=sums is not None, FROM_OUTPUT=from_output, HAS_W=weight is not None,
        HAS_CENTER=center is not None, ACT=activations.CODES[act], **meta,
    )
    return dx


# --- the contract -------------------------------------------------------------------


def supports(x: Tensor) -> bool:
    """CUDA tensors (CPU ones under the interpreter) of float32/float16/bfloat16, at least
    2-d, non-empty, NCHW-contiguous or channels last."""
    on_device = x.is_cuda or (INTERPRETED and x.device.type == "cpu")
    return (
        on_device and x.dtype in _DTYPES and x.dim() >= 2 and x.numel() > 0
        and _channels_last(x) is not None
    )


def prefers(op: str, x: Tensor) -> bool:
    """``auto`` takes these kernels wherever they run."""
    return supports(x)


def accepts_running(x: Tensor, running_mean: Tensor, running_var: Tensor) -> bool:
    return False


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance in float32 (split Welford/Chan reduction)."""
    mean, var, _ = _stats(x, 0.0)
    return mean, var


def normalize(
    x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    """y = (x - mean) * invstd * weight + bias, in float32, stored in x's dtype and layout."""
    return _normalize(x, mean, invstd, weight, bias, "identity", 0.0)


def forward_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Training forward: batch statistics, then normalise. Returns (y, mean, invstd)."""
    mean, _, invstd = _stats(x, eps)
    return _normalize(x, mean, invstd, weight, bias, "identity", 0.0), mean, invstd


def backward_reduce(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor) -> tuple[Tensor, Tensor]:
    """sum(dy) and sum(dy * x_hat) per channel (x_hat = (x - mean) * invstd), float32."""
    return _grad_sums(dy, x, mean, invstd, 1, False, "identity", 0.0)


def backward_elemt(
    dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
    sum_dy: Tensor, sum_dy_xhat: Tensor, count: float,
) -> Tensor:
    """dx = weight * invstd * (dy - sum_dy / m - x_hat * sum_dy_xhat / m), m = ``count``."""
    return _grad_elemt(dy, x, mean, invstd, weight, (sum_dy, sum_dy_xhat), count, False,
                       "identity", 0.0)


def backward(
    dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
    output_mask: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Closed-form training backward: (dx, dweight, dbias), None where masked off."""
    sums = backward_reduce(dy, x, mean, invstd)
    dx = None
    if output_mask[0]:
        count = x.numel() // x.shape[1]
        dx = _grad_elemt(dy, x, mean, invstd, weight, sums, count, False, "identity", 0.0)
    return dx, sums[1] if output_mask[1] else None, sums[0] if output_mask[2] else None


def backward_eval(
    dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
    output_mask: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Backward of the eval forward (fixed statistics): dx = dy * weight * invstd."""
    dx = dw = db = None
    if output_mask[0]:
        dx = _grad_elemt(dy, x, None, invstd, weight, None, 1.0, False, "identity", 0.0)
    if output_mask[1] or output_mask[2]:
        db, dw = backward_reduce(dy, x, mean, invstd)
    return dx, dw if output_mask[1] else None, db if output_mask[2] else None


def forward_train_act(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, act: str, alpha: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Training forward of BN followed by an activation, fused. Returns (z, mean, invstd)."""
    activations.check(act, alpha)
    mean, _, invstd = _stats(x, eps)
    return _normalize(x, mean, invstd, weight, bias, act, alpha), mean, invstd


def forward_eval_act(
    x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None,
    act: str, alpha: float,
) -> Tensor:
    """Eval forward of BN (given statistics) followed by an activation, fused."""
    activations.check(act, alpha)
    return _normalize(x, mean, invstd, weight, bias, act, alpha)


def backward_act(
    dz: Tensor, z: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
    bias: Tensor | None, act: str, alpha: float, training: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of BN + invertible activation from the output z alone (see torch_backend).
    Returns (dx, dweight, dbias); dweight and dbias in float32."""
    activations.check(act, alpha)
    if not activations.is_invertible(act, alpha):
        raise ValueError(f"activation {act!r} (alpha={alpha}) is not invertible")
    sum_dy, sum_dy_xhat = _grad_sums(dz, z, bias, weight, 2 if weight is not None else 0,
                                     True, act, alpha)
    sums = (sum_dy, sum_dy_xhat) if training else None
    count = z.numel() // z.shape[1]
    dx = _grad_elemt(dz, z, bias, invstd, weight, sums, count, True, act, alpha)
    return dx, sum_dy_xhat, sum_dy
