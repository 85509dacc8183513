"""C6 Noisy BN (Santurkar et al. 2018, "How Does Batch Normalization Help Optimization?", Fig. 2).

Paper: after every BN layer of a VGG on CIFAR-10, add noise that changes at every step
(per unit: mu ~ U(-0.5, 0.5), nu ~ U(1, 1.25); per sample: m ~ U(mu +- 0.1),
s ~ N(nu, 0.1); output s * BN(x) + m). The input distributions become *less* stable
than without BN, yet the noisy network trains about as well as the BN one: BN 83% vs
no BN 80% test accuracy, noisy BN close to BN. A small MLP pilot did not reproduce it.

Here: C1's network (3x100 sigmoid, batch 60, SGD lr 0.5; the quick profile reuses C1's
BN and no-BN runs) with BN, without BN, and with noisy BN (``lab.noisy``). Besides the
accuracy, the instability of the distribution: C2's total movement of the median of the
last-hidden-layer sigmoid inputs after 10% of training, measured in training mode (for
the noisy network: with its noise, as the next layer sees it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .. import plots
from ..experiment import ClaimResult, Context, decide
from ..measure import checkpoint_matrix, mean_std
from ..train import RunResult
from . import c1_training, c2_distribution

ID = "C6"
TITLE = "Noisy BN (unstable input distributions) trains as well as BN"
CLAIM = (
    "BN's benefit does not come from stabilising the layers' input distributions: with random "
    "per-step shifts and scales added after each BN layer (mu ~ U(-0.5,0.5), nu ~ U(1,1.25) per "
    "unit and step; per sample m ~ U(mu+-0.1), s ~ N(nu,0.1)) the distributions are less stable "
    "than without BN, yet the network trains about as well as with plain BN (Santurkar et al. "
    "2018, Fig. 2: VGG on CIFAR-10, BN 83% vs no BN 80%, noisy BN close to BN)."
)
EXPECTATION = (
    "The noisy-BN network's final mean test accuracy is within 3 points of the BN network's, "
    "and both are above the no-BN network's."
)
CLOSE = 0.03
ARMS = (("bn", "BN", plots.BN_COLOR), ("noisy", "noisy BN", "tab:purple"), ("no_bn", "no BN", plots.NO_BN_COLOR))


@dataclass(frozen=True)
class Config:
    seeds: int = 1
    steps: int = 3000
    eval_every: int = 100
    lr: float = 0.5
    batch_size: int = 60
    widths: tuple[int, ...] = (100, 100, 100)
    norm: str = "ours"

    @classmethod
    def quick(cls) -> Config:
        # C1's quick configuration with one seed: the BN and no-BN arms come from the run store
        c1 = c1_training.Config.quick()
        return cls(seeds=1, steps=c1.steps, eval_every=c1.eval_every, lr=c1.lr, batch_size=c1.batch_size,
                   widths=c1.widths, norm=c1.norm)

    @classmethod
    def full(cls) -> Config:
        return cls(seeds=3, steps=4000, eval_every=200)

    @classmethod
    def smoke(cls) -> Config:
        return cls(seeds=1, steps=20, eval_every=10, widths=(32, 32))


def run(ctx: Context) -> ClaimResult:
    cfg = ctx.config()
    c1 = c1_training.Config(seeds=cfg.seeds, steps=cfg.steps, eval_every=cfg.eval_every, lr=cfg.lr,
                            batch_size=cfg.batch_size, widths=cfg.widths, norm=cfg.norm)
    arms: dict[str, list[RunResult]] = {arm: [] for arm, _, _ in ARMS}
    for seed in ctx.seeds():
        specs = c1_training.specs(c1, seed)
        specs["noisy"] = replace(specs["bn"], norm="noisy")
        for arm, _, _ in ARMS:
            arms[arm].append(ctx.train(specs[arm]))
    curves = {arm: checkpoint_matrix(rs) for arm, rs in arms.items()}
    final = {arm: mean_std(acc[:, -1]) for arm, (_, acc) in curves.items()}
    movement = {arm: float(np.mean([c2_distribution.drift(r)[0] for r in rs])) for arm, rs in arms.items()}
    diverged = {arm: sum(r.diverged_at is not None for r in rs) for arm, rs in arms.items()}
    acc = {arm: f[0] for arm, f in final.items()}
    close = abs(acc["noisy"] - acc["bn"]) <= CLOSE
    verdict = decide(supported=close and acc["noisy"] > acc["no_bn"] and acc["bn"] > acc["no_bn"],
                     refuted=acc["noisy"] <= acc["no_bn"] or acc["bn"] <= acc["no_bn"])

    fig, (left, right) = plots.new(ncols=2)
    for arm, label, color in ARMS:
        steps, a = curves[arm]
        plots.mean_band(left, steps, a, label, color)
        r = arms[arm][0]
        p = c2_distribution.percentiles(r)
        right.plot(r.eval_steps, p[:, 1, 0], color=color, label=f"{label}: median")
        right.fill_between(r.eval_steps, p[:, 0, 0], p[:, 2, 0], color=color, alpha=0.15, linewidth=0)
    left.set(xlabel="training step", ylabel="test accuracy", title="Test accuracy")
    left.legend()
    right.set(xlabel="training step", ylabel="sigmoid input (train mode)",
              title="Last hidden layer, unit 0 (seed 0): median, 15-85% band")
    right.legend()
    ctx.save_figure(fig, "noisy_bn")
    ctx.save_csv("curves", ["arm", "seed", "step", "test_accuracy"],
                 [(arm, r.spec["seed"], s, a) for arm, rs in arms.items() for r in rs
                  for s, a in zip(r.eval_steps, r.test_accuracy)])

    summary = (f"Test accuracy after {cfg.steps} steps (mean of {len(ctx.seeds())} seeds): BN {acc['bn']:.1%}, "
               f"noisy BN {acc['noisy']:.1%}, no BN {acc['no_bn']:.1%}. Median movement of a last-layer sigmoid "
               f"input after 10% of training: noisy BN {movement['noisy']:.2f}, BN {movement['bn']:.2f}, "
               f"no BN {movement['no_bn']:.2f}.")
    metrics = {
        **{f"final_test_accuracy_{arm}": final[arm][0] for arm in arms},
        **{f"final_test_accuracy_{arm}_std": final[arm][1] for arm in arms},
        **{f"median_total_movement_{arm}": movement[arm] for arm in arms},
        "noisy_minus_bn": acc["noisy"] - acc["bn"],
        "diverged_runs": diverged,
    }
    return ctx.result(verdict, summary, metrics)
