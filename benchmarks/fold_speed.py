"""Inference speed-up from folding BN into the preceding convolution (batchnorm.fold).

Claim checked: folding removes every BN layer of a ResNet-style CNN without changing its
outputs (float32, 1e-5) and makes eval-mode inference faster, most at small batch where
per-layer overhead dominates.

Setup: a small ResNet-18-like CNN written here (stem conv + BN + ReLU, four stages of two
basic blocks, widths 32-64-128-256, stride-2 projections with conv + BN, 3x64x64 input),
torch.nn BN layers with random statistics, eval mode, torch.inference_mode. Each timing
is the median over ``--repeats`` calls after warm-up calls; folded and unfolded calls
are interleaved so load changes hit both alike.

    python benchmarks/fold_speed.py [--repeats 30] [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

import batchnorm


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


def resnet(widths=(32, 64, 128, 256), classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
                               nn.BatchNorm2d(widths[0]), nn.ReLU()]
    c = widths[0]
    for i, w in enumerate(widths):
        layers += [BasicBlock(c, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)]
        c = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes)]
    return nn.Sequential(*layers)


def _randomise_bn(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)


def _time(fn, x, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = resnet()
    _randomise_bn(model)
    model = model.eval().to(device)
    folded, report = batchnorm.fold(model)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device: {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"BN layers folded: {len(report.folded)} of {n_bn}, kept: {len(report.kept)}")
    print("| batch | unfolded (ms) | folded (ms) | speed-up | max abs diff |")
    print("|---|---|---|---|---|")
    with torch.inference_mode():
        for batch in args.batches:
            x = torch.randn(batch, 3, 64, 64, device=device)
            diff = (folded(x) - model(x)).abs().max().item()
            for _ in range(args.warmup):
                model(x), folded(x)
            times = {"unfolded": [], "folded": []}
            for _ in range(args.repeats):
                times["unfolded"].append(_time(model, x, device))
                times["folded"].append(_time(folded, x, device))
            a, b = (statistics.median(times[k]) * 1e3 for k in ("unfolded", "folded"))
            print(f"| {batch} | {a:.3f} | {b:.3f} | {a / b:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
