"""C12 AdaBN / test-time statistics (Li et al. 2016).

Paper: a BN network trained on one domain can be adapted to another, unlabeled, by
re-estimating its BN statistics on the target data; nothing else changes (AdaBN). TENT's
table for this baseline: CIFAR-10-C error 40.8 -> 17.3, CIFAR-100-C 67.2 -> 42.6. Pilot on
MNIST-1D with inputs x*1.7+0.8: 35-37% with source statistics, 66-68% after re-estimation
(the clean level).

Here: two source networks per seed, trained on clean data: a 3x100 ReLU MLP (He
initialisation, BN before each ReLU) on the lab's data, and the conv net
(``models.convnet``) on images. Target domains: the inputs scaled and offset
(x*1.7+0.8), with Gaussian noise added (std 0.8), and blurred (a moving average over 5
neighbouring features; on images a 3x3 box blur). For each: the test accuracy with the
source statistics, after ``batchnorm.adapt(..., "adabn")`` on unlabeled shifted
*training* inputs (then evaluated on the shifted test set), with the statistics of each
test batch alone (TENT's "BN" baseline), and after ``batchnorm.adapt(..., "tent")`` for
each (Adam lr, passes) of a small grid, whose choice C13 makes on a labelled held-out
split of shifted training examples (never the test set). A scale/offset of the input is,
after the first layer, a per-channel affine map that BN removes exactly, so full recovery
is expected there; the other shifts change more than the first two moments.

Rule history: until the eighth session the rule compared means of 1-3 seeds, MLP only.
Now: per-seed differences with 95% intervals, the MLP and the conv net.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

import batchnorm

from .. import plots
from ..data import Dataset
from ..experiment import ClaimResult, Condition, Context, Profiles, with_conv_twins
from ..models import MLP
from ..probes import register_with
from ..train import RunResult, TrainSpec

ID = "C12"
TITLE = "AdaBN: re-estimated statistics undo a domain shift"
CLAIM = (
    "Re-estimating BN's statistics on unlabeled target data adapts a trained network to a "
    "shifted domain (AdaBN, Li et al. 2016; TENT's table for this baseline: CIFAR-10-C error "
    "40.8 -> 17.3). MNIST-1D pilot with inputs x*1.7+0.8: 35-37% with source statistics, 66-68% "
    "after re-estimation."
)
EXPECTATION = (
    "For the MLP and the conv net: on the scale/offset shift AdaBN's test accuracy is at most 1 point "
    "below the clean one, and on the other shifts (mean of noise and blur) it is above the source "
    "statistics', per seed."
)
RECOVERED = 0.01
CONDITIONS = with_conv_twins(
    Condition("mlp_scale_offset", "MLP: x*1.7+0.8 after AdaBN minus clean, test accuracy", ">", -RECOVERED,
              "BN removes a per-channel affine shift exactly: full recovery, up to 1 point of estimation noise"),
    Condition("mlp_partial", "MLP: noise and blur (mean), AdaBN minus source statistics, test accuracy", ">", 0.0,
              "these shifts change more than two moments: partial recovery, a positive gain"),
)
PAPER = (("CIFAR-10-C, ResNet-26: error with source statistics -> AdaBN", "40.8% -> 17.3%"),
         ("MNIST-1D pilot, x*1.7+0.8: source -> AdaBN", "35-37% -> 66-68%"))
SHIFTS = ("scale_offset", "noise", "blur")
SHIFT_NAMES = {"none": "clean", "scale_offset": "x*1.7+0.8", "noise": "noise (std 0.8)", "blur": "blur"}
METHODS = ("source", "adabn", "test_batch")
NETS = (("mlp", "MLP"), ("conv", "conv net"))


@dataclass(frozen=True)
class Config(Profiles):
    seeds: int = 5
    steps: int = 1000
    lr: float = 0.3
    batch_size: int = 60
    widths: tuple[int, ...] = (100,) * 3
    conv_channels: tuple[int, ...] = (16, 32, 32)
    conv_steps: int = 300
    conv_lr: float = 0.05
    target_samples: int = 3000  # unlabeled target inputs: the first shifted training inputs (at most all but the held-out)
    held_out: int = 1000  # labelled shifted training examples that choose TENT's lr and passes (at most a quarter)
    target_batch: int = 128  # batches of target data for AdaBN and TENT (TENT's batch size)
    tent_lrs: tuple[float, ...] = (1e-4, 1e-3, 1e-2)  # Adam, as TENT
    tent_passes: tuple[int, ...] = (1,)  # passes over the target inputs
    norm: str = "ours"

    FULL = dict(seeds=5, steps=4000, conv_steps=1500, tent_passes=(1, 3))
    SMOKE = dict(seeds=1, steps=10, widths=(16, 16), conv_channels=(4, 8), conv_steps=10, target_samples=256,
                 held_out=64, target_batch=64, tent_lrs=(1e-3,), tent_passes=(1,))


def shift(x: Tensor, kind: str, image_shape: tuple[int, ...] | None = None) -> Tensor:
    """The inputs ``x`` (N, features) moved to the target domain ``kind`` (a 3x3 box blur for images)."""
    if kind == "none":
        return x
    if kind == "scale_offset":
        return x * 1.7 + 0.8
    if kind == "noise":
        return x + 0.8 * torch.randn(x.shape, generator=torch.Generator().manual_seed(12), dtype=x.dtype)
    if kind == "blur":
        if image_shape is not None:
            images = x.reshape(len(x), *image_shape)
            return F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False).reshape(len(x), -1)
        return F.avg_pool1d(x[:, None], 5, stride=1, padding=2, count_include_pad=False)[:, 0]
    raise ValueError(f"unknown shift {kind!r}: expected none or one of {SHIFTS}")


def _accuracy(model: MLP, x: Tensor, y: Tensor, batch: int | None = None) -> float:
    """Accuracy in eval mode, on the whole of ``x`` or in batches of ``batch``."""
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(part) for part in torch.split(x, batch or len(x))])
    return (logits.argmax(dim=1) == y).double().mean().item()


def splits(data: Dataset, samples: int, held_out: int) -> tuple[slice, slice]:
    """The training rows used as unlabeled target inputs and as the labelled held-out split."""
    n = len(data.y_train)
    held = min(held_out, n // 4)
    return slice(0, min(samples, n - held)), slice(n - held, n)


def _adaptation(model: MLP, data: Dataset, samples: int, held_out: int, batch: int, tent_lrs: tuple[float, ...],
                tent_passes: tuple[int, ...]) -> dict:
    """Per domain: test accuracy with source statistics, after AdaBN, with test-batch statistics,
    and for every TENT (lr, passes) its accuracy on the held-out split and on the test set."""
    target, held = splits(data, samples, held_out)
    out = {}
    for kind in ("none", *SHIFTS):
        x_target = shift(data.x_train[target], kind, data.image_shape)
        x_held, y_held = shift(data.x_train[held], kind, data.image_shape), data.y_train[held]
        x_test = shift(data.x_test, kind, data.image_shape)
        batches = [b for b in torch.split(x_target, batch) if len(b) > 1]
        adabn = copy.deepcopy(model)
        batchnorm.adapt(adabn, batches, "adabn", progress=False)
        test_batch = copy.deepcopy(model)  # batch statistics, parameters unchanged
        batchnorm.adapt(test_batch, batches[:1], "tent", lr=0.0, progress=False)
        entry = {"source": _accuracy(copy.deepcopy(model), x_test, data.y_test),
                 "adabn": _accuracy(adabn, x_test, data.y_test),
                 "test_batch": _accuracy(test_batch, x_test, data.y_test, batch), "tent": []}
        if kind != "none":
            for lr in tent_lrs:
                for passes in tent_passes:
                    tent = copy.deepcopy(model)
                    batchnorm.adapt(tent, batches * passes, "tent", lr=lr, progress=False)
                    entry["tent"].append({"lr": lr, "passes": passes, "held_out": _accuracy(tent, x_held, y_held, batch),
                                          "test": _accuracy(tent, x_test, data.y_test, batch)})
        out[kind] = entry
    return out


def runs(ctx: Context) -> tuple[str, dict[str, list[RunResult]]]:
    """The probe's name and, per net ("mlp", "conv"), the source runs (one per seed), shared by C12 and C13."""
    cfg = ctx.config()
    probe = register_with("adaptation", _adaptation, samples=cfg.target_samples, held_out=cfg.held_out,
                          batch=cfg.target_batch, tent_lrs=tuple(cfg.tent_lrs), tent_passes=tuple(cfg.tent_passes))
    out: dict[str, list[RunResult]] = {"mlp": [], "conv": []}
    for seed in ctx.seeds():
        out["mlp"].append(ctx.train(TrainSpec(widths=cfg.widths, activation="relu", init="kaiming", norm=cfg.norm,
                                              lr=cfg.lr, batch_size=cfg.batch_size, steps=cfg.steps,
                                              eval_every=cfg.steps, seed=seed, probes=(probe,))))
        out["conv"].append(ctx.train(TrainSpec(arch="conv", widths=cfg.conv_channels, activation="relu", init="kaiming",
                                               norm=cfg.norm, lr=cfg.conv_lr, batch_size=cfg.batch_size,
                                               steps=cfg.conv_steps, eval_every=cfg.conv_steps, seed=seed,
                                               probes=(probe,)), ctx.images()))
    return probe, out


def accuracies(probe: str, rs: list[RunResult]) -> dict[tuple[str, str], np.ndarray]:
    """(domain, method) -> test accuracies of the final models, one per seed; method "tent" is
    the TENT setting with the best mean held-out accuracy over the shifted domains, chosen per seed."""
    final = [r.probes[probe][-1] for r in rs]
    out = {(kind, method): np.asarray([f[kind][method] for f in final])
           for kind in ("none", *SHIFTS) for method in METHODS}
    chosen = [max(range(len(f[SHIFTS[0]]["tent"])), key=lambda i: np.mean([f[k]["tent"][i]["held_out"] for k in SHIFTS]))
              for f in final]
    for kind in SHIFTS:
        out[kind, "tent"] = np.asarray([f[kind]["tent"][i]["test"] for f, i in zip(final, chosen)])
    out["none", "tent"] = out["none", "test_batch"]  # TENT is not run on the clean domain
    return out


def tent_choices(probe: str, rs: list[RunResult]) -> list[str]:
    """Per seed, the TENT setting chosen on the held-out split, as "lr 0.001, 3 passes"."""
    choices = []
    for r in rs:
        f = r.probes[probe][-1]
        settings = f[SHIFTS[0]]["tent"]
        i = max(range(len(settings)), key=lambda j: np.mean([f[k]["tent"][j]["held_out"] for k in SHIFTS]))
        choices.append(f"lr {settings[i]['lr']:g}, {settings[i]['passes']} pass(es)")
    return choices


def bar_figure(ctx: Context, acc: dict[str, dict], methods: tuple[tuple[str, str], ...], name: str, caption: str) -> None:
    """Grouped bars per net: test accuracy per domain and method (bars: mean; dots: seeds)."""
    fig, axes = plots.new(ncols=2, width=6.0)
    domains = ("none", *SHIFTS)
    width = 0.8 / len(methods)
    colors = {"source": plots.NO_BN_COLOR, "adabn": plots.BN_COLOR, "test_batch": "tab:gray", "tent": "tab:green"}
    for ax, (net, label) in zip(axes, NETS):
        for j, (method, mlabel) in enumerate(methods):
            plots.seed_bars(ax, np.arange(len(domains)) + (j - (len(methods) - 1) / 2) * width,
                            [acc[net][d, method] for d in domains], width, colors[method], mlabel)
        ax.set_xticks(range(len(domains)), [SHIFT_NAMES[d] for d in domains])
        ax.set(ylabel="test accuracy", title=f"{label} ({ctx.data.name if net == 'mlp' else ctx.images().name})")
        ax.legend(fontsize="small")
    ctx.save_figure(fig, name, caption)


def run(ctx: Context) -> ClaimResult:
    probe, nets = runs(ctx)
    acc = {net: accuracies(probe, rs) for net, rs in nets.items()}
    measured = {}
    for net, a in acc.items():
        measured[f"{net}_scale_offset"] = a["scale_offset", "adabn"] - a["none", "source"]
        measured[f"{net}_partial"] = np.mean([a[k, "adabn"] - a[k, "source"] for k in SHIFTS if k != "scale_offset"], axis=0)

    bar_figure(ctx, acc, (("source", "source statistics"), ("adabn", "AdaBN")), "adabn",
               "Test accuracy on the clean and shifted test sets with the source statistics (red) and after AdaBN "
               "(blue), each seed a dot; on x*1.7+0.8 the blue bar should reach the clean level.")
    ctx.save_csv("accuracy", ["net", "domain", "method", "seed", "test_accuracy"],
                 [(net, d, m, seed, v) for net, a in acc.items() for (d, m), vs in a.items() if m in ("source", "adabn")
                  for seed, v in zip(ctx.seeds(), vs)])
    mean = {net: {k: float(v.mean()) for k, v in a.items()} for net, a in acc.items()}
    summary = " ".join(
        f"{label}: clean {mean[net]['none', 'source']:.1%}; source statistics -> AdaBN: "
        + "; ".join(f"{SHIFT_NAMES[k]} {mean[net][k, 'source']:.1%} -> {mean[net][k, 'adabn']:.1%}" for k in SHIFTS) + "."
        for net, label in NETS)
    metrics = {f"{net}_{d}_{m}": v.tolist() for net, a in acc.items() for (d, m), v in a.items() if m in METHODS}
    c, m = mean["conv"], mean["mlp"]
    here = (f"conv net on {ctx.images().name}, mean over 3 shifts: error {1 - np.mean([c[k, 'source'] for k in SHIFTS]):.1%} "
            f"-> {1 - np.mean([c[k, 'adabn'] for k in SHIFTS]):.1%}",
            f"{ctx.data.name} MLP, x*1.7+0.8: {m['scale_offset', 'source']:.1%} -> {m['scale_offset', 'adabn']:.1%}")
    return ctx.result(summary, metrics, measured, here)
