"""C1 Faster and better training (Ioffe & Szegedy 2015, Fig. 1a).

Paper: MNIST, 3 hidden fully connected layers of 100 sigmoid units, BN before each
sigmoid (bias dropped), FC-10 and cross-entropy, batch 60, 50,000 steps; curves only (no
learning rate or optimiser given). A third-party reproduction (plain gradient descent,
lr 0.5) ends at 98.0% with BN vs 97.7% without. On MNIST-1D (SGD lr 0.5, batch 60):
about 66% with BN vs 46% without at 5k steps, 67% vs 54% at 50k.

Here: the same network and optimiser, both arms from the same initial weights and the
same batches for each seed. The target accuracy follows the paper's Inception
comparison: the best mean test accuracy of the no-BN arm; the speed-up is the ratio of
the steps each arm needs to reach it. The runs also record the sigmoid input percentiles
that C2 reads.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .. import plots
from ..experiment import ClaimResult, Context, decide
from ..measure import checkpoint_matrix, mean_std, steps_to
from ..train import RunResult, TrainSpec

ID = "C1"
TITLE = "BN trains faster and reaches a higher accuracy"
CLAIM = (
    "Batch Normalization makes a network train faster and reach a higher test accuracy "
    "(Ioffe & Szegedy 2015, Fig. 1a: MNIST, 3x100 sigmoid MLP, BN before each sigmoid, "
    "batch 60, 50k steps; a reproduction with lr 0.5 ends at 98.0% with BN vs 97.7% without; "
    "on MNIST-1D about 66% vs 46% at 5k steps)."
)
EXPECTATION = (
    "The BN arm's mean test accuracy is ahead of the no-BN arm's at every checkpoint after "
    "step 0, and it reaches the no-BN arm's best mean accuracy in fewer steps."
)


@dataclass(frozen=True)
class Config:
    seeds: int = 2
    steps: int = 5000  # the MNIST-1D reference: about 66% with BN vs 46% without at 5k steps
    eval_every: int = 100  # steps between checkpoints (test accuracy, sigmoid percentiles)
    lr: float = 0.5  # plain SGD, no momentum
    batch_size: int = 60
    widths: tuple[int, ...] = (100, 100, 100)
    norm: str = "ours"  # the BN arm's norm kind (models.NORMS)

    @classmethod
    def quick(cls) -> Config:
        return cls()

    @classmethod
    def full(cls) -> Config:
        return cls(seeds=3, steps=50_000, eval_every=1000)

    @classmethod
    def smoke(cls) -> Config:
        return cls(seeds=1, steps=20, eval_every=10)


def specs(cfg: Config, seed: int) -> dict[str, TrainSpec]:
    """The two arms for one seed: "bn" and "no_bn" (C2 reads the same runs)."""
    base = TrainSpec(widths=cfg.widths, activation="sigmoid", lr=cfg.lr, batch_size=cfg.batch_size,
                     steps=cfg.steps, eval_every=cfg.eval_every, seed=seed, probes=("unit_percentiles",))
    return {"bn": replace(base, norm=cfg.norm), "no_bn": base}


def runs(ctx: Context) -> dict[str, list[RunResult]]:
    """All runs of both arms, one per seed."""
    cfg = ctx.config()
    out: dict[str, list[RunResult]] = {"bn": [], "no_bn": []}
    for seed in ctx.seeds():
        for arm, spec in specs(cfg, seed).items():
            out[arm].append(ctx.train(spec))
    return out


def run(ctx: Context) -> ClaimResult:
    cfg = ctx.config()
    arms = runs(ctx)
    steps, acc = {}, {}
    for arm, rs in arms.items():
        steps[arm], acc[arm] = checkpoint_matrix(rs)
    mean = {arm: a.mean(axis=0) for arm, a in acc.items()}
    after0 = steps["bn"] > 0
    ahead = mean["bn"][after0] > mean["no_bn"][after0]
    target = float(mean["no_bn"].max())
    to_target = {arm: steps_to(steps[arm], mean[arm], target) for arm in arms}
    faster = to_target["bn"] is not None and to_target["bn"] < to_target["no_bn"]
    final = {arm: mean_std(a[:, -1]) for arm, a in acc.items()}
    verdict = decide(supported=bool(ahead.all()) and faster, refuted=final["bn"][0] <= final["no_bn"][0] or not faster)
    speedup = to_target["no_bn"] / to_target["bn"] if faster and to_target["bn"] else None

    _figure(ctx, steps["bn"], acc, arms)
    ctx.save_csv("curves", ["arm", "seed", "step", "test_accuracy", "test_loss"],
                 [(arm, r.spec["seed"], s, a, l) for arm, rs in arms.items() for r in rs
                  for s, a, l in zip(r.eval_steps, r.test_accuracy, r.test_loss)])
    reach = (f"BN reached the no-BN arm's best mean accuracy ({target:.1%}) at step {to_target['bn']} "
             f"vs {to_target['no_bn']}" + (f" ({speedup:.1f}x fewer steps)" if speedup else "")
             if to_target["bn"] is not None else f"BN never reached the no-BN arm's best ({target:.1%})")
    summary = (f"After {cfg.steps} steps: BN {final['bn'][0]:.1%} vs no BN {final['no_bn'][0]:.1%} test accuracy "
               f"(mean of {len(ctx.seeds())} seeds); BN ahead at {int(ahead.sum())}/{ahead.size} checkpoints; {reach}.")
    metrics = {
        "final_test_accuracy_bn": final["bn"][0],
        "final_test_accuracy_bn_std": final["bn"][1],
        "final_test_accuracy_no_bn": final["no_bn"][0],
        "final_test_accuracy_no_bn_std": final["no_bn"][1],
        "target_accuracy": target,
        "steps_to_target_bn": to_target["bn"],
        "steps_to_target_no_bn": to_target["no_bn"],
        "speedup": speedup,
        "checkpoints_ahead": int(ahead.sum()),
        "checkpoints": int(ahead.size),
        "diverged_runs": sum(r.diverged_at is not None for rs in arms.values() for r in rs),
    }
    return ctx.result(verdict, summary, metrics)


def _figure(ctx: Context, steps: np.ndarray, acc: dict[str, np.ndarray], arms: dict[str, list[RunResult]]) -> None:
    fig, (left, right) = plots.new(ncols=2)
    plots.mean_band(left, steps, acc["bn"], "BN", plots.BN_COLOR)
    plots.mean_band(left, steps, acc["no_bn"], "no BN", plots.NO_BN_COLOR)
    left.set(xlabel="training step", ylabel="test accuracy", title="Test accuracy (min-max band over seeds)")
    left.legend()
    for arm, label, color in (("bn", "BN", plots.BN_COLOR), ("no_bn", "no BN", plots.NO_BN_COLOR)):
        full = [r.train_loss for r in arms[arm] if r.diverged_at is None]
        if full:
            x, smooth = plots.windowed(full)
            plots.mean_band(right, x, smooth, label, color)
    right.set(xlabel="training step", ylabel="training loss", title="Training loss (mean over 1% windows)", yscale="log")
    right.legend()
    ctx.save_figure(fig, "accuracy")
