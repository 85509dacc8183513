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

Other shapes and activations (e.g. the small BN + leaky ReLU layers of timm's
cspdarknet53 at batch 4, 96x96, against torch.nn's BN + in-place leaky ReLU as timm's
layers run it)::

    PYTHONPATH=src .venv/bin/python benchmarks/act_speed.py --acts leaky_relu --inplace \\
        --alpha 0.01 --rounds 200 --shapes 4x512x3x3 4x256x6x6 4x1024x3x3 4x128x12x12
"""

from __future__ import annotations

import argparse
import statistics
import time

import numba
import torch
import torch.nn.functional as F

import batchnorm

SHAPE = (8, 256, 28, 28)
ACTS = {"identity": 0.0, "relu": 0.0, "leaky_relu": 0.01, "elu": 1.0, "silu": 0.0, "gelu": 0.0}


def _torch_act(act: str, alpha: float, inplace: bool = False):
    return {
        "identity": lambda y: y,
        "relu": lambda y: F.relu(y, inplace),
        "leaky_relu": lambda y: F.leaky_relu(y, alpha, inplace),
        "elu": lambda y: F.elu(y, alpha, inplace),
        "silu": lambda y: F.silu(y, inplace),
        "gelu": F.gelu,
    }[act]


def step_ms(act: str, alpha: float, rounds: int = 30, shape: tuple[int, ...] = SHAPE,
            inplace: bool = False) -> tuple[float, float]:
    """Median ms of one forward + backward: (BatchNormAct2d, torch.nn BN -> activation,
    in place on BN's output with ``inplace``)."""
    x = torch.randn(shape, requires_grad=True)
    dz = torch.randn(shape)
    ours = batchnorm.BatchNormAct2d(shape[1], act=act, alpha=alpha)
    bn, f = torch.nn.BatchNorm2d(shape[1]), _torch_act(act, alpha, inplace)

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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["x".join(map(str, SHAPE))],
                        help="input shapes NxCxHxW (default: %(default)s)")
    parser.add_argument("--acts", nargs="+", default=list(ACTS), choices=list(ACTS))
    parser.add_argument("--alpha", type=float, default=None,
                        help="leaky_relu's slope or elu's alpha (default: 0.01 and 1.0)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--inplace", action="store_true",
                        help="torch.nn's activation in place on BN's output (as timm's)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    numba.set_num_threads(2)
    print(f"float32, training step (forward + backward), 2 threads, {args.rounds} rounds, "
          f"torch.nn's activation {'in place' if args.inplace else 'out of place'}")
    print("| shape | activation | BatchNormAct2d ms | torch.nn BN -> act ms | speed-up |")
    print("|---|---|--:|--:|--:|")
    for text in args.shapes:
        shape = tuple(int(n) for n in text.split("x"))
        for act in args.acts:
            alpha = ACTS[act] if args.alpha is None else args.alpha
            ours, ref = step_ms(act, alpha, args.rounds, shape, args.inplace)
            print(f"| {text} | {act} | {ours:.3f} | {ref:.3f} | {ref / ours:.2f}x |")


if __name__ == "__main__":
    main()
