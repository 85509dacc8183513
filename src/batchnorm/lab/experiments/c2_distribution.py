"""C2 Stable input distribution (Ioffe & Szegedy 2015, Fig. 1b,c).

Paper: the 15th, 50th and 85th percentiles of the input of one typical sigmoid of the
last hidden layer, over training (MNIST, C1's network). Without BN they drift (on
MNIST-1D they settle saturated near -2.9/-2.6/-2.3); with BN they stay put.

Here: C1's MLP runs (same configuration, so the lab trains them once) record the
percentiles of every last-hidden-layer sigmoid input on a fixed held-out batch (the first
1000 test examples) at every checkpoint, with BN in training mode: batch statistics of
that batch, because the running statistics start at (0, 1) and would hide the effect at
step 0. The drift of a unit is scale-free: the movement of its median after the first 10%
of training divided by its mean inter-percentile width (85th minus 15th percentile) over
the same checkpoints; net = |last median - first median| / width, total = sum of
|change| between checkpoints / width. Per seed, the mean over the units.

Rule history: until the eighth session the drift was the total absolute movement of the
median (not divided by the width), so BN's growing gamma, which widens the distribution
it normalises, counted as its own drift; the rule asked BN's to be at most half of no
BN's on the mean of the seeds. Now: the scale-free net and total drift, both per seed,
with 95% intervals (``CONDITIONS``).
"""

from __future__ import annotations

import numpy as np

from .. import plots
from ..experiment import ClaimResult, Condition, Context
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
    "After the first 10% of training, the median of a last-hidden-layer sigmoid input drifts, "
    "in units of its own 15-85% width, less than half as much with BN as without: net and total movement, per seed."
)
FACTOR = 2.0
CONDITIONS = (
    Condition("net", "net drift of the median (in widths), no BN over BN", ">", FACTOR,
              "'stays put' vs 'drifts': at least a factor 2 (the rule's 'half as much', stated before the first run)",
              log=True),
    Condition("total", "total drift of the median (in widths), no BN over BN", ">", FACTOR,
              "the same for the path length, which also counts back-and-forth movement", log=True),
)
PAPER = (
    ("MNIST, 3x100 sigmoid MLP, one last-layer unit: 15/50/85th percentiles without BN", "drift over training (figure)"),
    ("MNIST-1D pilot, same MLP, final 15/50/85th percentiles without BN", "-2.9 / -2.6 / -2.3"),
)
Config = c1_training.Config  # the same runs as C1
START = 0.1  # the drift is measured after the first 10% of training


def percentiles(run: RunResult) -> np.ndarray:
    """(checkpoints, 3, units): the 15th/50th/85th percentiles at each checkpoint."""
    return np.asarray([[p["p15"], p["p50"], p["p85"]] for p in run.probes["unit_percentiles"]])


def drift(run: RunResult) -> tuple[float, float]:
    """Net and total movement of the median after ``START`` of training, in units of the
    unit's mean 15-85% width over those checkpoints; mean over units."""
    steps = np.asarray(run.eval_steps)
    p = percentiles(run)[steps >= START * steps[-1]]
    median = p[:, 1, :]
    width = np.maximum((p[:, 2, :] - p[:, 0, :]).mean(axis=0), 1e-12)
    net = np.abs(median[-1] - median[0]) / width
    total = np.abs(np.diff(median, axis=0)).sum(axis=0) / width
    return float(net.mean()), float(total.mean())


def run(ctx: Context) -> ClaimResult:
    arms = c1_training.runs(ctx)
    moves = {arm: np.asarray([drift(r) for r in rs]) for arm, rs in arms.items()}  # (seeds, [net, total])
    final = {arm: percentiles(rs[0])[-1, :, 0].tolist() for arm, rs in arms.items()}
    measured = {"net": moves["no_bn"][:, 0] / np.maximum(moves["bn"][:, 0], 1e-12),
                "total": moves["no_bn"][:, 1] / np.maximum(moves["bn"][:, 1], 1e-12)}

    fig, axes = plots.new(ncols=3, width=4.6)
    styles = (("15th", "tab:orange", "--"), ("50th (median)", "black", "-"), ("85th", "tab:purple", "--"))
    for ax, arm, label in ((axes[0], "no_bn", "without BN"), (axes[1], "bn", "with BN")):
        r = arms[arm][0]
        p = percentiles(r)
        for k, (name, color, style) in enumerate(styles):
            ax.plot(r.eval_steps, p[:, k, 0], style, color=color, label=f"{name} percentile")
        ax.axvspan(0, START * r.eval_steps[-1], color="gray", alpha=0.1, label="not measured")
        ax.set(xlabel="training step", ylabel="sigmoid input", title=f"Unit 0 of the last hidden layer, {label} (seed 0)")
        ax.legend(fontsize="small")
    low = min(ax.get_ylim()[0] for ax in axes[:2])
    high = max(ax.get_ylim()[1] for ax in axes[:2])
    for ax in axes[:2]:
        ax.set_ylim(low, high)
    x = np.arange(2)
    for j, (arm, label, color) in enumerate((("no_bn", "no BN", plots.NO_BN_COLOR), ("bn", "BN", plots.BN_COLOR))):
        plots.seed_bars(axes[2], x + (j - 0.5) * 0.4, [moves[arm][:, 0], moves[arm][:, 1]], 0.4, color, label)
    axes[2].set_xticks(x, ["net drift", "total drift"])
    axes[2].set(yscale="log", ylabel="median movement / 15-85% width", title="Drift per seed (dots), mean of units")
    axes[2].legend()
    ctx.save_figure(fig, "percentiles", "Left and middle: the 15th (orange), 50th (black) and 85th (purple) percentiles "
                    "of one sigmoid input, same scale; look at whether the band moves after the grey start. Right: "
                    "each seed's drift in widths (dots), bars at the mean, log scale.")
    ctx.save_csv("percentiles_unit0", ["arm", "seed", "step", "p15", "p50", "p85"],
                 [(arm, r.spec["seed"], s, *percentiles(r)[i, :, 0]) for arm, rs in arms.items() for r in rs
                  for i, s in enumerate(r.eval_steps)])
    ctx.save_csv("drift", ["arm", "seed", "net_drift_widths", "total_drift_widths"],
                 [(arm, r.spec["seed"], *moves[arm][i]) for arm, rs in arms.items() for i, r in enumerate(rs)])

    mean = {arm: m.mean(axis=0) for arm, m in moves.items()}
    summary = (f"Drift of the median of a last-hidden-layer sigmoid input after the first 10% of training, in 15-85% "
               f"widths (mean over units and {len(ctx.seeds())} seeds): net {mean['no_bn'][0]:.3f} without BN vs "
               f"{mean['bn'][0]:.3f} with, total {mean['no_bn'][1]:.3f} vs {mean['bn'][1]:.3f}; final 15/50/85th "
               f"percentiles of unit 0 (seed 0): without BN {'/'.join(f'{v:.2f}' for v in final['no_bn'])}, with BN "
               f"{'/'.join(f'{v:.2f}' for v in final['bn'])}.")
    metrics = {
        "net_drift_bn": moves["bn"][:, 0].tolist(), "net_drift_no_bn": moves["no_bn"][:, 0].tolist(),
        "total_drift_bn": moves["bn"][:, 1].tolist(), "total_drift_no_bn": moves["no_bn"][:, 1].tolist(),
        "final_percentiles_unit0_bn": final["bn"], "final_percentiles_unit0_no_bn": final["no_bn"],
    }
    here = (f"{ctx.data.name}: net drift {mean['no_bn'][0]:.3f} widths without BN vs {mean['bn'][0]:.3f} with",
            "without BN " + "/".join(f"{v:.2f}" for v in final["no_bn"]) + " (unit 0, seed 0)")
    return ctx.result(summary, metrics, measured, here)
