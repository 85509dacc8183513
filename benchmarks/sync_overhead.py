"""Per-step overhead of batchnorm.SyncBatchNorm over local BN, 2 gloo processes on CPU.

    .venv/bin/python benchmarks/sync_overhead.py            # defaults below
    .venv/bin/python benchmarks/sync_overhead.py --batch 16 --channels 64 --size 16 --layers 4

Each of 2 processes (one thread each, torch and numba) times a training step (forward +
backward) of a stack of ``--layers`` (BatchNorm2d -> ReLU) on its own (batch, channels,
size, size) float32 input: once with batchnorm.BatchNorm2d (statistics of the local batch,
no communication) and once with batchnorm.SyncBatchNorm (one gather in the forward, one
all-reduce in the backward, per layer); and the bare collectives of a SyncBN step alone.
Rounds alternate the three; rank 0 reports the median step time of each and the overhead
per step and per layer. Timings depend on the machine and its load: rerun the command
rather than trusting a number copied elsewhere.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import batchnorm

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _model(layer: type[nn.Module], channels: int, layers: int) -> nn.Module:
    return nn.Sequential(*[m for _ in range(layers) for m in (layer(channels), nn.ReLU())])


def _bare_collectives(channels: int, layers: int):
    """The same collectives as SyncBN's step, alone: per layer a gather of 3C + 1 and an
    all-reduce of 2C float64 values."""
    row = torch.zeros(3 * channels + 1, dtype=torch.float64)
    sums = torch.zeros(2 * channels, dtype=torch.float64)
    gathered = torch.empty(2 * row.numel(), dtype=torch.float64)

    def step(_x: torch.Tensor) -> None:
        for _ in range(layers):
            _all_gather_single(gathered, row)
        for _ in range(layers):
            dist.all_reduce(sums)

    return step


def _timed(fn, x: torch.Tensor, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        dist.barrier()  # start together: a step then measures the exchange, not the skew
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return times


def _worker(rank: int, args: argparse.Namespace, store: str) -> None:
    torch.set_num_threads(1)
    batchnorm.kernels.set_backend(args.backend)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    x = torch.randn(args.batch, args.channels, args.size, args.size, requires_grad=True)
    local = _model(batchnorm.BatchNorm2d, args.channels, args.layers)
    sync = _model(batchnorm.SyncBatchNorm, args.channels, args.layers)
    runs = {"local": lambda x: local(x).sum().backward(),
            "sync": lambda x: sync(x).sum().backward(),
            "comm": _bare_collectives(args.channels, args.layers)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():
        _timed(fn, x, args.warmup)
    for _ in range(args.rounds):
        for name, fn in runs.items():
            times[name] += _timed(fn, x, args.steps)
    if rank == 0:
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        over = med["sync"] - med["local"]
        print(f"2 gloo processes, {args.layers} x (BatchNorm2d + ReLU), per-rank input "
              f"({args.batch}, {args.channels}, {args.size}, {args.size}) float32, backend "
              f"{args.backend!r}, {args.rounds * args.steps} steps each")
        print(f"  local BN step (median): {med['local']:.3f} ms")
        print(f"  SyncBN step   (median): {med['sync']:.3f} ms")
        print(f"  overhead: {over:.3f} ms per step, {over / args.layers:.3f} ms per layer "
              f"({100 * over / med['local']:.0f}% of the local step)")
        print(f"  of which bare collectives (median): {med['comm']:.3f} ms per step")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--backend", default="auto", choices=batchnorm.kernels.BACKENDS)
    parser.add_argument("--steps", type=int, default=10, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    if any(name == "lo" for _, name in socket.if_nameindex()):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")  # read by the workers' numba
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(args, os.path.join(tmp, "store")), nprocs=2)


if __name__ == "__main__":
    main()
