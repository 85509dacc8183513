"""Activation memory and time of BatchNormAct (memory-saving BN + leaky ReLU) against
torch.nn's BatchNorm2d -> LeakyReLU, at network level.

Claim (InPlace-ABN, Rota Bulo et al. 2018; docs claims.md C14): keeping only the output of
BN + an invertible activation stores about half the activation memory, for a little more
compute. The issue's target: unique saved activation bytes of a stack of
conv -> BatchNormAct2d(leaky_relu) blocks <= 0.55x those of conv -> BatchNorm2d ->
LeakyReLU.

Setup: ``depth`` blocks of a 3x3 convolution (no bias, C -> C) followed by the norm and
activation, on an (N, C, H, W) float32 input, in training mode. Saved bytes: every tensor
autograd saves during the forward is seen through
``torch.autograd.graph.saved_tensors_hooks``; bytes are summed over unique storages (a
tensor saved twice, or by two layers, counts once), parameters excluded. Time: forward +
backward per step, median of ``--repeats`` steps after warm-up (the three stacks
interleaved step by step), on this machine's CPU.

Run (from the repository root)::

    .venv/bin/python benchmarks/bn_act_memory.py             # defaults below
    .venv/bin/python benchmarks/bn_act_memory.py --depth 16 --channels 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

import batchnorm

SLOPE = 0.01


def build(kind: str, depth: int, channels: int) -> nn.Module:
    """The stack: ``kind`` is "ours", "torch" or "torch-inplace" (LeakyReLU(inplace=True))."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers.append(nn.Conv2d(channels, channels, 3, padding=1, bias=False))
        if kind == "ours":
            layers.append(batchnorm.BatchNormAct2d(channels, act="leaky_relu", alpha=SLOPE))
        else:
            layers += [nn.BatchNorm2d(channels), nn.LeakyReLU(SLOPE, inplace=kind == "torch-inplace")]
    return nn.Sequential(*layers)


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the unique non-parameter storages autograd keeps for the backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    out.sum().backward()  # the graph runs: what was saved was what the backward needed
    return sum(storages.values())


def step_times(models: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds of one forward + backward per model, the models interleaved step by
    step so that a busy machine slows them alike."""
    times: dict[str, list[float]] = {kind: [] for kind in models}
    for i in range(repeats + 2):
        for kind, model in models.items():
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            model(x).sum().backward()
            if i >= 2:  # warm-up: kernel compilation, allocator
                times[kind].append(time.perf_counter() - start)
    return {kind: statistics.median(t) for kind, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.channels, args.size, args.size)
    one = x.numel() * x.element_size()
    print(f"stack: {args.depth} x (conv3x3 -> norm -> leaky_relu({SLOPE})), input "
          f"{tuple(x.shape)} float32, one activation tensor = {one / 2**20:.2f} MiB, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"backend {batchnorm.kernels.get_backend()}, load average {os.getloadavg()[0]:.1f}")
    models = {kind: build(kind, args.depth, args.channels) for kind in ("torch", "torch-inplace", "ours")}
    seconds = step_times(models, x, args.repeats)
    results = {kind: (saved_bytes(model, x), seconds[kind]) for kind, model in models.items()}
    base_bytes, base_time = results["torch"]
    print("| stack | saved activation MiB | tensors | vs torch.nn | fwd+bwd ms | vs torch.nn |")
    print("|---|---|---|---|---|---|")
    for kind, (nbytes, seconds) in results.items():
        print(f"| {kind} | {nbytes / 2**20:.2f} | {nbytes / one:.1f} | {nbytes / base_bytes:.3f}x "
              f"| {seconds * 1e3:.1f} | {seconds / base_time:.2f}x |")


if __name__ == "__main__":
    main()
