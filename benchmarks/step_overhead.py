"""Where a training step's time goes beyond the fused CPU kernels, on this machine.

For each ResNet-50 layer shape (batch 8, NCHW float32), wall-clock medians on 2 threads (the four called in turn, 40 rounds) of

* ``kernels``: ``cpu_backend.forward_train`` then ``backward`` (y kept alive until the
  backward, as in training), no autograd;
* ``function``: the same kernels through ``BatchNormTrain`` (our autograd Function) and
  ``y.backward(dy)``;
* ``module``: ``batchnorm.BatchNorm2d`` forward + backward (adds the checks and the
  running-statistic update);
* ``torch.nn``: ``torch.nn.BatchNorm2d`` forward + backward.

Then the round trip of a trivial Python autograd Function on a 4x4 tensor, hot and right
after a 40 MB copy has flushed the caches: the fixed cost that a module step pays after
its kernels have streamed megabytes through the caches.

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        .venv/bin/python benchmarks/step_overhead.py
"""

from __future__ import annotations

import statistics
import time

import numba
import torch

import batchnorm
from batchnorm.autograd import BatchNormTrain
from batchnorm.kernels import cpu_backend as cpu

SHAPES = [(8, 64, 112, 112), (8, 256, 56, 56), (8, 512, 28, 28), (8, 1024, 14, 14),
          (8, 2048, 7, 7)]


def interleaved_ms(fns: dict, reps: int = 40) -> dict[str, float]:
    """Median wall-clock ms of each callable, called in turn round after round (so a
    drift of the machine's memory bandwidth lands on all of them alike)."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def step_times(shape: tuple[int, ...]) -> dict[str, float]:
    x = torch.randn(shape, requires_grad=True)
    xd, dy = x.detach(), torch.randn(shape)
    ours, native = batchnorm.BatchNorm2d(shape[1]), torch.nn.BatchNorm2d(shape[1])
    w, b = ours.weight, ours.bias

    def kernels():
        y, mean, invstd = cpu.forward_train(xd, w.detach(), b.detach(), 1e-5)
        cpu.backward(dy, xd, mean, invstd, w.detach())
        del y

    def function():
        x.grad = w.grad = b.grad = None
        BatchNormTrain.apply(x, w, b, 1e-5)[0].backward(dy)

    def module(m):
        def step():
            x.grad = None
            m.weight.grad = m.bias.grad = None
            m(x).backward(dy)
        return step

    return interleaved_ms({"kernels": kernels, "function": function,
                           "module": module(ours), "torch.nn": module(native)})


class _Trivial(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


def function_round_trip_us() -> tuple[float, float]:
    """(hot, after a cache flush) microseconds of y.backward() through a Python Function."""
    x = torch.randn(4, 4, requires_grad=True)
    big = torch.randn(10_000_000)
    out = torch.empty_like(big)
    result = []
    for flush in (False, True):
        times = []
        for _ in range(60):
            y = _Trivial.apply(x)
            if flush:
                out.copy_(big)
            start = time.perf_counter()
            y.sum().backward()
            times.append(time.perf_counter() - start)
        result.append(statistics.median(times) * 1e6)
    return result[0], result[1]


def main() -> None:
    torch.set_num_threads(2)
    numba.set_num_threads(2)
    print("shape | kernels | function | module | torch.nn (ms) | module - kernels")
    for shape in SHAPES:
        t = step_times(shape)
        print("x".join(map(str, shape)), "|", " | ".join(f"{v:.3f}" for v in t.values()),
              f"| {t['module'] - t['kernels']:.3f}", flush=True)
    hot, cold = function_round_trip_us()
    print(f"Python autograd Function backward: {hot:.0f} us hot, {cold:.0f} us after a "
          "40 MB copy")


if __name__ == "__main__":
    main()
