"""Where ``auto`` should switch from ATen's kernels to the fused CPU kernels.

For channel-major float32 inputs of 32K-786K elements (several shapes per size), times a
``batchnorm.BatchNorm*d`` training step (forward + backward) on 2 threads with every size
sent to the fused kernels (``cpu``) and with every size sent to ATen (``native``, recorded
by ATen's autograd), against ``torch.nn`` in the same rounds: the data behind
``cpu_backend.PREFER_MIN``. ``--act``: the same for ``BatchNormAct2d`` (leaky ReLU)
against torch.nn's BN followed by an in-place LeakyReLU: the data behind
``PREFER_MIN_ACT``.

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        .venv/bin/python benchmarks/crossover.py [--act]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numba
import torch

import batchnorm
from batchnorm.kernels import cpu_backend

SHAPES = [(8, 16, 16, 16), (8, 32, 16, 16), (8, 64, 16, 16), (8, 1024, 4, 4),
          (16, 2048, 2, 2), (8, 96, 16, 16), (8, 1536, 4, 4), (8, 384, 8, 8),
          (8, 128, 16, 16), (8, 2048, 4, 4), (32, 128, 64), (8, 160, 16, 16), (8, 640, 8, 8),
          (8, 2560, 4, 4), (8, 64, 28, 28), (8, 768, 8, 8), (8, 256, 14, 14),
          (8, 128, 8, 8, 8), (8, 1024, 8, 8), (8, 96, 32, 32)]
ACT_SHAPES = [(4, 64, 8, 8), (8, 16, 16, 16), (8, 32, 16, 16), (4, 64, 16, 16), (8, 64, 16, 16),
              (8, 96, 16, 16), (8, 384, 8, 8), (8, 128, 16, 16), (8, 512, 8, 8), (8, 160, 16, 16),
              (8, 640, 8, 8), (8, 256, 14, 14), (8, 1024, 8, 8)]


def step_ms(module, x, dy, prefer_min: int, reps: int = 30, calls: int = 5) -> float:
    cpu_backend.PREFER_MIN = cpu_backend.PREFER_MIN_ACT = prefer_min
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(calls):
            x.grad = None
            module(x).backward(dy)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--act", action="store_true",
                        help="BatchNormAct2d (leaky ReLU) instead of plain BN")
    args = parser.parse_args()
    torch.set_num_threads(2)
    numba.set_num_threads(2)
    default, default_act = cpu_backend.PREFER_MIN, cpu_backend.PREFER_MIN_ACT
    print(f"PREFER_MIN now {default:,}, PREFER_MIN_ACT {default_act:,}")
    print("shape | elements | torch.nn ms | cpu ms | native ms | cpu / native")
    try:
        for shape in ACT_SHAPES if args.act else SHAPES:
            x = torch.randn(shape, requires_grad=True)
            dy = torch.randn(shape)
            if args.act:
                ours = batchnorm.BatchNormAct2d(shape[1], act="leaky_relu", alpha=0.01)
                native = torch.nn.Sequential(torch.nn.BatchNorm2d(shape[1]),
                                             torch.nn.LeakyReLU(0.01, inplace=True))
            else:
                name = {3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}[x.dim()]
                ours = getattr(batchnorm, name)(shape[1])
                native = getattr(torch.nn, name)(shape[1])
            for module in (ours, native):  # warm-up (and numba load)
                for _ in range(3):
                    x.grad = None
                    module(x).backward(dy)
            t_nn = step_ms(native, x, dy, default)
            t_cpu = step_ms(ours, x, dy, 0)
            t_native = step_ms(ours, x, dy, 1 << 62)
            print("x".join(map(str, shape)), f"| {x.numel():,} | {t_nn:.3f} | {t_cpu:.3f} | "
                  f"{t_native:.3f} | {t_cpu / t_native:.2f}", flush=True)
    finally:
        cpu_backend.PREFER_MIN, cpu_backend.PREFER_MIN_ACT = default, default_act


if __name__ == "__main__":
    main()
