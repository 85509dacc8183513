"""Kernel-level timings of the fused CPU kernels, without the module path.

Training: ``cpu_backend.forward_train`` + ``backward`` against ``torch.nn.BatchNorm2d``
forward + backward; eval: ``cpu_backend.normalize`` and the ``batchnorm::normalize``
custom op around it against ``torch.nn.BatchNorm2d`` in eval mode. One thread, process
CPU time (robust to other jobs on the machine), median of 30 calls.

    .venv/bin/python benchmarks/cpu_kernels.py
"""

from __future__ import annotations

import statistics
import time

import numba
import torch

from batchnorm import ops
from batchnorm.kernels import cpu_backend as cpu
from batchnorm.kernels import use_backend

SHAPES = [(8, 64, 112, 112), (8, 256, 56, 56), (8, 512, 28, 28), (8, 1024, 14, 14),
          (8, 2048, 7, 7)]


def cpu_ms(fn, reps: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    print("shape | train: native, kernels, bound ms | eval: native, kernel, custom op ms")
    for shape in SHAPES:
        x = torch.randn(shape)
        dy = torch.randn(shape)
        c = shape[1]
        w, b = torch.ones(c), torch.zeros(c)
        xg = x.clone().requires_grad_(True)
        native = torch.nn.BatchNorm2d(c)

        def native_train():
            xg.grad = None
            native(xg).backward(dy)

        def ours_train():
            _, mean, invstd = cpu.forward_train(x, w, b, 1e-5)
            cpu.backward(dy, x, mean, invstd, w)

        def bound():
            torch.empty_like(x).copy_(x)
            torch.empty_like(x).copy_(dy)
            x.sum(), dy.sum(), x.sum(), dy.sum()

        _, mean, invstd = cpu.forward_train(x, w, b, 1e-5)
        evaluator = torch.nn.BatchNorm2d(c).eval()
        with torch.no_grad(), use_backend("cpu"):
            eval_times = (cpu_ms(lambda: evaluator(x)),
                          cpu_ms(lambda: cpu.normalize(x, mean, invstd, w, b)),
                          cpu_ms(lambda: ops.normalize(x, mean, invstd, w, b)))
        train_times = cpu_ms(native_train), cpu_ms(ours_train), cpu_ms(bound)
        print("x".join(map(str, shape)), "|", ", ".join(f"{t:.3f}" for t in train_times), "|",
              ", ".join(f"{t:.3f}" for t in eval_times), flush=True)


if __name__ == "__main__":
    main()
