"""Where a BN layer's training step spends its time on the GPU: torch.profiler over a few
forward + backward calls of torch.nn.BatchNorm2d, batchnorm's BatchNorm2d (auto: ATen's /
cuDNN's kernels; and the Triton kernels forced) and BatchNormAct2d (Triton), at one
ResNet-50 shape. Prints, per layer, the host time per call (what the CPU spends launching:
a small layer's step is bound by it), the GPU time per call, and the operators with the
most host time; writes the same as JSON.

    python benchmarks/gpu/profile_layer.py --out profile.json [--shape 32 256 14 14]

Step 5 of benchmarks/gpu/run.sh; CUDA only (``--device cpu``: a dry run of the script).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
import batchnorm  # noqa: E402
from batchnorm import kernels  # noqa: E402


def layers(c: int, device: str):
    """(name, layer, backend to force or None) of the compared layers."""
    return [
        ("torch.nn.BatchNorm2d", torch.nn.BatchNorm2d(c), None),
        ("batchnorm.BatchNorm2d (auto)", batchnorm.BatchNorm2d(c), None),
        ("batchnorm.BatchNorm2d (triton)", batchnorm.BatchNorm2d(c), "triton"),
        ("batchnorm.BatchNormAct2d leaky_relu (auto)",
         batchnorm.BatchNormAct2d(c, act="leaky_relu", alpha=0.01), None),
        # the same layer on ATen's BN + activation kernels (its memory-saving backward
        # from z as ATen operations): fewer host microseconds than Triton's launches?
        ("batchnorm.BatchNormAct2d leaky_relu (native)",
         batchnorm.BatchNormAct2d(c, act="leaky_relu", alpha=0.01), "native"),
    ]


def measure(layer, x, dy, calls: int, device: str) -> dict:
    """Host and device time per forward + backward call, and the top operators."""
    def step():
        x.grad = None
        layer(x).backward(dy)

    for _ in range(3):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        step()
    host_ms = (time.perf_counter() - start) * 1e3 / calls
    if device == "cuda":
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3 / calls
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    device_us = sum(getattr(e, "self_device_time_total", 0.0) for e in events) / calls
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return dict(
        host_ms_per_call=host_ms, wall_ms_per_call=wall_ms,
        device_ms_per_call=device_us / 1e3,
        top_host_ops=[dict(name=e.key, calls_per_step=e.count / calls,
                           self_host_us_per_step=e.self_cpu_time_total / calls)
                      for e in top],
        table=events.table(sort_by="self_cpu_time_total", row_limit=15),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[32, 256, 14, 14])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("profile_layer.py: no CUDA device (use --device cpu for a dry run)")
        return 2
    n, c, h, w = args.shape
    dtype = getattr(torch, args.dtype)
    x = torch.randn(n, c, h, w, device=args.device).to(dtype, memory_format=torch.channels_last)
    x.requires_grad_()
    dy = torch.randn_like(x)
    rows = {}
    for name, layer, forced in layers(c, args.device):
        layer = layer.to(args.device)
        choice = kernels.use_backend(forced) if forced else contextlib.nullcontext()
        with choice:
            row = measure(layer, x, dy, args.calls, args.device)
        print(f"== {name}: host {row['host_ms_per_call']:.3f} ms/call, wall "
              f"{row['wall_ms_per_call']:.3f} ms/call, device {row['device_ms_per_call']:.3f} "
              f"ms/call")
        print(row.pop("table"))
        rows[name] = row
    Path(args.out).write_text(json.dumps(dict(shape=args.shape, dtype=args.dtype,
                                              layout="channels_last", layers=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
