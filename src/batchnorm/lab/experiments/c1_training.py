"""C1 Faster and better training (Ioffe & Szegedy 2015, Fig. 1a).

Paper: MNIST, 3 hidden fully connected layers of 100 sigmoid units, BN before each
sigmoid (bias dropped), FC-10 and cross-entropy, batch 60, 50,000 steps; curves only (no
learning rate or optimiser given). A third-party reproduction (plain gradient descent,
lr 0.5) ends at 98.0% with BN vs 97.7% without. On MNIST-1D (SGD lr 0.5, batch 60):
about 66% with BN vs 46% without at 5k steps, 67% vs 54% at 50k.

Here: the same network and optimiser, both arms from the same initial weights and the
same batches for each seed; and, as the paper's later experiments used conv nets, a small
conv net (``models.convnet``: 3 blocks Conv 3x3 -> BN -> ReLU, He initialisation) on
images (the lab's data when they are images, else scikit-learn's digits as 8x8 images).
"Faster" is judged as the early learning curve: the mean test accuracy over the
checkpoints of the first 20% of training (per seed, BN minus no BN); "better" as the
final test accuracy (per seed, BN minus no BN). The runs also record the sigmoid input
percentiles that C2 reads.

Rule history: until the eighth session the rule asked for BN ahead of the mean no-BN
curve at every one of 50 checkpoints and for fewer steps to the no-BN arm's best mean
accuracy; one noisy late checkpoint could make a clear result inconclusive. The rule
now is the four conditions of ``CONDITIONS``, with 95% intervals over seeds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .. import plots
from ..experiment import ClaimResult, Condition, Context, Profiles
from ..measure import checkpoint_matrix, early_mean
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
    "For the sigmoid MLP and for the conv net, BN's test accuracy is higher than no BN's early in "
    "training (mean over the first 20% of the checkpoints) and at the end, per seed."
)
EARLY = 0.2  # the early window: checkpoints after step 0 up to 20% of the run
CONDITIONS = (
    Condition("mlp_early", "MLP: early mean test accuracy, BN minus no BN", ">", 0.0,
              "'faster' predicts a positive gap early in training; the interval over seeds guards against noise"),
    Condition("mlp_final", "MLP: final test accuracy, BN minus no BN", ">", 0.0,
              "'higher accuracy' predicts a positive gap at the end (the paper's 98.0% vs 97.7% is 0.3 point)"),
    Condition("conv_early", "conv net: early mean test accuracy, BN minus no BN", ">", 0.0,
              "as for the MLP, on the architecture the paper's later experiments used"),
    Condition("conv_final", "conv net: final test accuracy, BN minus no BN", ">", 0.0,
              "as for the MLP"),
)
PAPER = (
    ("MNIST, 3x100 sigmoid MLP, 50k steps (reproduction, lr 0.5): final test accuracy BN / no BN", "98.0% / 97.7%"),
    ("MNIST-1D, same MLP, 5k steps: BN / no BN", "about 66% / 46%"),
)


@dataclass(frozen=True)
class Config(Profiles):
    seeds: int = 5
    steps: int = 2000
    eval_every: int = 100  # steps between checkpoints (test accuracy, sigmoid percentiles)
    lr: float = 0.5  # plain SGD, no momentum
    batch_size: int = 60
    widths: tuple[int, ...] = (100, 100, 100)
    norm: str = "ours"  # the BN arm's norm kind (models.NORMS)
    conv_channels: tuple[int, ...] = (16, 32, 32)
    conv_steps: int = 300
    conv_eval_every: int = 20
    conv_lr: float = 0.05

    FULL = dict(seeds=5, steps=20_000, eval_every=500, conv_steps=1500, conv_eval_every=50)
    SMOKE = dict(seeds=1, steps=20, eval_every=10, conv_channels=(4, 8), conv_steps=10, conv_eval_every=5)


def specs(cfg: Config, seed: int) -> dict[str, TrainSpec]:
    """The two MLP arms for one seed: "bn" and "no_bn" (C2 reads the same runs)."""
    base = TrainSpec(widths=cfg.widths, activation="sigmoid", lr=cfg.lr, batch_size=cfg.batch_size,
                     steps=cfg.steps, eval_every=cfg.eval_every, seed=seed, probes=("unit_percentiles",))
    return {"bn": replace(base, norm=cfg.norm), "no_bn": base}


def conv_specs(cfg: Config, seed: int) -> dict[str, TrainSpec]:
    """The two conv-net arms for one seed (C6 reads the same runs)."""
    base = TrainSpec(arch="conv", widths=cfg.conv_channels, activation="relu", init="kaiming", lr=cfg.conv_lr,
                     batch_size=cfg.batch_size, steps=cfg.conv_steps, eval_every=cfg.conv_eval_every, seed=seed)
    return {"bn": replace(base, norm=cfg.norm), "no_bn": base}


def runs(ctx: Context) -> dict[str, list[RunResult]]:
    """All MLP runs of both arms, one per seed."""
    cfg = ctx.config()
    return ctx.train_arms(lambda seed: specs(cfg, seed)["no_bn"], cfg.norm)


def conv_runs(ctx: Context) -> dict[str, list[RunResult]]:
    """All conv-net runs of both arms on ``ctx.images()``, one per seed."""
    cfg = ctx.config()
    return ctx.train_arms(lambda seed: conv_specs(cfg, seed)["no_bn"], cfg.norm, ctx.images())


def run(ctx: Context) -> ClaimResult:
    cfg = ctx.config()
    nets = {"mlp": runs(ctx), "conv": conv_runs(ctx)}
    measured, numbers = {}, {}
    curves = {}
    for net, arms in nets.items():
        steps, acc = {}, {}
        for arm, rs in arms.items():
            steps[arm], acc[arm] = checkpoint_matrix(rs)
        curves[net] = steps["bn"], acc
        early = {arm: early_mean(steps[arm], a, EARLY) for arm, a in acc.items()}
        final = {arm: a[:, -1] for arm, a in acc.items()}
        measured[f"{net}_early"] = early["bn"] - early["no_bn"]
        measured[f"{net}_final"] = final["bn"] - final["no_bn"]
        numbers[net] = {"early_bn": early["bn"].tolist(), "early_no_bn": early["no_bn"].tolist(),
                        "final_bn": final["bn"].tolist(), "final_no_bn": final["no_bn"].tolist(),
                        "diverged_runs": sum(r.diverged_at is not None for rs in arms.values() for r in rs)}

    _figure(ctx, cfg, curves, nets["mlp"])
    ctx.save_csv("curves", ["net", "arm", "seed", "step", "test_accuracy", "test_loss"],
                 [(net, arm, r.spec["seed"], s, a, l) for net, arms in nets.items() for arm, rs in arms.items()
                  for r in rs for s, a, l in zip(r.eval_steps, r.test_accuracy, r.test_loss)])
    m, c = numbers["mlp"], numbers["conv"]
    images = ctx.images().name
    summary = (f"3x100 sigmoid MLP, {cfg.steps} steps: final test accuracy BN {np.mean(m['final_bn']):.1%} vs no BN "
               f"{np.mean(m['final_no_bn']):.1%}, early (first {EARLY:.0%}) {np.mean(m['early_bn']):.1%} vs "
               f"{np.mean(m['early_no_bn']):.1%}. Conv net on {images}, {cfg.conv_steps} steps: final "
               f"{np.mean(c['final_bn']):.1%} vs {np.mean(c['final_no_bn']):.1%}, early {np.mean(c['early_bn']):.1%} vs "
               f"{np.mean(c['early_no_bn']):.1%} (means of {len(ctx.seeds())} seeds).")
    metrics = {
        "final_test_accuracy_bn": float(np.mean(m["final_bn"])),
        "final_test_accuracy_no_bn": float(np.mean(m["final_no_bn"])),
        "conv_final_test_accuracy_bn": float(np.mean(c["final_bn"])),
        "conv_final_test_accuracy_no_bn": float(np.mean(c["final_no_bn"])),
        "per_seed": numbers,
        "conv_data": images,
    }
    ours = f"{ctx.data.name}, same MLP, {cfg.steps} steps: {np.mean(m['final_bn']):.1%} / {np.mean(m['final_no_bn']):.1%}"
    here = (f"{ours}; conv net on {images}: {np.mean(c['final_bn']):.1%} / {np.mean(c['final_no_bn']):.1%}", ours)
    return ctx.result(summary, metrics, measured, here)


def _figure(ctx: Context, cfg: Config, curves: dict, mlp_runs: dict[str, list[RunResult]]) -> None:
    fig, axes = plots.new(ncols=3, width=4.6)
    for ax, (net, title) in zip(axes[:2], (("mlp", "3x100 sigmoid MLP"), ("conv", f"conv net, {ctx.images().name}"))):
        steps, acc = curves[net]
        plots.mean_band(ax, steps, acc["bn"], "BN", plots.BN_COLOR)
        plots.mean_band(ax, steps, acc["no_bn"], "no BN", plots.NO_BN_COLOR)
        ax.axvspan(0, EARLY * steps[-1], color="gray", alpha=0.1, label="early window")
        ax.set(xlabel="training step", ylabel="test accuracy", title=f"{title}: test accuracy")
        ax.legend()
    right = axes[2]
    for arm, label, color in (("bn", "BN", plots.BN_COLOR), ("no_bn", "no BN", plots.NO_BN_COLOR)):
        full = [r.train_loss for r in mlp_runs[arm] if r.diverged_at is None]
        if full:
            x, smooth = plots.windowed(full)
            plots.mean_band(right, x, smooth, label, color)
    right.set(xlabel="training step", ylabel="training loss", title="MLP training loss (mean over 1% windows)", yscale="log")
    right.legend()
    ctx.save_figure(fig, "accuracy", "Test accuracy over training, mean over seeds with the min-max band (shaded when "
                    "there is more than one seed). Look at the gap inside the grey early window (the 'faster' "
                    "conditions) and at the last checkpoint (the 'higher' conditions).")
