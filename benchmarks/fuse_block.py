"""The fused CPU kernels' channel-block size (``kernels.cpu.backend.FUSE_BLOCK_BYTES``):
a BN layer's training forward + backward (with the running update) at ResNet-50's
batch-8 shapes, for two block sizes and torch.nn, interleaved call by call (each round
runs all three, so a slow moment of a shared machine hits them alike); medians.

    PYTHONPATH=src .venv/bin/python benchmarks/fuse_block.py [--bytes 2097152 524288] [--rounds 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import batchnorm
from batchnorm.kernels.cpu import backend as cpu_backend

SHAPES = [(8, 64, 112, 112), (8, 256, 56, 56), (8, 512, 28, 28), (8, 1024, 14, 14),
          (8, 2048, 7, 7)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bytes", nargs=2, type=int, default=[2 << 20, 512 << 10],
                        metavar=("OLD", "NEW"), help="the two FUSE_BLOCK_BYTES to compare")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    old, new = args.bytes
    print(f"| shape | torch.nn ms | {old >> 10} KiB ms | {new >> 10} KiB ms | "
          f"torch.nn / {old >> 10} KiB | torch.nn / {new >> 10} KiB | {old >> 10} / {new >> 10} |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    saved = cpu_backend.FUSE_BLOCK_BYTES
    try:
        for shape in SHAPES:
            x = torch.randn(shape).requires_grad_()
            dy = torch.randn(shape)
            ours, nn = batchnorm.BatchNorm2d(shape[1]), torch.nn.BatchNorm2d(shape[1])

            def call(layer, block=None):
                if block is not None:
                    cpu_backend.FUSE_BLOCK_BYTES = block
                start = time.perf_counter()
                layer(x).backward(dy)
                x.grad = None
                return time.perf_counter() - start

            times: dict[str, list[float]] = {"nn": [], "old": [], "new": []}
            for r in range(args.rounds + 3):
                t = (call(nn), call(ours, old), call(ours, new))
                if r >= 3:  # warm-up rounds left out
                    for key, value in zip(times, t):
                        times[key].append(value)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            print(f"| {'x'.join(map(str, shape))} | {med['nn']:.2f} | {med['old']:.2f} | "
                  f"{med['new']:.2f} | {med['nn'] / med['old']:.2f} | "
                  f"{med['nn'] / med['new']:.2f} | {med['old'] / med['new']:.2f} |", flush=True)
    finally:
        cpu_backend.FUSE_BLOCK_BYTES = saved


if __name__ == "__main__":
    main()
