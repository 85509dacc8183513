"""The BN kernels with their data in cache and streamed from memory, against ATen's.

For each ResNet-50 layer shape (batch 8, NCHW float32, 2 threads), the median wall-clock
ms of the training forward and backward kernels, batchnorm's fused numba kernels
(``cpu_backend.forward_train`` / ``backward``, no autograd) and ATen's
(``native_batch_norm`` / ``native_batch_norm_backward``: what ``torch.nn`` runs), and of a
copy of the tensor (``copy_``: the memory bound of a pass that reads x and writes y).
Each timed call comes right after a copy of ``FLUSH`` MB (0: none), so its data is where
the flush leaves it: in a core's cache or the shared L3 (small flush), or mostly in DRAM
(a flush of hundreds of MB: on the 2-core Xeon, whose host's 480 MB L3 is shared with
other tenants, 400 MB doubles a copy's time). The kernels' order is the same in every round; the allocator
is pinned (set the two variables below) so that new outputs do not page-fault.

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        PYTHONPATH=src .venv/bin/python benchmarks/cache_regime.py [--flush 0 25 400] \\
        [--shapes 8x256x56x56 8x1024x14x14]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numba
import torch

from batchnorm.kernels.cpu import backend as cpu

SHAPES = [(8, 256, 56, 56), (8, 512, 28, 28), (8, 1024, 14, 14), (8, 2048, 7, 7)]


def regime_ms(shape: tuple[int, ...], flush_mb: int, rounds: int) -> dict[str, float]:
    x, dy = torch.randn(shape), torch.randn(shape)
    out = torch.empty_like(x)
    c = shape[1]
    w, b = torch.rand(c) + 0.5, torch.randn(c)
    rm, rv = torch.zeros(c), torch.ones(c)
    _, mean, invstd = cpu.forward_train(x, w, b, 1e-5)
    _, save_mean, save_invstd = torch.native_batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5)
    src = torch.randn(max(flush_mb * (1 << 20) // 8, 1))  # float32: half the MB each side
    dst = torch.empty_like(src)
    calls = {
        "copy": lambda: out.copy_(x),
        "ours fwd": lambda: cpu.forward_train(x, w, b, 1e-5),
        "ours bwd": lambda: cpu.backward(dy, x, mean, invstd, w),
        "aten fwd": lambda: torch.native_batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5),
        "aten bwd": lambda: torch.ops.aten.native_batch_norm_backward(
            dy, x, w, rm, rv, save_mean, save_invstd, True, 1e-5, [True, True, True]),
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(rounds + 2):
        for name, fn in calls.items():
            if flush_mb:
                dst.copy_(src)
            start = time.perf_counter()
            fn()
            if r >= 2:  # two warm-up rounds
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flush", type=int, nargs="+", default=[0, 25, 400],
                        help="MB copied before each timed call (default: 0 25 400)")
    parser.add_argument("--shapes", nargs="+", default=["x".join(map(str, s)) for s in SHAPES],
                        help="NCHW shapes such as 8x1024x14x14 (default: ResNet-50's at batch 8)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    print(f"load average {os.getloadavg()[0]:.2f}; ms (medians of {args.rounds})")
    print("| shape | flush MB | copy | ours fwd | ours bwd | ATen fwd | ATen bwd "
          "| ATen / ours fwd+bwd | ours fwd+bwd / copy |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    for shape in [tuple(int(n) for n in text.split("x")) for text in args.shapes]:
        for flush in args.flush:
            t = regime_ms(shape, flush, args.rounds)
            ours = t["ours fwd"] + t["ours bwd"]
            cells = " | ".join(f"{v:.3f}" for v in t.values())
            print(f"| {'x'.join(map(str, shape))} | {flush} | {cells} "
                  f"| {(t['aten fwd'] + t['aten bwd']) / ours:.2f} | {ours / t['copy']:.2f} |",
                  flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
