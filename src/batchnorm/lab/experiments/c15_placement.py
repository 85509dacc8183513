"""C15 BN before or after the activation, with and without dropout.

Paper: Ioffe & Szegedy put BN before the nonlinearity (normalising Wu + b, whose
distribution is "more Gaussian") and found dropout could be removed. There is no clean
prediction since: a community ImageNet-128 benchmark reports BN before
ReLU 47.4%, after ReLU 49.9%, no BN 47.1%.

Here: a 3x100 ReLU MLP (He initialisation) with BN before each ReLU (Linear without bias), after it, or no
BN, each with dropout at the end of every hidden block at several rates, plain SGD, same
initial weights and batches per seed. Two halves, judged apart: placement (BN before vs
after the ReLU, no dropout) and dropout (with BN before the ReLU, no dropout vs the
judged dropout rate: "dropout can be removed" means removing it costs at most 1 point).

Rule history: until the eighth session the rule asked before to beat after at every
dropout rate by max(1 point, the larger seed std), did not judge the dropout half, and
trained 800 steps (the dropout arms undertrained). Now: the two halves, per-seed
differences with 95% intervals, longer runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import plots
from ..experiment import ClaimResult, Condition, Context, Profiles
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
    "Without dropout, BN before the ReLU reaches a higher test accuracy than BN after it; with BN "
    "before the ReLU, training without dropout loses at most 1 point against training with it; per seed."
)
ARMS = (("before", "BN before ReLU", "tab:blue"), ("after", "BN after ReLU", "tab:green"), ("none", "no BN", "tab:red"))
CONDITIONS = (
    Condition("placement", "no dropout: final test accuracy, BN before minus BN after the ReLU", ">", 0.0,
              "'BN belongs before the nonlinearity' predicts a positive gap (the community benchmark found the opposite)"),
    Condition("dropout", "BN before the ReLU: final test accuracy, no dropout minus the judged dropout rate", ">", -0.01,
              "'dropout can be removed': removing it costs at most 1 point"),
)
PAPER = (("ImageNet-128 community benchmark: BN before ReLU / after ReLU / no BN", "47.4% / 49.9% / 47.1%"),
         ("Inception with BN (Sec. 4.2.1): dropout", "removed, no loss"))


@dataclass(frozen=True)
class Config(Profiles):
    seeds: int = 5
    dropouts: tuple[float, ...] = (0.0, 0.3)  # the second is the judged rate
    arms: tuple[str, ...] = ("before", "after")
    steps: int = 1000
    eval_every: int = 250
    lr: float = 0.1
    batch_size: int = 60
    widths: tuple[int, ...] = (100,) * 3
    norm: str = "ours"

    FULL = dict(seeds=5, dropouts=(0.0, 0.3, 0.5), arms=("before", "after", "none"), steps=4000, eval_every=500)
    SMOKE = dict(seeds=1, steps=10, eval_every=5, widths=(16, 16))


def run(ctx: Context) -> ClaimResult:
    cfg = ctx.config()
    runs: dict[tuple[str, float], list[RunResult]] = {}
    shown = [a for a in ARMS if a[0] in cfg.arms]
    for p in cfg.dropouts:
        for arm, _, _ in shown:
            runs[arm, p] = [ctx.train(TrainSpec(widths=cfg.widths, activation="relu", init="kaiming", lr=cfg.lr, batch_size=cfg.batch_size,
                                                steps=cfg.steps, eval_every=cfg.eval_every, seed=seed, dropout=p,
                                                norm="none" if arm == "none" else cfg.norm,
                                                placement="before" if arm == "none" else arm))
                            for seed in ctx.seeds()]
    acc = {key: mean_std([r.final_test_accuracy for r in rs]) for key, rs in runs.items()}
    final = {key: np.asarray([r.final_test_accuracy for r in rs]) for key, rs in runs.items()}
    judged = cfg.dropouts[1]
    measured = {"placement": final["before", 0.0] - final["after", 0.0],
                "dropout": final["before", 0.0] - final["before", judged]}

    fig, (ax,) = plots.new()
    width = 0.8 / len(shown)
    for j, (arm, label, color) in enumerate(shown):
        plots.seed_bars(ax, np.arange(len(cfg.dropouts)) + (j - (len(shown) - 1) / 2) * width,
                        [final[arm, p] for p in cfg.dropouts], width, color, label)
    ax.set_xticks(range(len(cfg.dropouts)), [f"dropout {p:g}" for p in cfg.dropouts])
    low = min(acc[k][0] for k in acc)
    ax.set_ylim(max(0.0, low - 0.1), None)
    ax.set(ylabel=f"test accuracy after {cfg.steps} steps", title="BN placement and dropout (bars: mean; dots: seeds)")
    ax.legend()
    ctx.save_figure(fig, "placement", f"Final test accuracy per dropout rate and placement, each seed a dot. Placement: "
                    f"blue vs green at dropout 0; dropout: the blue bar at 0 vs at {judged:g}.")
    ctx.save_csv("accuracy", ["arm", "dropout", "seed", "final_test_accuracy"],
                 [(arm, p, r.spec["seed"], r.final_test_accuracy) for (arm, p), rs in runs.items() for r in rs])

    summary = f"Test accuracy after {cfg.steps} steps, " + " / ".join(label for _, label, _ in shown) + ": " + "; ".join(
        f"dropout {p:g}: " + " / ".join(f"{acc[arm, p][0]:.1%}" for arm, _, _ in shown) for p in cfg.dropouts) + (
        f" (means of {len(ctx.seeds())} seeds).")
    metrics = {
        "dropouts": list(cfg.dropouts),
        "judged_dropout": judged,
        "accuracy": [{"arm": arm, "dropout": p, "mean": acc[arm, p][0], "std": acc[arm, p][1]} for arm, p in runs],
    }
    here = (f"MLP on {ctx.data.name}, no dropout: before {acc['before', 0.0][0]:.1%} / after {acc['after', 0.0][0]:.1%}"
            + (f" / no BN {acc['none', 0.0][0]:.1%}" if "none" in cfg.arms else ""),
            f"BN before: no dropout {acc['before', 0.0][0]:.1%} vs dropout {judged:g} {acc['before', judged][0]:.1%}")
    return ctx.result(summary, metrics, measured, here)
