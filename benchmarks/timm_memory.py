"""What ``batchnorm.from_torch`` saves on real timm networks: activation memory kept for
the backward and training-step time, converted against unconverted.

Claim (issue 21): a network built from BN + an invertible activation (timm's
cspdarknet53: every BN is a ``BatchNormAct2d`` with leaky ReLU) converted by
``from_torch`` stores at most 0.6x the activations of the original for the backward, with
a training step at most 1.1x as long. A ReLU network (timm's resnet18) gains little:
ReLU is not invertible, so the merged BN + ReLU keeps its input, and torch.nn's ReLU
keeps only its output: two tensors per BN + ReLU either way.

Setup: the model from ``timm.create_model(name)`` (random weights, nothing downloads) in
training mode, float32, an (N, 3, S, S) input; the converted model is
``batchnorm.from_torch(copy, activations=True)`` (timm's BN + activation layers become
BatchNormAct2d; BN + ReLU modules of plain torch code are merged through torch.fx).
Saved bytes: ``bn_act_memory.saved_bytes`` (every tensor autograd saves during the
forward, through ``torch.autograd.graph.saved_tensors_hooks``, summed over unique
storages, parameters excluded). Time: forward + backward of ``output.sum()``, median of
``--repeats`` steps after warm-up, the two models interleaved step by step
(``bn_act_memory.step_times``), on this machine's CPU.

Run (from the repository root; timm is in the ``test`` extra)::

    PYTHONPATH=src .venv/bin/python benchmarks/timm_memory.py
    PYTHONPATH=src .venv/bin/python benchmarks/timm_memory.py --models cspdarknet53 --batch 8
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch

import batchnorm
from bn_act_memory import saved_bytes, step_times

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from real_timm import import_timm  # noqa: E402  (the documented torchvision arrangement)


def measure(name: str, batch: int, size: int, repeats: int) -> dict:
    """Saved bytes and step seconds of timm's ``name``, original and converted."""
    timm = import_timm()
    torch.manual_seed(0)
    original = timm.create_model(name, pretrained=False).train()
    converted, report = batchnorm.from_torch(copy.deepcopy(original), activations=True, report=True)
    x = torch.randn(batch, 3, size, size)
    models = {"original": original, "converted": converted}
    seconds = step_times(models, x, repeats)
    saved = {kind: saved_bytes(model, x) for kind, model in models.items()}
    return dict(
        model=name, layers=len(report.converted), merged=len(report.merged),
        kinds=sorted({to for _, _, to in report.converted}),
        saved=saved, seconds=seconds,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["cspdarknet53", "resnet18"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"input ({args.batch}, 3, {args.size}, {args.size}) float32, torch {torch.__version__}, "
          f"timm {import_timm().__version__}, {torch.get_num_threads()} threads, backend "
          f"{batchnorm.kernels.get_backend()}, load average {os.getloadavg()[0]:.1f}")
    print("| model | BN layers converted (merged with an activation) | into | saved MiB original "
          "| saved MiB converted | ratio | step ms original | step ms converted | ratio |")
    print("|---|---|---|--:|--:|--:|--:|--:|--:|")
    for name in args.models:
        r = measure(name, args.batch, args.size, args.repeats)
        s, t = r["saved"], r["seconds"]
        print(f"| {name} | {r['layers']} ({r['merged']}) | {', '.join(r['kinds'])} "
              f"| {s['original'] / 2**20:.1f} | {s['converted'] / 2**20:.1f} "
              f"| {s['converted'] / s['original']:.2f}x | {t['original'] * 1e3:.0f} "
              f"| {t['converted'] * 1e3:.0f} | {t['converted'] / t['original']:.2f}x |")


if __name__ == "__main__":
    main()
