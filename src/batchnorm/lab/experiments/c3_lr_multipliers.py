"""C3 Bigger learning rates, fewer steps (Ioffe & Szegedy 2015, Sec. 4.2, Fig. 3).

Paper (ImageNet, BN-Inception; reference only): steps to 72.2% top-1 (Inception's best):
Inception 31.0M, BN-Baseline 13.3M, BN-x5 2.1M ("14x fewer"), BN-x30 2.7M (max 74.8%).
Without BN, the learning rate x5 diverged.

Here (CPU analogue): a ReLU MLP (He initialisation, as C5) trained with plain SGD, same
initial weights and batches per seed. The no-BN network is tuned first: a sweep of
learning rates, of which the one with the best mean (over seeds) peak test accuracy is
its own best rate (chosen on the test set, which can only favour the no-BN arm). The BN
network (BN before each ReLU) trains at 5x and 30x that rate, as BN-x5 and BN-x30 were
5x and 30x Inception's rate. The target is the paper's: per seed, the best test accuracy
of the tuned no-BN network (Inception's 72.2%); the speed-up of a BN arm is the ratio of
the steps each needs to reach it, read on curves smoothed over 3 checkpoints (a trailing
mean, both arms alike) so that one noisy checkpoint does not decide "first reached". A BN
run that never reaches the target (or diverges) counts as reaching it one checkpoint
after the end (a censored value: its speed-up is then an upper bound).

Rule history: until the eighth session the BN arms ran at 5x and 30x a fixed base rate
(0.05, below the no-BN network's best), against BN at the base rate, with a target
raised after seeing the results to 1 point below BN x1's best. Now the BN arms are
compared with the no-BN network at its own best rate, and the target is fixed by the
paper's definition.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import plots
from ..experiment import ClaimResult, Condition, Context, Profiles
from ..measure import checkpoint_matrix, steps_to
from ..train import RunResult, TrainSpec

ID = "C3"
TITLE = "BN trains at 5x and 30x the learning rate, in fewer steps"
CLAIM = (
    "With BN the learning rate can be raised 5x and 30x, reaching the baseline's accuracy in "
    "far fewer steps, while without BN a higher rate diverges (Ioffe & Szegedy 2015, Sec. 4.2: "
    "steps to 72.2% top-1 on ImageNet: Inception 31.0M, BN-Baseline 13.3M, BN-x5 2.1M, "
    "BN-x30 2.7M; Inception at x5 diverged)."
)
EXPECTATION = (
    "BN at 5x and at 30x the no-BN network's best learning rate reaches the tuned no-BN network's best "
    "test accuracy in fewer steps than it (per seed)."
)
CONDITIONS = (
    Condition("x5", "steps to target, tuned no BN over BN at 5x its rate", ">", 1.0,
              "'fewer steps' predicts a speed-up above 1 (the paper's is 14.8x)", log=True),
    Condition("x30", "steps to target, tuned no BN over BN at 30x its rate", ">", 1.0,
              "as for x5 (the paper's is 11.5x)", log=True),
)
PAPER = (
    ("ImageNet, steps to Inception's best (72.2%): Inception / BN-x5 / BN-x30", "31.0M / 2.1M / 2.7M (14.8x, 11.5x)"),
    ("Inception without BN at 5x its rate", "diverged"),
)
SMOOTH = 3  # checkpoints in the trailing mean the "first reached" step is read on


@dataclass(frozen=True)
class Config(Profiles):
    seeds: int = 5
    no_bn_lrs: tuple[float, ...] = (0.1, 0.2, 0.4, 0.8)  # the no-BN sweep (the best must lie inside it)
    multipliers: tuple[float, ...] = (5.0, 30.0)
    steps: int = 600
    eval_every: int = 20
    batch_size: int = 60
    widths: tuple[int, ...] = (100,) * 4
    norm: str = "ours"

    FULL = dict(seeds=5, no_bn_lrs=(0.05, 0.1, 0.2, 0.4, 0.8), steps=2000, eval_every=50)
    SMOKE = dict(seeds=1, no_bn_lrs=(0.05, 0.1), steps=20, eval_every=10, widths=(32, 32))


def smooth(acc: np.ndarray) -> np.ndarray:
    """Trailing mean over ``SMOOTH`` checkpoints, per row (fewer at the start)."""
    c = np.cumsum(np.pad(acc, ((0, 0), (1, 0))), axis=1)
    n = np.minimum(np.arange(1, acc.shape[1] + 1), SMOOTH)
    return (c[:, 1:] - c[:, np.maximum(np.arange(1, acc.shape[1] + 1) - n, 0)]) / n


def first_reach(steps: np.ndarray, curve: np.ndarray, target: float, censored: float) -> float:
    """The first step where ``curve`` reaches ``target``, else ``censored``."""
    step = steps_to(steps, curve, target)
    return censored if step is None else float(step)


def run(ctx: Context) -> ClaimResult:
    cfg = ctx.config()

    def spec(norm: str, lr: float, seed: int) -> TrainSpec:
        return TrainSpec(widths=cfg.widths, activation="relu", init="kaiming", norm=norm, lr=lr,
                         batch_size=cfg.batch_size, steps=cfg.steps, eval_every=cfg.eval_every, seed=seed)

    plain: dict[float, list[RunResult]] = {lr: [ctx.train(spec("none", lr, s)) for s in ctx.seeds()] for lr in cfg.no_bn_lrs}
    peak = {lr: float(checkpoint_matrix(rs)[1].max(axis=1).mean()) for lr, rs in plain.items()}
    best = max(cfg.no_bn_lrs, key=lambda lr: peak[lr])
    bn = {k: [ctx.train(spec(cfg.norm, best * k, s)) for s in ctx.seeds()] for k in cfg.multipliers}

    steps, base = checkpoint_matrix(plain[best])
    base_s = smooth(base)
    target = base_s.max(axis=1)  # per seed
    censored = float(steps[-1] + cfg.eval_every)
    reach_base = np.asarray([first_reach(steps, base_s[i], target[i], censored) for i in range(len(target))])
    reach, curves = {}, {}
    for k, rs in bn.items():
        s, acc = checkpoint_matrix(rs)
        curves[k] = acc
        acc_s = smooth(acc)
        reach[k] = np.asarray([censored if rs[i].diverged_at is not None else first_reach(s, acc_s[i], target[i], censored)
                               for i in range(len(rs))])
    with np.errstate(divide="ignore", invalid="ignore"):  # a target reached at step 0 (no learning): no ratio (nan)
        measured = {f"x{k:g}": reach_base / reach[k] for k in cfg.multipliers}

    fig, (left, right) = plots.new(ncols=2)
    plots.mean_band(left, steps, base, f"no BN, lr {best:g} (its best)", plots.NO_BN_COLOR)
    for k, color in zip(cfg.multipliers, ("tab:green", "tab:purple")):
        plots.mean_band(left, steps, curves[k], f"BN, lr {best * k:g} (x{k:g})", color)
    left.axhline(float(target.mean()), color="gray", linestyle=":", label="target (mean over seeds)")
    left.set(xlabel="training step", ylabel="test accuracy", title="Test accuracy (mean, min-max band over seeds)")
    left.legend(fontsize="small")
    labels = ["no BN\n(best lr)"] + [f"BN x{k:g}" for k in cfg.multipliers]
    plots.seed_bars(right, [0], [reach_base], 0.6, plots.NO_BN_COLOR, "no BN")
    for j, (k, color) in enumerate(zip(cfg.multipliers, ("tab:green", "tab:purple"))):
        plots.seed_bars(right, [j + 1], [reach[k]], 0.6, color, f"BN x{k:g}")
    right.axhline(censored, color="gray", linestyle=":", label="not reached (censored)")
    right.set_xticks(range(len(labels)), labels)
    right.set(ylabel="steps to the seed's target", title="Steps to the tuned no-BN network's best (dots: seeds)")
    right.legend(fontsize="small")
    ctx.save_figure(fig, "steps_to_target", "Left: the tuned no-BN network and BN at 5x and 30x its rate. Right: per "
                    "seed, the step where each first reaches the no-BN network's best accuracy (lower is faster; "
                    "dots on the dotted line never reached it).")
    ctx.save_csv("curves", ["arm", "lr", "seed", "step", "test_accuracy"],
                 [(arm, r.spec["lr"], r.spec["seed"], s, a)
                  for arm, rs in [*((f"no_bn", v) for v in plain.values()), *((f"bn_x{k:g}", v) for k, v in bn.items())]
                  for r in rs for s, a in zip(r.eval_steps, r.test_accuracy)])

    diverged = {k: sum(r.diverged_at is not None for r in rs) for k, rs in bn.items()}
    speed = {k: float(np.exp(np.mean(np.log(measured[f"x{k:g}"])))) for k in cfg.multipliers}
    summary = (f"No-BN sweep (peak test accuracy): " + ", ".join(f"lr {lr:g} {peak[lr]:.1%}" for lr in cfg.no_bn_lrs)
               + f"; best lr {best:g}, target {target.mean():.1%} reached at step {reach_base.mean():.0f} (mean). BN: "
               + "; ".join(f"x{k:g} (lr {best * k:g}) at step {reach[k].mean():.0f}, {speed[k]:.2f}x fewer steps"
                           + (f", {diverged[k]} seeds diverged" if diverged[k] else "") for k in cfg.multipliers) + ".")
    metrics = {"no_bn_peak_accuracy": {str(lr): p for lr, p in peak.items()}, "no_bn_best_lr": best,
               "target_per_seed": target.tolist(), "steps_no_bn": reach_base.tolist(),
               **{f"steps_bn_x{k:g}": reach[k].tolist() for k in cfg.multipliers},
               "bn_diverged_runs": {f"x{k:g}": d for k, d in diverged.items()}}
    top = max(cfg.no_bn_lrs)
    top_diverged = sum(r.diverged_at is not None for r in plain[top])
    here = ("; ".join(f"x{k:g}: {speed[k]:.2f}x fewer steps than no BN at its best lr" for k in cfg.multipliers),
            f"not judged (C5 judges it): no BN at lr {top:g} ({top / best:g}x its best) peaked at {peak[top]:.1%}, "
            f"diverged in {top_diverged} of {len(ctx.seeds())} seeds")
    return ctx.result(summary, metrics, measured, here)
