"""C16 Folding BN into the previous layer for inference.

Claim: in eval mode BN is a fixed per-channel affine map, so after a convolution or
linear layer it folds into that layer's weights exactly: W' = W * gamma / sqrt(var + eps),
b' = (b - mean) * gamma / sqrt(var + eps) + beta. The folded network computes the same
function with one layer fewer per block, so inference is faster.

Here: ``batchnorm.fold`` on two networks with batchnorm's BN layers, whose statistics are
those of real data (``batchnorm.recalibrate`` on training inputs) and whose gamma and
beta are random (so the fold has something to do): the lab's 3x100 ReLU MLP (BN before
each ReLU; folded through ``torch.fx``) and a small 1-D convolutional network on the
signals (Conv1d -> BN -> ReLU twice, then Linear; an ``nn.Sequential``). Measured on the
test set in eval mode, float32: the largest output difference relative to the largest
output, and the time of a forward pass over the test set, original vs folded (turns
taken, one thread): the fastest of the repeats, not their median. A pass takes about a
millisecond, and whatever else runs in the process (the lab's progress display redraws ten
times a second from its own thread) only ever adds to a pass; in a full lab run the
medians put the folded MLP at 0.86-0.99x the original, while alone it ran 1.2x faster
(the fastest passes agreed with the latter).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

import batchnorm

from .. import plots
from ..experiment import ClaimResult, Context, decide
from ..models import mlp

ID = "C16"
TITLE = "Folding BN into the previous layer is exact and speeds up inference"
CLAIM = (
    "An eval-mode BN after a convolution or linear layer folds into its weights exactly "
    "(W' = W*gamma/sqrt(var+eps), b' = (b-mean)*gamma/sqrt(var+eps)+beta), which removes the BN "
    "layers from inference."
)
EXPECTATION = (
    "For every network, the folded outputs differ from the original ones by at most 1e-5 relative "
    "to the largest output (float32), and the folded network's forward pass is faster (ratio of "
    "the fastest passes above 1)."
)
TOLERANCE = 1e-5
MODELS = ("MLP 3x100", "Conv1d net")


@dataclass(frozen=True)
class Config:
    seeds: int = 1
    repeats: int = 30  # timed forward passes per network (the fastest counts)
    calibration_samples: int = 2000
    channels: int = 32  # of the convolutional network

    @classmethod
    def quick(cls) -> Config:
        return cls()

    @classmethod
    def full(cls) -> Config:
        return cls(seeds=3, repeats=100)

    @classmethod
    def smoke(cls) -> Config:
        return cls(seeds=1, repeats=2, calibration_samples=200, channels=4)


class Signals(nn.Module):
    """(N, features) -> (N, 1, features): the MNIST-1D rows as one-channel signals."""

    def forward(self, x: Tensor) -> Tensor:
        return x.unsqueeze(1)


def build(name: str, cfg: Config, n_features: int, n_classes: int, seed: int) -> nn.Module:
    """Network ``name`` with weights and random BN affine parameters from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "MLP 3x100":
            model = mlp(n_features, (100,) * 3, n_classes, activation="relu", norm="ours", seed=seed)
        else:
            c = cfg.channels
            model = nn.Sequential(Signals(), nn.Conv1d(1, c, 5, padding=2), batchnorm.BatchNorm1d(c), nn.ReLU(),
                                  nn.Conv1d(c, c, 5, padding=2), batchnorm.BatchNorm1d(c), nn.ReLU(),
                                  nn.Flatten(), nn.Linear(c * n_features, n_classes))
        for m in model.modules():
            if isinstance(m, batchnorm.BatchNorm1d):
                nn.init.uniform_(m.weight, 0.5, 2.0)
                nn.init.normal_(m.bias, 0.0, 0.5)
    return model


def forward_seconds(models: dict[str, nn.Module], x: Tensor, repeats: int) -> dict[str, float]:
    """Seconds of the fastest eval-mode forward pass over ``x`` for each model (turns
    taken; interference only ever adds time, see the module docstring)."""
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            m(x)
        for _ in range(repeats):
            for k, m in models.items():
                tic = time.perf_counter()
                m(x)
                times[k].append(time.perf_counter() - tic)
    return {k: min(t) for k, t in times.items()}


def run(ctx: Context) -> ClaimResult:
    cfg = ctx.config()
    data = ctx.data
    rows = []
    for seed in ctx.seeds():
        for name in MODELS:
            model = build(name, cfg, data.n_features, data.n_classes, seed)
            calibration = torch.split(data.x_train[: cfg.calibration_samples], 60)
            batchnorm.recalibrate(model, [b for b in calibration if len(b) > 1], progress=False)  # leaves eval mode
            folded, report = batchnorm.fold(model)
            with torch.no_grad():
                y, y_folded = model(data.x_test), folded(data.x_test)
            diff = (y - y_folded).abs().max().item()
            timed = forward_seconds({"original": model, "folded": folded}, data.x_test, cfg.repeats)
            rows.append({"model": name, "seed": seed, "bn_layers": len(report.folded) + len(report.kept),
                         "folded": len(report.folded), "max_abs_diff": diff, "max_rel_diff": diff / y.abs().max().item(),
                         "seconds_original": timed["original"], "seconds_folded": timed["folded"],
                         "speedup": timed["original"] / timed["folded"]})
    worst = {name: max(r["max_rel_diff"] for r in rows if r["model"] == name) for name in MODELS}
    speedup = {name: float(np.median([r["speedup"] for r in rows if r["model"] == name])) for name in MODELS}
    complete = all(r["folded"] == r["bn_layers"] for r in rows)
    verdict = decide(supported=complete and all(w <= TOLERANCE for w in worst.values()) and all(s > 1 for s in speedup.values()),
                     refuted=any(w > TOLERANCE for w in worst.values()) or any(s < 1 for s in speedup.values()))

    fig, (left, right) = plots.new(ncols=2)
    x = np.arange(len(MODELS))
    left.bar(x, [max(worst[n], 1e-12) for n in MODELS], color=plots.BN_COLOR)
    left.axhline(TOLERANCE, color="gray", linestyle=":", label="tolerance")
    left.set(yscale="log", ylabel="max |y - y_folded| / max |y|", title="Output difference (worst seed)")
    left.legend()
    for j, (key, label, color) in enumerate((("seconds_original", "with BN", plots.NO_BN_COLOR),
                                             ("seconds_folded", "folded", plots.BN_COLOR))):
        right.bar(x + (j - 0.5) * 0.4, [np.median([r[key] * 1e3 for r in rows if r["model"] == n]) for n in MODELS], 0.4,
                  color=color, label=label)
    right.set(yscale="log", ylabel=f"ms per forward pass ({len(data.y_test)} examples)", title="Inference time (fastest pass)")
    right.legend()
    for ax in (left, right):
        ax.set_xticks(x, MODELS)
    ctx.save_figure(fig, "folding")
    ctx.save_csv("folding", list(rows[0]), [list(r.values()) for r in rows])

    summary = "; ".join(f"{n}: max relative output difference {worst[n]:.1e}, speed-up {speedup[n]:.2f}x" for n in MODELS) + (
        "" if complete else "; some BN layers were not folded") + "."
    metrics = {"max_rel_diff": worst, "speedup": speedup, "all_bn_folded": complete, "runs": rows}
    return ctx.result(verdict, summary, metrics)
