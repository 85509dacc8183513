"""C2 Stable input distribution (Ioffe & Szegedy 2015, Fig. 1b,c).

Paper: the 15th, 50th and 85th percentiles of the input of one typical sigmoid of the
last hidden layer, over training (MNIST, C1's network). Without BN they drift (on
MNIST-1D they settle saturated near -2.9/-2.6/-2.3); with BN they stay put.

Here: C1's runs (same configuration, so the lab trains them once) record the percentiles
of every last-hidden-layer sigmoid input on a fixed held-out batch (the first 1000 test
examples) at every checkpoint, with BN in training mode: batch statistics of that batch,
because the running statistics start at (0, 1) and would hide the effect at step 0.
Drift of a unit: the total movement of its median, sum of |change| between checkpoints,
after the first 10% of training. The figure shows unit 0 of seed 0.
"""

from __future__ import annotations

import numpy as np

from .. import plots
from ..experiment import ClaimResult, Context, decide
from ..train import RunResult
from . import c1_training

ID = "C2"
TITLE = "BN keeps the distribution of a layer's inputs stable"
CLAIM = (
    "With BN the distribution of a sigmoid's input stays stable during training, while "
    "without BN it drifts (Ioffe & Szegedy 2015, Fig. 1b,c: 15th/50th/85th percentiles of one "
    "last-hidden-layer sigmoid input over training; on MNIST-1D without BN they settle "
    "saturated near -2.9/-2.6/-2.3)."
)
EXPECTATION = (
    "After the first 10% of training, the median of a last-hidden-layer sigmoid input moves "
    "at most half as much with BN as without (total movement, mean over units and seeds)."
)
Config = c1_training.Config  # the same runs as C1


def percentiles(run: RunResult) -> np.ndarray:
    """(checkpoints, 3, units): the 15th/50th/85th percentiles at each checkpoint."""
    return np.asarray([[p["p15"], p["p50"], p["p85"]] for p in run.probes["unit_percentiles"]])


def drift(run: RunResult) -> tuple[float, float]:
    """Total and net movement of the median after 10% of training, mean over units."""
    steps = np.asarray(run.eval_steps)
    median = percentiles(run)[steps >= 0.1 * steps[-1], 1, :]
    total = np.abs(np.diff(median, axis=0)).sum(axis=0)
    net = np.abs(median[-1] - median[0])
    return float(total.mean()), float(net.mean())


def run(ctx: Context) -> ClaimResult:
    cfg = ctx.config()
    arms = c1_training.runs(ctx)
    moves = {arm: np.asarray([drift(r) for r in rs]) for arm, rs in arms.items()}
    total = {arm: float(m[:, 0].mean()) for arm, m in moves.items()}
    net = {arm: float(m[:, 1].mean()) for arm, m in moves.items()}
    final = {arm: percentiles(rs[0])[-1, :, 0].tolist() for arm, rs in arms.items()}
    verdict = decide(supported=total["bn"] <= 0.5 * total["no_bn"], refuted=total["bn"] >= total["no_bn"])

    fig, axes = plots.new(ncols=2)
    for ax, arm, label in ((axes[0], "no_bn", "without BN"), (axes[1], "bn", "with BN")):
        r = arms[arm][0]
        p = percentiles(r)
        for k, (name, style) in enumerate((("15th", "--"), ("50th", "-"), ("85th", "--"))):
            ax.plot(r.eval_steps, p[:, k, 0], style, color="black", label=f"{name} percentile")
        ax.set(xlabel="training step", ylabel="sigmoid input", title=f"Unit 0 of the last hidden layer, {label}")
        ax.legend()
    low = min(ax.get_ylim()[0] for ax in axes)
    high = max(ax.get_ylim()[1] for ax in axes)
    for ax in axes:
        ax.set_ylim(low, high)
    ctx.save_figure(fig, "percentiles")
    ctx.save_csv("percentiles_unit0", ["arm", "seed", "step", "p15", "p50", "p85"],
                 [(arm, r.spec["seed"], s, *percentiles(r)[i, :, 0]) for arm, rs in arms.items() for r in rs
                  for i, s in enumerate(r.eval_steps)])

    summary = (f"Median of a last-hidden-layer sigmoid input after the first 10% of training: total movement "
               f"{total['bn']:.3f} with BN vs {total['no_bn']:.3f} without (net {net['bn']:.3f} vs {net['no_bn']:.3f}); "
               f"final 15/50/85th percentiles of unit 0 (seed 0): without BN "
               f"{'/'.join(f'{v:.2f}' for v in final['no_bn'])}, with BN {'/'.join(f'{v:.2f}' for v in final['bn'])}.")
    metrics = {
        "median_total_movement_bn": total["bn"],
        "median_total_movement_no_bn": total["no_bn"],
        "median_net_movement_bn": net["bn"],
        "median_net_movement_no_bn": net["no_bn"],
        "final_percentiles_unit0_bn": final["bn"],
        "final_percentiles_unit0_no_bn": final["no_bn"],
        "steps": cfg.steps,
    }
    return ctx.result(verdict, summary, metrics)
