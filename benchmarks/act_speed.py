"""Training-step time of BatchNormAct2d against torch.nn's BatchNorm2d followed by the
activation, for every activation, on this CPU.

For each activation: ``batchnorm.BatchNormAct2d(C, act=...)`` (memory saving where the
activation is invertible, the input-saving path otherwise) and
``torch.nn.BatchNorm2d(C)`` -> ``torch.nn.functional.<act>``, forward + backward of one
(8, 256, 28, 28) float32 tensor, the two called in turn for 30 rounds after warm-up,
medians, both on 2 threads. Run with the allocator pinned (fresh pages would land on
both sides at random, see benchmarks/README.md):

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        .venv/bin/python benchmarks/act_speed.py
"""

from __future__ import annotations

import statistics
import time

import numba
import torch
import torch.nn.functional as F

import batchnorm

SHAPE = (8, 256, 28, 28)
ACTS = {"identity": 0.0, "relu": 0.0, "leaky_relu": 0.01, "elu": 1.0, "silu": 0.0, "gelu": 0.0}


def _torch_act(act: str, alpha: float):
    return {
        "identity": lambda y: y,
        "relu": F.relu,
        "leaky_relu": lambda y: F.leaky_relu(y, alpha),
        "elu": lambda y: F.elu(y, alpha),
        "silu": F.silu,
        "gelu": F.gelu,
    }[act]


def step_ms(act: str, alpha: float, rounds: int = 30) -> tuple[float, float]:
    x = torch.randn(SHAPE, requires_grad=True)
    dz = torch.randn(SHAPE)
    ours = batchnorm.BatchNormAct2d(SHAPE[1], act=act, alpha=alpha)
    bn, f = torch.nn.BatchNorm2d(SHAPE[1]), _torch_act(act, alpha)

    def run_ours():
        x.grad = None
        ours(x).backward(dz)

    def run_torch():
        x.grad = None
        f(bn(x)).backward(dz)

    times: dict[str, list[float]] = {"ours": [], "torch": []}
    for _ in range(3):
        run_ours()
        run_torch()
    for _ in range(rounds):
        for name, fn in (("ours", run_ours), ("torch", run_torch)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["ours"]) * 1e3, statistics.median(times["torch"]) * 1e3


def main() -> None:
    torch.set_num_threads(2)
    numba.set_num_threads(2)
    print(f"{'x'.join(map(str, SHAPE))} float32, training step (forward + backward), 2 threads")
    print("| activation | BatchNormAct2d ms | torch.nn BN -> act ms | speed-up |")
    print("|---|--:|--:|--:|")
    for act, alpha in ACTS.items():
        ours, ref = step_ms(act, alpha)
        print(f"| {act} | {ours:.3f} | {ref:.3f} | {ref / ours:.2f}x |")


if __name__ == "__main__":
    main()
