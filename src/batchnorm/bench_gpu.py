"""Time the Triton kernels against torch's native batch norm (cuDNN where torch uses it) on
CUDA, at the BatchNorm input shapes of ResNet-50, in one run that also measures the GPU's
copy bandwidth.

Run on a machine with a CUDA GPU and ``triton`` (``pip install batchnorm[gpu]``)::

    python -m batchnorm.bench_gpu --out benchmarks/results/gpu.json

``run_cuda_cases`` returns the rows (the columns of ``batchnorm bench``) for a caller that
wants them; ``markdown`` formats them as the table of benchmarks/README.md.

Method: each timed call is preceded by a write of 256 MiB, so the L2 cache holds none of
its data; the time is the median over ``reps`` calls of CUDA events recorded around the
call, after warm-up calls (which also compile the kernels). Every case first checks that
ours and native agree. GB/s counts the bytes the two-pass algorithm must move (the byte
model below, tensor-sized reads and writes only); "% of bound" divides it by the bandwidth
of a large device-to-device copy (read + write) measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-5
# (C, H, W) of the BatchNorm inputs of torchvision's ResNet-50 (one of each distinct shape).
RESNET50_SHAPES = [
    (64, 112, 112), (64, 56, 56), (256, 56, 56), (128, 56, 56), (128, 28, 28),
    (512, 28, 28), (256, 28, 28), (256, 14, 14), (1024, 14, 14), (512, 14, 14),
    (512, 7, 7), (2048, 7, 7),
]
QUICK_SHAPES = [(64, 112, 112), (256, 56, 56), (512, 28, 28), (2048, 7, 7)]
# Agreement of ours with native, relative to 1 + the largest |native| value (two roundings
# of the output dtype; the float32 reductions differ in order).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@dataclass(frozen=True)
class _Op:
    """A timed operation: ``bytes_per_element`` tensor-sized reads + writes (byte model)."""

    name: str
    bytes_per_element: int


OPS = [
    _Op("train fwd", 3),             # stats: read x; normalise: read x, write y
    _Op("train fwd+bwd", 8),         # + backward sums: read dy, x; dx: read dy, x, write dx
    _Op("eval fwd", 2),              # read x, write y
    _Op("train fwd+relu", 3),        # as train fwd, activation fused
    _Op("train fwd+bwd leaky_relu", 8),  # backward from the output z: read dz, z (twice), write dx
]


def _time_ms(fn: Callable[[], object], reps: int, flush: Tensor) -> float:
    """Median milliseconds of ``fn`` over ``reps`` calls, each with a cold L2 cache."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def copy_bandwidth_gbps(flush: Tensor, reps: int = 20, nbytes: int = 1 << 30) -> float:
    """GB/s of a device-to-device copy of ``nbytes`` (counting read + write)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), reps, flush)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def op_pair(op: str, x: Tensor, w: Tensor, b: Tensor, dy: Tensor):
    """(ours, native) callables of ``op``, each returning the tensors the check compares."""
    from .kernels.triton import backend as tb

    var, mean = torch.var_mean(x.float(), dim=[0, 2, 3], correction=0)
    invstd = torch.rsqrt(var + EPS)
    xg, wg, bg = (t.detach().requires_grad_() for t in (x, w, b))

    if op == "train fwd":
        return (lambda: tb.forward_train(x, w, b, EPS)[0],
                lambda: F.batch_norm(x, None, None, w, b, True, 0.1, EPS))
    if op == "eval fwd":
        return (lambda: tb.normalize(x, mean, invstd, w, b),
                lambda: F.batch_norm(x, mean, var, w, b, False, 0.1, EPS))
    if op == "train fwd+relu":
        return (lambda: tb.forward_train_act(x, w, b, EPS, "relu", 0.0)[0],
                lambda: F.relu(F.batch_norm(x, None, None, w, b, True, 0.1, EPS)))
    if op == "train fwd+bwd":
        def ours():
            y, m, i = tb.forward_train(x, w, b, EPS)
            return tb.backward(dy, x, m, i, w)[0]

        def native():
            y = F.batch_norm(xg, None, None, wg, bg, True, 0.1, EPS)
            return torch.autograd.grad(y, (xg, wg, bg), dy)[0]
        return ours, native
    if op == "train fwd+bwd leaky_relu":
        def ours_act():
            z, m, i = tb.forward_train_act(x, w, b, EPS, "leaky_relu", 0.01)
            return tb.backward_act(dy, z, m, i, w, b, "leaky_relu", 0.01, True)[0]

        def native_act():
            z = F.leaky_relu(F.batch_norm(xg, None, None, wg, bg, True, 0.1, EPS), 0.01)
            return torch.autograd.grad(z, (xg, wg, bg), dy)[0]
        return ours_act, native_act
    raise ValueError(f"unknown op {op!r}: expected one of {[o.name for o in OPS]}")


def run_cuda_cases(
    batches: tuple[int, ...] = (32, 128),
    shapes: list[tuple[int, int, int]] = RESNET50_SHAPES,
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16),
    layouts: tuple[str, ...] = ("nchw", "channels_last"),
    ops: list[_Op] = OPS,
    reps: int = 30,
) -> list[dict]:
    """Time every (batch, shape, layout, dtype, op); one row each (see the module doc)."""
    if not torch.cuda.is_available():
        raise RuntimeError("run_cuda_cases needs a CUDA device; torch.cuda.is_available() is False")
    torch.manual_seed(0)
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    bound = copy_bandwidth_gbps(flush)
    device = torch.cuda.get_device_name()
    rows = []
    for n in batches:
        for c, h, w_ in shapes:
            for layout in layouts:
                fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                for dtype in dtypes:
                    x = torch.randn(n, c, h, w_, device="cuda").to(dtype, memory_format=fmt)
                    dy = torch.randn_like(x)
                    weight = torch.rand(c, device="cuda") + 0.5
                    bias = torch.randn(c, device="cuda")
                    for op in ops:
                        ours, native = op_pair(op.name, x, weight, bias, dy)
                        want = native().float()
                        err = (ours().float() - want).abs().max().item()
                        scale = 1.0 + want.abs().max().item()
                        ours_ms = _time_ms(ours, reps, flush)
                        native_ms = _time_ms(native, reps, flush)
                        gbps = op.bytes_per_element * x.numel() * x.element_size() / ours_ms / 1e6
                        rows.append(dict(
                            device=device, shape=f"{n}x{c}x{h}x{w_}", layout=layout,
                            dtype=str(dtype).removeprefix("torch."), op=op.name,
                            native_ms=native_ms, ours_ms=ours_ms, speedup=native_ms / ours_ms,
                            gbps=gbps, pct_of_bound=100 * gbps / bound, copy_gbps=bound,
                            max_abs_diff=err, agrees=err <= TOL[dtype] * scale,
                        ))
                    del x, dy
    return rows


def markdown(rows: list[dict]) -> str:
    """The rows as a markdown table (device and copy bandwidth in the heading line)."""
    if not rows:
        return ""
    head = (f"Device: {rows[0]['device']}; copy bandwidth {rows[0]['copy_gbps']:.0f} GB/s "
            f"(read + write).\n\n"
            "| shape | layout | dtype | op | native ms | ours ms | speed-up | GB/s | % of bound |"
            " agrees |\n|---|---|---|---|---:|---:|---:|---:|---:|---|\n")
    lines = [
        f"| {r['shape']} | {r['layout']} | {r['dtype']} | {r['op']} | {r['native_ms']:.3f} | "
        f"{r['ours_ms']:.3f} | {r['speedup']:.2f} | {r['gbps']:.0f} | {r['pct_of_bound']:.0f} | "
        f"{'yes' if r['agrees'] else 'NO (%.1e)' % r['max_abs_diff']} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 32, four shapes")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--out", help="also write the rows as JSON to this path")
    args = parser.parse_args()
    if args.quick:
        rows = run_cuda_cases(batches=(32,), shapes=QUICK_SHAPES, reps=args.reps)
    else:
        rows = run_cuda_cases(reps=args.reps)
    print(markdown(rows))
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
