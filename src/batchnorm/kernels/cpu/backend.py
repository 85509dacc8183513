"""Fused CPU kernels (numba): the ``torch_backend`` contract, faster on CPU tensors.

Why numba: it ships wheels for every platform torch does (no compiler on the user's
machine), compiles loops to vectorised, multi-threaded machine code, and caches the
machine code on disk (``cache=True``), so only the very first process pays for
compiling (a few seconds); later processes load it in milliseconds.

What runs where: float32/float64 CPU tensors that are either channel-major contiguous
(NCHW, NCL, NCDHW: viewed as (N, C, M)) or channels-last contiguous (NHWC, NDHWC, NLC and
(N, C) inputs: viewed as (R, C) rows). ``supports`` is False for everything else (half
types, CUDA, odd strides, empty tensors) and the dispatcher then uses ``torch_backend``.
Other tensor arguments (dy, weight, ...) are brought to x's dtype and memory layout.

Passes over memory (m = elements per channel):

* training forward: one read of x for the statistics (shifted sums), one
  write of y. Channel-major tensors with many channels are cut into blocks of channels
  that fit in a core's cache; one thread computes a block's statistics and then its
  output, so the second read of x comes from cache (``FUSE_BYTES``,
  ``FUSE_BLOCK_BYTES``), and reads the next block while it writes (a pipeline, see
  ``_nchw``; ``GROUP_BYTES``). Channels-last tensors and channel-major ones with few,
  large channels take two passes;
* training backward: one read of (dy, x) for sum(dy) and sum(dy * x_hat), one write of
  dx, fused per block in the same way;
* eval forward: one read, one write.

Small inputs (< ``PARALLEL_MIN`` elements) run on one thread: waking a second costs more
than it saves. The contract's kernels are pure; ``update_running`` (outside the contract,
called by ``batchnorm.stats``) is the one function that writes into given tensors.

Statistics: sums of values shifted by a per-channel constant, accumulated in the input
dtype over runs of ``_cpu_loops.CHUNK`` values (vectorised twice as wide as float64) and
in float64 across runs; mean and variance are formed in float64 and returned in the
accumulation dtype of the contract. A float32 channel with mean 1e4 and std 1 keeps its
variance to 1e-5 relative (tests/test_kernels_cpu.py). Per-channel scalars are computed
with IEEE semantics (``error_model="numpy"``): 1/sqrt(0) is +inf, never an exception.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
from numba.np.ufunc import parallel as _numba_parallel
import numpy as np
import torch
from torch import Tensor

from ..interface import ALL, Grads, Mask, Vector

from .. import activations, torch_backend
from .backup import viewable

try:  # a read-only install with no writable cache directory must not break import
    from . import _act as A
    from . import _address as ADDRESS
    from . import _nchw as NCHW
    from . import _nhwc as NHWC
    from . import _params as P
except (OSError, RuntimeError) as err:  # numba: "cannot cache function ..."
    raise ImportError(f"numba kernels unavailable ({err}); set NUMBA_CACHE_DIR") from err

name = "cpu"
OPS = torch_backend.OPS | {"update_running"}  # every operation but ATen's own two
records_autograd = False
blends_running = False
takes_backup = True

#: Elements per task below which splitting a channel over more threads does not pay.
MIN_TASK = 16384
#: Below this many elements a call runs on one thread: waking the others costs more.
PARALLEL_MIN = 32768
#: Bytes of one channel's arrays (inputs and output) up to which the fused kernels apply:
#: one channel still fits in a core's cache (2 MiB of L2 here).
FUSE_BYTES = 2 << 20
#: Bytes of one block's arrays the fused kernels' channel blocks aim for: a quarter of a
#: core's L2, leaving room for the next block, which the pipeline reads in meanwhile, and
#: for what else the cache holds. Blocks of a whole L2 (2 MiB) made a layer's training
#: forward + backward 1.11x-1.27x slower at 8x512x28x28, 8x1024x14x14 and 8x2048x7x7
#: (benchmarks/fuse_block.py, 2026-12-04, before the pipeline).
FUSE_BLOCK_BYTES = 512 << 10
#: Bytes of each sample's rows that the pipeline of a fused kernel handles in turn from the
#: block it writes and from the block it reduces (at least one channel's row): small
#: enough that the two memory streams overlap, large enough that a step's loop overhead
#: stays small (a sweep of a draft, 2026-12-04, not a committed command: 1-4 KiB alike, 8
#: KiB slower from memory at 8x1024x14x14 and 8x2048x7x7).
GROUP_BYTES = 2 << 10

_EMPTY = {torch.float32: np.empty(0, np.float32), torch.float64: np.empty(0, np.float64)}
#: numpy dtype of the accumulation dtype of each supported dtype (float32 -> float32:
#: the contract's statistics are in torch_backend.acc_dtype(x.dtype), which is x's own).
_ACC = {torch.float32: np.float32, torch.float64: np.float64}
_FLOATS = tuple(_ACC)

# Note on cost: these wrappers run several times per training step, and each torch call
# costs about a microsecond (more when the kernels have just flushed the caches), so they
# read shapes rather than make tensors (``x[0, 0]`` would), and take the cheapest views.


def _layout(x: Tensor) -> str | None:
    """"nchw" (channel-major contiguous), "nhwc" (channels-last contiguous) or None."""
    if not x.is_cpu or x.dtype not in _EMPTY or x.dim() < 2 or x.numel() == 0:
        return None
    if x.is_contiguous():  # one value per (n, c) reads as channels-last rows
        return "nchw" if x.numel() > x.shape[0] * x.shape[1] else "nhwc"
    if x.permute(0, *range(2, x.dim()), 1).is_contiguous():
        return "nhwc"
    return None


def supports(x: Tensor) -> bool:
    """float32/float64 CPU tensors, channel-major or channels-last contiguous, not empty."""
    return _layout(x) is not None


#: Elements from which these kernels beat PyTorch's ATen kernels (training) and a single
#: torch.addcmul pass (eval) on channel-major tensors, on every machine measured
#: (benchmarks/crossover.py, module steps, 2 threads): a 2-core Zen 4 had them win every
#: shape from 196K elements on; a 2-core Intel Xeon (2 MiB L2, 2026-12-04) had ATen's
#: kernels as fast or faster up to 262K (ours 1.00x-1.30x their time) but at 2x2 spatial
#: rows, and these kernels faster at 327K-786K (0.66x-0.91x; 8x2560x4x4 1.06x).
PREFER_MIN = 300_000
#: The same for BN + activation (``*_act`` operations), where one fused kernel replaces
#: ATen's BN and its separate activation pass: these kernels were faster from 131K
#: elements on both machines (Xeon: 0.70x-0.84x of ATen's route at 131K-524K; tie at 65K).
PREFER_MIN_ACT = 100_000
_ACT_OPS = frozenset(("forward_train_act", "forward_eval_act", "backward_act",
                      "backward_act_input"))


def prefers(op: str, x: Tensor) -> bool:
    """Where ``auto`` dispatch should use these kernels: channel-major tensors of at least
    ``PREFER_MIN`` elements (``PREFER_MIN_ACT`` for BN + activation). Below that the
    per-call cost dominates, and for channels_last and (N, C) input PyTorch's own kernels
    are faster (benchmarks/README.md)."""
    least = PREFER_MIN_ACT if op in _ACT_OPS else PREFER_MIN
    return x.numel() >= least and _layout(x) == "nchw" and x.dim() >= 3


def _view(t: Tensor, layout: str) -> np.ndarray:
    """The (N, C, M) or (R, C) numpy view of a tensor laid out as ``layout`` (no copy)."""
    t = t.detach()
    if layout == "nchw":  # numpy's reshape of a contiguous array is a view, and cheaper
        return t.numpy().reshape(t.shape[0], t.shape[1], -1)
    return t.permute(0, *range(2, t.dim()), 1).reshape(-1, t.shape[1]).numpy()


def _like(t: Tensor, x: Tensor) -> Tensor:
    """``t`` with x's dtype and strides (a copy only when they differ)."""
    if t.dtype == x.dtype and t.is_cpu and t.stride() == x.stride():
        return t
    out = torch.empty_like(x)
    out.copy_(t.detach())
    return out


def _check(x: Tensor, grad: Tensor | None = None, **vectors: Tensor | None) -> None:
    """Raise ValueError unless every per-channel vector given (None: absent) has
    ``x.shape[1]`` elements and ``grad`` (dy or dz) has x's shape. The numba kernels index
    these arrays by x's sizes, so a short one would be read or written out of bounds;
    every wrapper below checks before handing arrays to a kernel, however it is called
    (Python int comparisons only)."""
    c = x.shape[1]
    for name, v in vectors.items():
        if v is not None and v.numel() != c:
            raise ValueError(
                f"cpu kernels: {name} must have {c} elements (one per channel of the input "
                f"of size {list(x.shape)}), got size {list(v.shape)}. Pass per-channel "
                f"vectors of length {c}."
            )
    if grad is not None and grad.shape != x.shape:
        raise ValueError(
            f"cpu kernels: the gradient must have the input's size {list(x.shape)}, got "
            f"size {list(grad.shape)}"
        )


def _vec(v: Tensor | None, x: Tensor) -> np.ndarray:
    """A per-channel vector as a contiguous numpy array in the accumulation dtype; empty
    for None (the kernels read an empty weight as 1 and an empty bias as 0)."""
    acc = torch_backend.acc_dtype(x.dtype)
    if v is None:
        return _EMPTY[acc]
    if v.dtype == acc and v.is_cpu and v.is_contiguous():
        return v.detach().numpy()
    return v.detach().to(device="cpu", dtype=acc).contiguous().numpy()


def _acc(v: np.ndarray, x: Tensor) -> Tensor:
    """A float64 numpy vector as a tensor in x's accumulation dtype (cast by numpy)."""
    return torch.from_numpy(v.astype(_ACC[x.dtype], copy=False))


def _parts(x: Tensor, layout: str, threads: int) -> int:
    """How many tasks to cut each channel (nchw) or the rows (nhwc) into, for ``threads``
    numba threads."""
    c = x.shape[1]
    per_channel = x.numel() // c
    if layout == "nchw":
        if c >= 4 * threads:
            return 1
        return max(1, min(-(-4 * threads // c), per_channel // MIN_TASK))
    return max(1, min(4 * threads, x.numel() // MIN_TASK))


def _block(x: Tensor, layout: str, parts: int, arrays: int, threads: int) -> tuple[int, int]:
    """(block, group) of a fused kernel, whose ``arrays`` tensors of one block must stay in
    cache between its two passes: channels per block, and per step of the pipeline
    (``GROUP_BYTES`` of each sample's rows; 0: no overlap, a block's channels exceed
    ``FUSE_BLOCK_BYTES`` and two would not share a core's cache); (0, 0) where the fused
    kernels do not apply. Each of the ``threads`` tasks gets the same number of blocks, at
    least two where there are channels enough (the pipeline overlaps a block's reads with
    the previous block's writes)."""
    c = x.shape[1]
    per_channel = x.numel() // c * x.element_size() * arrays
    if layout != "nchw" or parts != 1 or per_channel > FUSE_BYTES:
        return 0, 0
    # channels below the block target are grouped up to it; larger ones (up to
    # FUSE_BYTES) as many as fit in FUSE_BYTES, as before the target existed
    per_block = FUSE_BLOCK_BYTES // per_channel or FUSE_BYTES // per_channel
    share = -(-c // threads)  # channels per task
    blocks = min(share, max(2, -(-share // per_block)))  # blocks per task
    if per_channel > FUSE_BLOCK_BYTES:
        return -(-share // blocks), 0
    row = x.numel() // (x.shape[0] * c) * x.element_size()  # one channel of one sample
    return -(-share // blocks), max(1, GROUP_BYTES // row)


def accepts_running(x: Tensor, running_mean: Tensor, running_var: Tensor) -> bool:
    return False


_reader = None  # numba's own reader of its thread setting, from the first kernel call on


def _num_threads() -> int:
    """``numba.get_num_threads()``: numba's setting for the calling thread. That function
    checks on every call that numba's threads are up (two locks: about 2.5% of a BN layer's
    training step at 8x1024x14x14 when other layers ran in between, benchmarks/README.md),
    so after the first call, which starts them as the first kernel call always did (not at
    import: numba refuses parallel kernels in a process forked after its start), numba's
    own reader of the setting answers; the public function where a numba release lacks it
    or it answers what numba would refuse."""
    global _reader
    if _reader is None:
        threads = numba.get_num_threads()
        _reader = getattr(_numba_parallel, "_get_num_threads", None) or numba.get_num_threads
        return threads
    threads = _reader()
    return threads if threads >= 1 else numba.get_num_threads()


class _Geometry(NamedTuple):
    """What the kernels need to know of an input beyond its values (``_geometry``)."""

    layout: str | None  # ``_layout``: "nchw", "nhwc", or None (not these kernels' input)
    threads: int  # numba threads its kernels run on: 1 below ``PARALLEL_MIN`` elements
    one_thread: bool  # numba is set to more threads than that: set it to 1 for the call
    parts: int  # ``_parts``
    fused: tuple[tuple[int, int], ...]  # ``_block``'s (block, group) for 2, 3 and 4 arrays
    sizes: tuple[int, int, int]  # (N, C, M) of the channel-major view


_geometries: dict[tuple, _Geometry] = {}


def _geometry(x: Tensor) -> _Geometry:
    """The layout, threads and blocks of the kernels' calls on ``x``, worked out once per
    size, strides, dtype and setting (numba's threads and this module's thresholds, which
    tests and benchmarks change): every wrapper below starts here, on every call, and
    looking them up spares about fifteen tensor reads and four Python calls (about 1.5% of
    a BN layer's training step at 8x1024x14x14, benchmarks/README.md, "Kernel entries by
    address")."""
    setting = _num_threads()
    key = (x.shape, x.stride(), x.dtype, x.is_cpu, setting, MIN_TASK, PARALLEL_MIN,
           FUSE_BYTES, FUSE_BLOCK_BYTES, GROUP_BYTES)
    geometry = _geometries.get(key)
    if geometry is None:
        if len(_geometries) >= 256:  # a run of ever new sizes: start over
            _geometries.clear()
        geometry = _geometries[key] = _measure(x, setting)
    return geometry


def _measure(x: Tensor, setting: int) -> _Geometry:
    layout = _layout(x)
    if layout is None:  # the wrappers hand it to torch_backend
        return _Geometry(None, setting, False, 1, ((0, 0),) * 3, (0, 0, 0))
    small = x.numel() < PARALLEL_MIN
    threads = 1 if small else setting
    parts = _parts(x, layout, threads)
    n, c = x.shape[0], x.shape[1]
    return _Geometry(
        layout, threads, small and setting > 1, parts,
        tuple(_block(x, layout, parts, arrays, threads) for arrays in (2, 3, 4)),
        (n, c, x.numel() // (n * c)),
    )


def _on_one_thread(function, *args):
    """``function(*args)`` with numba set to one thread (then restored): a small input's
    kernels, where waking a second thread costs more than it saves. ``function`` is the
    wrapper itself, called again: its ``_geometry`` then finds the setting at 1."""
    setting = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        return function(*args)
    finally:
        numba.set_num_threads(setting)


def _contiguous(v: Tensor | None, x: Tensor) -> Tensor | None:
    """A per-channel vector as a contiguous CPU tensor in x's dtype (the accumulation dtype
    of float32/float64 input), as it is where it is one already: the tensor whose address
    an ``_address`` entry reads (the caller holds it for the call). None stays None."""
    if v is None or (v.dtype == x.dtype and v.is_cpu and v.is_contiguous()):
        return v
    return v.detach().to(device="cpu", dtype=x.dtype).contiguous()


def _address(v: Tensor | None) -> int:
    return 0 if v is None else v.data_ptr()


#: Activations computed inside the numba element loops: the piecewise linear ones.
#: elu, silu and gelu need exp/erf: the layer normalises with these kernels and ATen then
#: applies the activation in place (its vectorised kernel), one pass. In the input-saving
#: backward, silu and gelu in float32 are fused too (``_cpu_math`` writes out exp and erf
#: so that they vectorise; in float64 numba would call libm once per element).
LINEAR = ("identity", "relu", "leaky_relu")
SMOOTH = ("silu", "gelu")


def _fused_backward(act: str, x: Tensor) -> bool:
    """Whether ``act_backward_fused`` computes dy = dz * act'(y) for input ``x``."""
    return act in ("relu", "leaky_relu") or (act in SMOOTH and x.dtype == torch.float32)


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance (float64 shifted sums, one pass)."""
    g = _geometry(x)
    if g.one_thread:
        return _on_one_thread(batch_stats, x)
    if g.layout is None:
        return torch_backend.batch_stats(x)
    kernels = NCHW if g.layout == "nchw" else NHWC
    mean, var = kernels.stats(_view(x, g.layout), g.parts)
    return _acc(mean, x), _acc(var, x)


def _affine(
    x: Tensor, g: _Geometry, mean: np.ndarray, invstd: np.ndarray,
    weight: Tensor | None, bias: Tensor | None, code: int, alpha: float,
) -> Tensor:
    xn = _view(x, g.layout)
    out = torch.empty_like(x)
    hi, lo, scale, shift = P.affine(mean, invstd, _vec(weight, x), _vec(bias, x), xn)
    kernels = NCHW if g.layout == "nchw" else NHWC
    kernels.affine(xn, _view(out, g.layout), hi, lo, scale, shift, g.parts, code, alpha)
    return out


def normalize(
    x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    """y = (x - mean) * invstd * weight + bias, one pass."""
    return forward_eval_act(x, mean, invstd, weight, bias, "identity", 0.0)


def forward_eval_act(
    x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None,
    act: str, alpha: float,
) -> Tensor:
    """Eval forward of BN (given statistics) followed by an activation, one pass."""
    g = _geometry(x)
    if g.one_thread:
        return _on_one_thread(forward_eval_act, x, mean, invstd, weight, bias, act, alpha)
    if g.layout is None:
        return torch_backend.forward_eval_act(x, mean, invstd, weight, bias, act, alpha)
    _check(x, mean=mean, invstd=invstd, weight=weight, bias=bias)
    activations.check(act, alpha)
    if act not in LINEAR:
        return activations.apply_(normalize(x, mean, invstd, weight, bias), act, alpha)
    return _affine(
        x, g, _vec(mean, x), _vec(invstd, x), weight, bias, activations.CODES[act], alpha
    )


def forward_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, running=None
) -> tuple[Tensor, Tensor, Tensor]:
    """Training forward: statistics in one pass, normalise + affine in a second.
    Returns (y, mean, invstd). ``running``: the layer's ``cpu_backup.RunningBackup``,
    prepared for this step (``takes_backup``), which folds the batch into the running
    buffers right after the kernel (``RunningBackup.blend``: no trip back through
    ``batchnorm.stats``, about 1.5% of a BN layer's training step at 8x1024x14x14,
    benchmarks/README.md)."""
    return forward_train_act(x, weight, bias, eps, "identity", 0.0, running)


def forward_train_act(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, act: str, alpha: float,
    running=None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Training forward of BN followed by an activation. Returns (z, mean, invstd);
    ``running`` as for ``forward_train``."""
    g = _geometry(x)
    if g.one_thread:
        return _on_one_thread(forward_train_act, x, weight, bias, eps, act, alpha, running)
    if g.layout is None:
        return torch_backend.forward_train_act(x, weight, bias, eps, act, alpha)
    _check(x, weight=weight, bias=bias)
    activations.check(act, alpha)
    if act not in LINEAR:
        y, mean, invstd = forward_train(x, weight, bias, eps, running)
        return activations.apply_(y, act, alpha), mean, invstd
    code = activations.CODES[act]
    block, group = g.fused[0]
    if block:
        out = torch.empty_like(x)
        n, c, m = g.sizes
        w, b = _contiguous(weight, x), _contiguous(bias, x)
        mean, invstd = ADDRESS.forward_fused(
            _EMPTY[x.dtype], x.data_ptr(), _address(w), 0 if w is None else c, _address(b),
            0 if b is None else c, out.data_ptr(), n, c, m, eps, code, alpha, block, g.threads,
            group,
        )
    else:
        kernels = NCHW if g.layout == "nchw" else NHWC
        mean, var = kernels.stats(_view(x, g.layout), g.parts)
        invstd = P.invstd(var, eps)
        out = _affine(x, g, mean, invstd, weight, bias, code, alpha)
        acc = _ACC[x.dtype]  # the contract's dtype, as the fused kernel returns them
        mean, invstd = mean.astype(acc, copy=False), invstd.astype(acc, copy=False)
    if running is not None:
        running.blend(mean, invstd, eps, x.numel() // x.shape[1])
    return out, torch.from_numpy(mean), torch.from_numpy(invstd)


def backward_reduce(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor) -> tuple[Tensor, Tensor]:
    """sum(dy) and sum(dy * x_hat) per channel, one pass over (dy, x)."""
    g = _geometry(x)
    if g.one_thread:
        return _on_one_thread(backward_reduce, dy, x, mean, invstd)
    if g.layout is None:
        return torch_backend.backward_reduce(dy, x, mean, invstd)
    _check(x, dy, mean=mean, invstd=invstd)
    kernels = NCHW if g.layout == "nchw" else NHWC
    sd, sdx = kernels.reduce(
        _view(_like(dy, x), g.layout), _view(x, g.layout), _vec(mean, x), g.parts
    )
    return _acc(sd, x), _acc(sdx * _vec(invstd, x), x)


def backward_elemt(
    dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
    sum_dy: Tensor, sum_dy_xhat: Tensor, count: float,
) -> Tensor:
    """dx = weight * invstd * (dy - sum_dy / m - x_hat * sum_dy_xhat / m), one pass."""
    g = _geometry(x)
    if g.one_thread:
        return _on_one_thread(backward_elemt, dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat,
                              count)
    if g.layout is None:
        return torch_backend.backward_elemt(
            dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count
        )
    _check(x, dy, mean=mean, invstd=invstd, weight=weight, sum_dy=sum_dy,
           sum_dy_xhat=sum_dy_xhat)
    xn = _view(x, g.layout)
    ga, hi, lo, gb, gc = P.grad(
        _vec(mean, x), _vec(invstd, x), _vec(weight, x), _vec(sum_dy, x),
        _vec(sum_dy_xhat, x), float(count), xn,
    )
    out = torch.empty_like(x)
    kernels = NCHW if g.layout == "nchw" else NHWC
    kernels.grad_x(
        _view(_like(dy, x), g.layout), xn, _view(out, g.layout), ga, hi, lo, gb, gc, g.parts
    )
    return out


def backward(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Vector,
             output_mask: Mask = ALL) -> Grads:
    """Closed-form training backward: (dx, dweight, dbias), None where masked off."""
    g = _geometry(x)
    if g.one_thread:
        return _on_one_thread(backward, dy, x, mean, invstd, weight, output_mask)
    if g.layout is None:
        return torch_backend.backward(dy, x, mean, invstd, weight, output_mask)
    _check(x, dy, mean=mean, invstd=invstd, weight=weight)
    block, group = g.fused[1]
    if block:
        n, c, m = g.sizes
        out = torch.empty_like(x) if output_mask[0] else None
        dy, mean, invstd = _like(dy, x), _contiguous(mean, x), _contiguous(invstd, x)
        w = _contiguous(weight, x)
        sd, sdx = ADDRESS.backward_fused(
            _EMPTY[x.dtype], dy.data_ptr(), x.data_ptr(), mean.data_ptr(), invstd.data_ptr(),
            _address(w), 0 if w is None else c, _address(out), out is not None, n, c, m,
            block, g.threads, group,
        )
        return torch_backend.masked(output_mask, out, torch.from_numpy(sdx),
                                    torch.from_numpy(sd))
    return torch_backend.backward_by_parts(
        backward_reduce, backward_elemt, dy, x, mean, invstd, weight, output_mask
    )


def backward_eval(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Vector,
                  output_mask: Mask = ALL) -> Grads:
    """Backward of the eval forward (fixed statistics): dx = dy * weight * invstd."""
    g = _geometry(x)
    if g.one_thread:
        return _on_one_thread(backward_eval, dy, x, mean, invstd, weight, output_mask)
    if g.layout is None:
        return torch_backend.backward_eval(dy, x, mean, invstd, weight, output_mask)
    _check(x, dy, mean=mean, invstd=invstd, weight=weight)
    sums = (None, None)
    if output_mask[1] or output_mask[2]:
        sums = backward_reduce(dy, x, mean, invstd)
    dx = None
    if output_mask[0]:
        # dx = ((dy - 0) - 0) * (weight * invstd) + 0: the affine kernel applied to dy
        zero = torch.zeros_like(mean)
        dx = _affine(
            _like(dy, x), g, _vec(zero, x), _vec(invstd, x), weight, None,
            activations.CODES["identity"], 0.0,
        )
    return torch_backend.masked(output_mask, dx, sums[1], sums[0])


def backward_act(
    dz: Tensor, z: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
    bias: Tensor | None, act: str, alpha: float, training: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of BN + invertible activation from its output z alone: one pass for the
    sums, one for dx (see ``torch_backend.backward_act``)."""
    g = _geometry(z)
    if g.one_thread:
        return _on_one_thread(backward_act, dz, z, mean, invstd, weight, bias, act, alpha,
                              training)
    if g.layout is None:
        return torch_backend.backward_act(
            dz, z, mean, invstd, weight, bias, act, alpha, training
        )
    _check(z, dz, mean=mean, invstd=invstd, weight=weight, bias=bias)
    activations.check(act, alpha)
    if not activations.is_invertible(act, alpha):
        raise ValueError(f"activation {act!r} (alpha={alpha}) is not invertible")
    if act != "leaky_relu":
        return _backward_act_via_bn(dz, z, mean, invstd, weight, bias, act, alpha, training)
    code = activations.CODES[act]
    c = z.shape[1]
    shift = np.zeros(c) if bias is None else _vec(bias, z).astype(np.float64)
    w = np.ones(c) if weight is None else _vec(weight, z).astype(np.float64)
    rscale = 1.0 / w
    zn, dzn = _view(z, g.layout), _view(_like(dz, z), g.layout)
    kernels = NCHW if g.layout == "nchw" else NHWC
    # channel-major: the slope and 1 / alpha in z's dtype (the loops run in it)
    leaky = (_ACC[z.dtype](alpha), 1.0 / alpha) if g.layout == "nchw" else (code, alpha)
    sd, sdx = kernels.act_reduce(dzn, zn, shift, rscale, g.parts, *leaky)
    k = w * _vec(invstd, z)
    if training:
        m = z.numel() // c
        gb, gc = -k * sdx / m, -k * sd / m
    else:
        gb, gc = np.zeros(c), np.zeros(c)
    out = torch.empty_like(z)
    kernels.act_grad_x(dzn, zn, _view(out, g.layout), k, gb, gc, shift, rscale, g.parts, *leaky)
    return out, _acc(sdx, z), _acc(sd, z)


def backward_act_input(
    dz: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
    bias: Tensor | None, act: str, alpha: float, training: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``torch_backend.backward_act_input``: for the activations the element loops compute
    (but identity) on channel-major tensors one fused kernel, two passes over dz and x as
    the plain backward (relu's slope decided on x, silu's and gelu's derivative at y
    recomputed from x); otherwise y, then dy by ATen's activation backward, then BN's
    backward."""
    g = _geometry(x)
    if g.one_thread:
        return _on_one_thread(backward_act_input, dz, x, mean, invstd, weight, bias, act, alpha,
                              training)
    if g.layout is None:
        return torch_backend.backward_act_input(
            dz, x, mean, invstd, weight, bias, act, alpha, training
        )
    _check(x, dz, mean=mean, invstd=invstd, weight=weight, bias=bias)
    activations.check(act, alpha)
    # dz, x and dx stay in cache between the two passes; silu and gelu add a scratch dy
    block, group = g.fused[2 if act in SMOOTH else 1]
    if not block or not _fused_backward(act, x):
        y = normalize(x, mean, invstd, weight, bias)
        dy = activations.backward(_like(dz, x), y, act, alpha)
        grads = (backward if training else backward_eval)(dy, x, mean, invstd, weight)
        return grads[0], grads[1], grads[2]
    n, c, m = g.sizes
    out = torch.empty_like(x)
    low = _ACC[x.dtype](alpha if act == "leaky_relu" else 0.0)  # the slope at y <= 0
    dz, mean, invstd = _like(dz, x), _contiguous(mean, x), _contiguous(invstd, x)
    w, b = _contiguous(weight, x), _contiguous(bias, x)
    sd, sdx = ADDRESS.act_backward_fused(
        _EMPTY[x.dtype], dz.data_ptr(), x.data_ptr(), mean.data_ptr(), invstd.data_ptr(),
        _address(w), 0 if w is None else c, _address(b), 0 if b is None else c, out.data_ptr(),
        activations.CODES[act], low, training, n, c, m, block, g.threads, group,
    )
    return out, _acc(sdx, x), _acc(sd, x)


def _backward_act_via_bn(
    dz: Tensor, z: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
    bias: Tensor | None, act: str, alpha: float, training: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``backward_act`` for identity and elu: ``torch_backend.backward_act_by_bn`` with
    these fused BN kernels. leaky_relu keeps its own kernels (``act_reduce``,
    ``act_grad_x``): its inverse and slope are cheap inside the loop."""
    return torch_backend.backward_act_by_bn(
        backward, backward_eval, _like(dz, z), z, mean, invstd, weight, bias, act, alpha,
        training,
    )


def _plain(t: Tensor) -> bool:
    """A plain contiguous CPU float vector that numpy may view (``cpu_backup.viewable``)."""
    return viewable(t, _FLOATS, 1)


def finite_batch(mean: Tensor, invstd: Tensor, eps: float) -> bool | None:
    """``batchnorm.stats.finite_batch`` in one compiled call; None where it does not apply.

    Only reads: numpy's view of any float32/float64 CPU tensor will do, so instead of the
    attribute checks of ``_plain`` (several microseconds right after a large kernel, on
    every training step) ``.numpy()`` is simply tried: it refuses tensors that require
    grad, live elsewhere than on the CPU or are wrapped by torch.func."""
    if mean.dtype not in _EMPTY or invstd.dtype not in _EMPTY:
        return None
    if invstd.numel() != mean.numel():
        raise ValueError(f"cpu kernels: invstd must have mean's {mean.numel()} elements, "
                         f"got size {list(invstd.shape)}")
    try:
        m, s = mean.numpy(), invstd.numpy()
    except (RuntimeError, TypeError):
        return None
    return P.finite_batch(m, s, float(eps))


def magnitudes_at_least(w: Tensor, floor: float) -> bool | None:
    """Whether every ``|w|`` is at least ``floor`` (NaN counts as at least), in one compiled
    call with the comparison in w's dtype, as ``clamp`` makes it; None where it does not
    apply. As ``finite_batch``, ``.numpy()`` is simply tried (it refuses tensors that
    require grad, live elsewhere than on the CPU or are wrapped by torch.func)."""
    if w.dtype not in _EMPTY or w.dim() != 1:
        return None
    try:
        view = w.numpy()
    except (RuntimeError, TypeError):
        return None
    return P.at_least(view, _ACC[w.dtype](floor))


def update_running(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, invstd: Tensor, eps: float,
    correction: float, momentum: float | None, num_batches_tracked: Tensor | None = None,
    backup=None,
) -> bool | None:
    """The running-statistic update of ``batchnorm.stats`` in one compiled call (a dozen
    small torch operations otherwise; ``interface.Backend.update_running``): True if
    applied (``num_batches_tracked`` incremented), False if a statistic is not finite
    (nothing written), None where it does not apply (the caller then uses torch).
    ``momentum=None``: the cumulative average, factor 1 / num_batches_tracked after the
    increment (one host read of the count: CPU tensors). ``backup``: the layer's
    ``cpu_backup.RunningBackup``, whose numpy views of the buffers, made once, spare the
    checks of every tensor on every step (BatchNormAct's update; plain BN on these kernels
    folds the batch in inside ``forward_train`` through the same views)."""
    if backup is not None:
        verdict = backup.update(running_mean, running_var, num_batches_tracked, mean, invstd,
                                eps, correction, momentum)
        if verdict is not None:
            return verdict
    if not (_plain(running_mean) and _plain(running_var) and _plain(mean) and _plain(invstd)):
        return None
    _check(mean[None], running_mean=running_mean, running_var=running_var, invstd=invstd)
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
        factor = 1.0 / max(int(num_batches_tracked) + 1, 1)
    else:
        factor = momentum
    ok = P.running_update(
        running_mean.numpy(), running_var.numpy(), mean.numpy(), invstd.numpy(),
        float(eps), float(correction), float(factor),
    )
    if ok:  # written through numpy: tell autograd the buffers changed, as torch's add_ would
        torch.autograd.graph.increment_version((running_mean, running_var))
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)  # an integer buffer: autograd never records it
    return ok
