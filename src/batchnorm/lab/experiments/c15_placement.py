"""C15 BN before or after the activation, with and without dropout.

Paper: Ioffe & Szegedy put BN before the nonlinearity (normalising Wu + b, whose
distribution is "more Gaussian") and found dropout could be removed. There is no clean
prediction since: a community ImageNet-128 benchmark reports BN before
ReLU 47.4%, after ReLU 49.9%, no BN 47.1%.

Here: a 3x100 ReLU MLP (He initialisation) with BN before each ReLU (Linear without bias), after it, or no
BN, each with dropout at the end of every hidden block at several rates, plain SGD, same
initial weights and batches per seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import plots
from ..experiment import ClaimResult, Context, decide
from ..measure import mean_std
from ..train import RunResult, TrainSpec

ID = "C15"
TITLE = "BN before or after the activation, with and without dropout"
CLAIM = (
    "BN belongs before the nonlinearity, and with it dropout can be dropped (Ioffe & Szegedy "
    "2015, Sec. 3.2 and 4.2.1). There is no clean prediction: a community ImageNet-128 benchmark "
    "reports BN before ReLU 47.4%, after ReLU 49.9%, no BN 47.1%."
)
EXPECTATION = (
    "Supported if BN before the ReLU beats BN after it at every dropout rate by more than "
    "max(1 point, the larger seed standard deviation); not supported if after beats before by "
    "that margin at every rate; inconclusive otherwise."
)
ARMS = (("before", "BN before ReLU", "tab:blue"), ("after", "BN after ReLU", "tab:green"), ("none", "no BN", "tab:red"))
MIN_MARGIN = 0.01


@dataclass(frozen=True)
class Config:
    seeds: int = 2
    dropouts: tuple[float, ...] = (0.0, 0.3)
    steps: int = 800
    eval_every: int = 200
    lr: float = 0.1
    batch_size: int = 60
    widths: tuple[int, ...] = (100,) * 3
    norm: str = "ours"

    @classmethod
    def quick(cls) -> Config:
        return cls()

    @classmethod
    def full(cls) -> Config:
        return cls(seeds=3, dropouts=(0.0, 0.2, 0.5), steps=2000, eval_every=500)

    @classmethod
    def smoke(cls) -> Config:
        return cls(seeds=1, steps=10, eval_every=5, widths=(16, 16))


def run(ctx: Context) -> ClaimResult:
    cfg = ctx.config()
    runs: dict[tuple[str, float], list[RunResult]] = {}
    for p in cfg.dropouts:
        for arm, _, _ in ARMS:
            runs[arm, p] = [ctx.train(TrainSpec(widths=cfg.widths, activation="relu", init="kaiming", lr=cfg.lr, batch_size=cfg.batch_size,
                                                steps=cfg.steps, eval_every=cfg.eval_every, seed=seed, dropout=p,
                                                norm="none" if arm == "none" else cfg.norm,
                                                placement="before" if arm == "none" else arm))
                            for seed in ctx.seeds()]
    acc = {key: mean_std([r.final_test_accuracy for r in rs]) for key, rs in runs.items()}
    margin = {p: max(MIN_MARGIN, acc["before", p][1], acc["after", p][1]) for p in cfg.dropouts}
    diff = {p: acc["before", p][0] - acc["after", p][0] for p in cfg.dropouts}
    verdict = decide(supported=all(diff[p] > margin[p] for p in cfg.dropouts),
                     refuted=all(-diff[p] > margin[p] for p in cfg.dropouts))

    fig, (ax,) = plots.new()
    width = 0.8 / len(ARMS)
    for j, (arm, label, color) in enumerate(ARMS):
        ax.bar(np.arange(len(cfg.dropouts)) + (j - 1) * width, [acc[arm, p][0] for p in cfg.dropouts], width,
               yerr=[acc[arm, p][1] for p in cfg.dropouts], capsize=3, color=color, label=label)
    ax.set_xticks(range(len(cfg.dropouts)), [f"dropout {p:g}" for p in cfg.dropouts])
    low = min(acc[k][0] for k in acc)
    ax.set_ylim(max(0.0, low - 0.1), None)
    ax.set(ylabel=f"test accuracy after {cfg.steps} steps", title="BN placement and dropout (mean, std over seeds)")
    ax.legend()
    ctx.save_figure(fig, "placement")
    ctx.save_csv("accuracy", ["arm", "dropout", "seed", "final_test_accuracy"],
                 [(arm, p, r.spec["seed"], r.final_test_accuracy) for (arm, p), rs in runs.items() for r in rs])

    summary = "Test accuracy, BN before / after ReLU / no BN: " + "; ".join(
        f"dropout {p:g}: {acc['before', p][0]:.1%} / {acc['after', p][0]:.1%} / {acc['none', p][0]:.1%}"
        for p in cfg.dropouts) + "."
    metrics = {
        "before_minus_after": [diff[p] for p in cfg.dropouts],
        "margin": [margin[p] for p in cfg.dropouts],
        "dropouts": list(cfg.dropouts),
        "accuracy": [{"arm": arm, "dropout": p, "mean": acc[arm, p][0], "std": acc[arm, p][1]} for arm, p in runs],
    }
    return ctx.result(verdict, summary, metrics)
