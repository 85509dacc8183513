"""Time the Triton kernels against torch's native batch norm (cuDNN where torch uses it) on
CUDA, at the BatchNorm input shapes of ResNet-50, in one run that also measures the GPU's
copy bandwidth.

Run on a machine with a CUDA GPU and ``triton`` (``pip install batchnorm[gpu]``)::

    python -m batchnorm.bench_gpu --out benchmarks/results/gpu.json

``--dry-run`` runs the same code on CPU at one tiny shape, in Triton's interpreter
(``TRITON_INTERPRET=1`` must be set before Python starts): it checks the benchmark, not
the speed (its times are meaningless). ``--budget-s`` stops timing new cases once that
many seconds have passed (the cases left out are listed); the JSON file is rewritten
after every case, so a run killed from outside keeps what it measured.

``run_cases`` returns the rows (the columns of ``batchnorm bench``) for a caller that
wants them; ``markdown`` formats them as the table of benchmarks/README.md and
``summary`` reads them against issue 19's targets.

Method: each timed call is preceded by a write of 256 MiB, so the L2 cache holds none of
its data; the time is the median over ``reps`` calls of CUDA events recorded around the
call, after warm-up calls (which also compile the kernels). Every case first checks that
ours and native agree. GB/s counts the bytes the two-pass algorithm must move (the byte
model below, tensor-sized reads and writes only); "% of bound" divides it by the bandwidth
of a large device-to-device copy (read + write) measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-5
LEAKY_ALPHA = 0.01  # the negative slope of the BN + leaky ReLU op
# (C, H, W) of the BatchNorm inputs of torchvision's ResNet-50 (one of each distinct shape).
RESNET50_SHAPES = [
    (64, 112, 112), (64, 56, 56), (256, 56, 56), (128, 56, 56), (128, 28, 28),
    (512, 28, 28), (256, 28, 28), (256, 14, 14), (1024, 14, 14), (512, 14, 14),
    (512, 7, 7), (2048, 7, 7),
]
QUICK_SHAPES = [(64, 112, 112), (256, 56, 56), (512, 28, 28), (2048, 7, 7)]
# --dry-run: a channel count and a spatial size that cross the interpreter's blocks (8
# channels wide in channels last, 16 positions in NCHW).
DRY_RUN_SHAPES = [(9, 4, 5)]
# Agreement of ours with native, relative to 1 + the largest |native| value (two roundings
# of the output dtype; the float32 reductions differ in order).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@dataclass(frozen=True)
class _Op:
    """A timed operation: ``bytes_per_element`` tensor-sized reads + writes (byte model)."""

    name: str
    bytes_per_element: int


OPS = [
    _Op("train fwd+bwd", 8),         # stats: read x; normalise: read x, write y;
                                     # backward sums: read dy, x; dx: read dy, x, write dx
    _Op("layer fwd+bwd", 8),         # the same through the modules (autograd, running stats)
    _Op("train fwd", 3),             # stats: read x; normalise: read x, write y
    _Op("eval fwd", 2),              # read x, write y
    _Op("train fwd+relu", 3),        # as train fwd, activation fused
    _Op("train fwd+bwd leaky_relu", 8),  # backward from the output z: read dz, z (twice), write dx
]
OP_NAMES = [op.name for op in OPS]
PRIMARY_OPS = ("train fwd+bwd", "layer fwd+bwd")  # issue 19's targets


class _Timer:
    """Median milliseconds of a callable: CUDA events with a cold L2 cache on CUDA, wall
    clock on CPU (the dry run)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        # a write of 256 MiB before each timed call evicts the L2 cache (60 MB on an H200)
        self.flush = torch.empty(256 << 20 if self.cuda else 1, dtype=torch.uint8, device=device)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def ms(self, fn: Callable[[], object], reps: int, warmup: int) -> float:
        for _ in range(warmup):
            fn()
        self.sync()
        if not self.cuda:
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
            return statistics.median(times)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
        for start, end in events:
            self.flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) for start, end in events)


def copy_bandwidth_gbps(timer: _Timer, device: torch.device, reps: int = 20,
                        nbytes: int = 1 << 30) -> float:
    """GB/s of a device-to-device copy of ``nbytes`` (counting read + write)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer.ms(lambda: dst.copy_(src), reps, warmup=3)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _triton():
    """The Triton backend module (``batchnorm.kernels.load("triton")``)."""
    from . import kernels

    tb = kernels.load("triton")
    if tb is None:
        raise ImportError("the Triton backend is not available: batchnorm.kernels.load("
                          "'triton') is None (is triton installed? pip install batchnorm[gpu])")
    return tb


def op_pair(op: str, x: Tensor, w: Tensor, b: Tensor, dy: Tensor):
    """(ours, native) callables of ``op``, each returning the tensor the check compares
    (the output, or the input gradient); ``agreement`` compares them."""
    tb = _triton()

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
    if op == "layer fwd+bwd":
        return _layer_pair(x, w, b, dy)
    if op == "train fwd+bwd leaky_relu":
        def ours_act():
            z, m, i = tb.forward_train_act(x, w, b, EPS, "leaky_relu", LEAKY_ALPHA)
            return tb.backward_act(dy, z, m, i, w, b, "leaky_relu", LEAKY_ALPHA, True)[0]

        def native_act():
            z = F.leaky_relu(F.batch_norm(xg, None, None, wg, bg, True, 0.1, EPS), LEAKY_ALPHA)
            return torch.autograd.grad(z, (xg, wg, bg), dy)[0]
        return ours_act, native_act
    raise ValueError(f"unknown op {op!r}: expected one of {OP_NAMES}")


def agreement(op: str, x: Tensor, w: Tensor, b: Tensor, dy: Tensor, ours: Tensor,
              native: Tensor, flipped: Tensor | None = None) -> dict:
    """Whether ``ours`` and ``native`` (what ``op_pair``'s callables return) agree:
    ``|ours - native| <= TOL * (1 + max|native|)`` at every element, beyond what the
    kink of BN + leaky ReLU explains (``kink``). Returns ``agrees``, ``max_abs_diff`` (the
    largest difference beyond that allowance), and for the leaky op ``kink_elements``
    (elements left out) and ``kink_allowance`` (the largest allowance). ``flipped``: the
    elements the two forwards put on different sides of the kink, if known (else
    ``kink`` finds them)."""
    diff = (ours.float() - native.float()).abs()
    scale = 1.0 + native.float().abs().max().item()
    out = {}
    explained = (kink(op, x, w, b, dy) if flipped is None or op != "train fwd+bwd leaky_relu"
                 else (flipped, kink_allowance(flipped, x, w, dy)))
    if explained is not None:
        left_out, allowance = explained
        diff = (diff - allowance).clamp_(min=0).masked_fill_(left_out, 0.0)
        out.update(kink_elements=int(left_out.sum()), kink_allowance=allowance.max().item())
    err = diff.max().item()
    return dict(out, max_abs_diff=err, agrees=err <= TOL[x.dtype] * scale)


def kink(op: str, x: Tensor, w: Tensor, b: Tensor, dy: Tensor) -> tuple[Tensor, Tensor] | None:
    """What the kink of BN + leaky ReLU explains in the backward's dx, as (elements left
    out, allowance per element); None for the other ops.

    Where the normalised value y is within rounding of 0, two correct implementations put
    it on either side (slope 1 vs alpha): both take slope 1 only where their own value is
    above 0 (ours from its output z, ATen from its y), and the two values may round to
    different signs. Such a flipped element k differs in dx by about
    ``|dy * weight * invstd|`` (left out), and it changes the channel's two sums by
    ``d = (1 - alpha) * dy_k`` and ``d * x_hat_k``, which moves EVERY dx_i of the channel
    by ``weight * invstd / m * d * (1 + x_hat_i * x_hat_k)`` (dx = g (dy' - mean(dy') -
    x_hat mean(dy' x_hat)) is linear in the sums; m elements per channel). The allowance is
    the sum of these over the channel's flipped elements (the 2026-12-04 GPU run's one
    disagreement, 9e-5 at 128x256x28x28 float32: one flip in 25.7M elements)."""
    if op != "train fwd+bwd leaky_relu":
        return None
    ours_pos = _triton().forward_train_act(x, w, b, EPS, "leaky_relu", LEAKY_ALPHA)[0] > 0
    native_pos = F.batch_norm(x, None, None, w, b, True, 0.1, EPS) > 0
    flipped = ours_pos != native_pos
    return flipped, kink_allowance(flipped, x, w, dy)


def kink_allowance(flipped: Tensor, x: Tensor, w: Tensor, dy: Tensor,
                   alpha: float = LEAKY_ALPHA) -> Tensor:
    """Per element, the largest shift of dx that the ``flipped`` elements explain (see
    ``kink``): ``|weight * invstd| / m * (sum_k d_k + |x_hat_i| * sum_k d_k |x_hat_k|)``
    over the channel's flipped k, ``d_k = (1 - alpha) |dy_k|``."""
    var, mean = torch.var_mean(x.float(), dim=[0, 2, 3], correction=0)
    invstd = torch.rsqrt(var + EPS)
    x_hat = (x.float() - mean[:, None, None]) * invstd[:, None, None]
    d = dy.float().abs().masked_fill_(~flipped, 0.0) * (1.0 - alpha)
    sum_d = d.sum(dim=[0, 2, 3])
    sum_dx = (d * x_hat.abs()).sum(dim=[0, 2, 3])
    g = (w.float() * invstd).abs() / (x.numel() // x.shape[1])
    return g[:, None, None] * (sum_d[:, None, None] + x_hat.abs() * sum_dx[:, None, None])


def _layer_pair(x: Tensor, w: Tensor, b: Tensor, dy: Tensor):
    """batchnorm.BatchNorm2d against torch.nn.BatchNorm2d, both in training mode: forward
    (with the running-statistics update), then backward to x, weight and bias, as a
    model's step runs them. Returns the input gradient."""
    from . import BatchNorm2d

    layers = []
    for cls in (BatchNorm2d, torch.nn.BatchNorm2d):
        layer = cls(x.shape[1], eps=EPS, device=x.device)
        with torch.no_grad():
            layer.weight.copy_(w)
            layer.bias.copy_(b)
        layers.append(layer)
    xg = x.detach().requires_grad_()

    def step(layer):
        def run():
            layer.weight.grad = layer.bias.grad = xg.grad = None
            layer(xg).backward(dy)
            return xg.grad
        return run

    return step(layers[0]), step(layers[1])


@contextlib.contextmanager
def _triton_on(device: torch.device):
    """On CPU (the dry run, interpreted Triton) force the Triton backend for the layers;
    on CUDA leave the default (what users get: Triton)."""
    from . import kernels

    if device.type == "cuda":
        yield
    else:
        with kernels.use_backend("triton"):
            yield


def _cases(batches, shapes, layouts, dtypes, ops):
    """(batch, shape, layout, dtype, ops) to time: first every case with the ops the
    targets are about (forward + backward), then every case with the others, so that a
    run cut short by its budget has the targets' data complete first."""
    primary = [op for op in ops if op.name in PRIMARY_OPS]
    groups = [g for g in (primary, [op for op in ops if op not in primary]) if g]
    for group in groups:
        for n in batches:
            for c, h, w_ in shapes:
                for layout in layouts:
                    for dtype in dtypes:
                        yield n, (c, h, w_), layout, dtype, group


def run_cases(
    batches: tuple[int, ...] = (32, 128),
    shapes: list[tuple[int, int, int]] = RESNET50_SHAPES,
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16),
    layouts: tuple[str, ...] = ("nchw", "channels_last"),
    ops: list[_Op] = OPS,
    reps: int = 30,
    warmup: int = 3,
    device: str = "cuda",
    budget_s: float | None = None,
    on_row: Callable[[dict, dict], None] | None = None,
) -> tuple[list[dict], dict]:
    """Time every (batch, shape, layout, dtype, op); one row each (see the module doc).

    Returns ``(rows, meta)``: meta holds the device, the copy bandwidth, the versions, the
    Triton tuning and ``left_out``, the cases not timed for want of time (``budget_s``
    seconds from the start). ``on_row(row, meta)`` is called after every row."""
    tb = _triton()

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run_cases(device='cuda') needs a CUDA device; "
                           "torch.cuda.is_available() is False (use device='cpu' with "
                           "TRITON_INTERPRET=1 for a dry run)")
    if dev.type == "cpu" and not tb.INTERPRETED:
        raise RuntimeError("run_cases(device='cpu') runs the Triton kernels in the "
                           "interpreter: set TRITON_INTERPRET=1 before starting Python")
    import triton

    start = time.monotonic()
    torch.manual_seed(0)
    timer = _Timer(dev)
    meta = dict(
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (interpreted)",
        torch=torch.__version__, triton=triton.__version__, tuning=asdict(tb._tuning(dev)),
        copy_gbps=copy_bandwidth_gbps(timer, dev, nbytes=(1 << 30) if timer.cuda else 1 << 20),
        reps=reps, left_out=[],
    )
    bound = meta["copy_gbps"]
    rows: list[dict] = []
    for n, (c, h, w_), layout, dtype, case_ops in _cases(batches, shapes, layouts, dtypes, ops):
        name = (f"{n}x{c}x{h}x{w_} {layout} {str(dtype).removeprefix('torch.')}: "
                + ", ".join(op.name for op in case_ops))
        if budget_s is not None and time.monotonic() - start > budget_s:
            meta["left_out"].append(name)
            continue
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        x = torch.randn(n, c, h, w_, device=dev).to(dtype, memory_format=fmt)
        dy = torch.randn_like(x)
        weight = torch.rand(c, device=dev) + 0.5
        bias = torch.randn(c, device=dev)
        for op in case_ops:
            row = dict(device=meta["device"], shape=f"{n}x{c}x{h}x{w_}", layout=layout,
                       dtype=str(dtype).removeprefix("torch."), op=op.name, copy_gbps=bound)
            try:
                with _triton_on(dev):
                    ours, native = op_pair(op.name, x, weight, bias, dy)
                    row.update(agreement(op.name, x, weight, bias, dy, ours(), native()))
                    ours_ms = timer.ms(ours, reps, warmup)
                    native_ms = timer.ms(native, reps, warmup)
            except Exception as e:  # noqa: BLE001  recorded in the row; the next case runs
                row.update(error=f"{type(e).__name__}: {e}"[:1000], agrees=False)
            else:
                gbps = op.bytes_per_element * x.numel() * x.element_size() / ours_ms / 1e6
                row.update(native_ms=native_ms, ours_ms=ours_ms, speedup=native_ms / ours_ms,
                           gbps=gbps, pct_of_bound=100 * gbps / bound)
            rows.append(row)
            if on_row is not None:
                on_row(row, meta)
        del x, dy
    meta["seconds"] = time.monotonic() - start
    return rows, meta


def summary(rows: list[dict], meta: dict) -> dict:
    """The rows against issue 19's targets: for every (shape, layout, dtype), our training
    forward + backward at least as fast as native (``speedup >= 1``, kernels and layers),
    the median of its GB/s at least 80% of the copy bandwidth, and every pair agreeing."""

    def of(op):
        return [r for r in rows if r["op"] == op and "error" not in r]

    def median(values):
        return statistics.median(values) if values else None

    out = dict(device=meta.get("device"), copy_gbps=meta.get("copy_gbps"),
               rows=len(rows), left_out=len(meta.get("left_out", [])),
               failed=[f"{r['shape']} {r['layout']} {r['dtype']} {r['op']}: {r['error']}"
                       for r in rows if "error" in r],
               disagreeing=[f"{r['shape']} {r['layout']} {r['dtype']} {r['op']}"
                            for r in rows if not r["agrees"] and "error" not in r])
    for op in OP_NAMES:
        sel = of(op)
        if not sel:
            continue
        out[op] = dict(
            cases=len(sel),
            median_speedup=median([r["speedup"] for r in sel]),
            min_speedup=min(r["speedup"] for r in sel),
            slower_than_native=[f"{r['shape']} {r['layout']} {r['dtype']} "
                                f"({r['speedup']:.2f}x)" for r in sel if r["speedup"] < 1.0],
            median_pct_of_bound=median([r["pct_of_bound"] for r in sel]),
        )
    fb = out.get("train fwd+bwd")
    layer = out.get("layer fwd+bwd")
    out["targets"] = dict(
        fwd_bwd_never_slower=None if fb is None else not fb["slower_than_native"],
        layer_fwd_bwd_never_slower=None if layer is None else not layer["slower_than_native"],
        fwd_bwd_median_at_least_80pct_of_copy=(
            None if fb is None else fb["median_pct_of_bound"] >= 80.0),
        all_agree=not out["disagreeing"],
        complete=not meta.get("left_out") and not out["failed"],
    )
    return out


def markdown(rows: list[dict]) -> str:
    """The rows as a markdown table (device and copy bandwidth in the heading line); rows
    that failed are listed after it."""
    failed = [r for r in rows if "error" in r]
    rows = [r for r in rows if "error" not in r]
    tail = "".join(f"\nFAILED {r['shape']} {r['layout']} {r['dtype']} {r['op']}: {r['error']}"
                   for r in failed)
    if not rows:
        return tail
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
    return head + "\n".join(lines) + "\n" + tail


def _write(path: str, rows: list[dict], meta: dict, complete: bool) -> None:
    """Write the JSON result (atomically: a run killed mid-write keeps the last one)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dict(meta, complete=complete, summary=summary(rows, meta), rows=rows), f,
                  indent=1)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """The command line; exit status 1 when a case failed (its row says why)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 32, four shapes")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, Triton's interpreter, batch 2 at one tiny shape, 1 rep "
                             "(checks the script, not the speed; needs TRITON_INTERPRET=1)")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--budget-s", type=float, default=None,
                        help="time no new case after this many seconds")
    parser.add_argument("--out", help="also write the rows as JSON to this path")
    args = parser.parse_args(argv)
    kwargs = dict(reps=args.reps, batches=tuple(args.batches), budget_s=args.budget_s)
    if args.quick:
        kwargs.update(batches=(32,), shapes=QUICK_SHAPES)
    if args.dry_run:
        kwargs.update(device="cpu", batches=(2,), shapes=DRY_RUN_SHAPES, reps=1, warmup=1)

    rows_so_far: list[dict] = []

    def on_row(row, meta):
        rows_so_far.append(row)
        case = f"{row['shape']} {row['layout']} {row['dtype']} {row['op']}"
        if "error" in row:
            print(f"{case}: FAILED {row['error']}", flush=True)
        else:
            print(f"{case}: ours {row['ours_ms']:.3f} ms, native {row['native_ms']:.3f} ms, "
                  f"{row['speedup']:.2f}x, {row['pct_of_bound']:.0f}% of copy, "
                  f"agrees={row['agrees']}", flush=True)
        if args.out:
            _write(args.out, rows_so_far, meta, complete=False)

    rows, meta = run_cases(on_row=on_row, **kwargs)
    print(markdown(rows))
    result = summary(rows, meta)
    print(json.dumps(result, indent=1))
    failed = any("error" in r for r in rows)
    if args.out:
        _write(args.out, rows, meta, complete=not meta["left_out"] and not failed)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
