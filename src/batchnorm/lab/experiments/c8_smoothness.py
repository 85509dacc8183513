"""C8 Smoother loss landscape (Santurkar et al. 2018, Fig. 4).

Paper: at steps of training, move from the current weights along the gradient, to
W - eta * g for a range of step sizes, and record (a) the range of the loss over those
points ("loss landscape"), (b) the largest l2 change of the gradient ("gradient
predictiveness"), (c) the largest gradient change per unit of distance ("effective
beta-smoothness"). With BN the loss varies less and the gradient is far more predictive:
(b) differs by about two orders of magnitude, mostly early in training (VGG, CIFAR-10).
Pilot (6x100 ReLU, batch 128, steps 50-500): loss range 2.3-13.8 without BN vs 0.11-0.47
with; gradient change 12-31 vs 1.9-3.0; (c) was not consistently better.

Here: that MLP (He initialisation, as C5) with and without BN before each ReLU, SGD at
one learning rate for both, same initial weights and batches per seed; at every
checkpoint ``lab.gradients.landscape`` on a fixed batch of training examples (batch
statistics), step sizes 0.5x, 1x, 2x, 4x the learning rate. The verdict reads the early
checkpoints (steps 1-500, the pilot's window; the paper sees the effect mostly early in
training); the figure and the summary show the whole run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch.nn.functional as F

from .. import plots
from ..experiment import ClaimResult, Context, decide
from ..gradients import landscape
from ..models import MLP
from ..probes import register_with
from ..train import RunResult, TrainSpec

ID = "C8"
TITLE = "BN makes the loss landscape smoother"
CLAIM = (
    "BN makes the loss and its gradient vary less along the gradient direction: smaller loss "
    "range and far more predictive gradients (Santurkar et al. 2018, Fig. 4: the gradient change "
    "differs by about two orders of magnitude, mostly early in training; effective beta-smoothness "
    "also improves). MLP pilot: loss range 2.3-13.8 without BN vs 0.11-0.47 with; gradient change "
    "12-31 vs 1.9-3.0; beta-smoothness not consistently better."
)
EXPECTATION = (
    "Early in training, where the paper sees the effect (the checkpoints after step 0 up to step 500, "
    "the pilot's window), both the loss range and the gradient change along the gradient are smaller "
    "with BN than without at 75% or more of the checkpoints (mean over seeds); later checkpoints and "
    "the effective beta-smoothness are reported, not judged. (BN smaller at 25% or fewer of those "
    "checkpoints for both: not supported.)"
)
MOSTLY, RARELY = 0.75, 0.25
MEASURES = (("loss_range", "loss range"), ("gradient_change", "gradient change ||g(eta) - g||"),
            ("beta_smoothness", "effective beta-smoothness"))


@dataclass(frozen=True)
class Config:
    seeds: int = 2
    steps: int = 500
    eval_every: int = 50
    lr: float = 0.1
    batch_size: int = 128
    widths: tuple[int, ...] = (100,) * 6
    multipliers: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)  # step sizes, in learning rates
    judged_until: int = 500  # the verdict reads the checkpoints in (0, judged_until]
    norm: str = "ours"

    @classmethod
    def quick(cls) -> Config:
        return cls()

    @classmethod
    def full(cls) -> Config:
        return cls(seeds=3, steps=3000, eval_every=100)

    @classmethod
    def smoke(cls) -> Config:
        return cls(seeds=1, steps=10, eval_every=5, widths=(16, 16, 16))


def _probe(model: MLP, data, lr: float, batch: int, multipliers: tuple[float, ...]) -> dict:
    x, y = data.x_train[:batch], data.y_train[:batch]
    return landscape(model, lambda m: F.cross_entropy(m(x), y), lr, multipliers)


def run(ctx: Context) -> ClaimResult:
    cfg = ctx.config()
    probe = register_with("landscape", _probe, lr=cfg.lr, batch=cfg.batch_size, multipliers=tuple(cfg.multipliers))
    arms: dict[str, list[RunResult]] = {"bn": [], "no_bn": []}
    for seed in ctx.seeds():
        base = TrainSpec(widths=cfg.widths, activation="relu", init="kaiming", lr=cfg.lr, batch_size=cfg.batch_size, steps=cfg.steps,
                         eval_every=cfg.eval_every, seed=seed, probes=(probe,))
        arms["bn"].append(ctx.train(replace(base, norm=cfg.norm)))
        arms["no_bn"].append(ctx.train(base))
    n = min(len(r.eval_steps) for rs in arms.values() for r in rs)  # a diverged run has fewer checkpoints
    steps = np.asarray(arms["bn"][0].eval_steps[:n])
    values = {(arm, key): np.asarray([[p[key] for p in r.probes[probe][:n]] for r in rs], dtype=float)
              for arm, rs in arms.items() for key, _ in MEASURES}
    mean = {k: np.nanmean(v, axis=0) for k, v in values.items()}
    early = (steps > 0) & (steps <= cfg.judged_until)
    if not early.any():  # a run too short (or diverged too soon) for the window: judge what there is
        early = np.ones_like(steps, dtype=bool)
    smaller = {key: float(np.mean(mean["bn", key][early] < mean["no_bn", key][early])) for key, _ in MEASURES}
    smaller_all = {key: float(np.mean(mean["bn", key] < mean["no_bn", key])) for key, _ in MEASURES}
    verdict = decide(supported=smaller["loss_range"] >= MOSTLY and smaller["gradient_change"] >= MOSTLY,
                     refuted=smaller["loss_range"] <= RARELY and smaller["gradient_change"] <= RARELY)

    fig, axes = plots.new(ncols=3, width=5.0)
    for ax, (key, label) in zip(axes, MEASURES):
        for arm, name, color in (("bn", "BN", plots.BN_COLOR), ("no_bn", "no BN", plots.NO_BN_COLOR)):
            plots.mean_band(ax, steps, values[arm, key], name, color)
        ax.set(yscale="log", xlabel="training step", ylabel=label, title=label.split(" ||")[0])
        ax.legend()
    ctx.save_figure(fig, "landscape")
    ctx.save_csv("landscape", ["arm", "seed", "step", *[k for k, _ in MEASURES]],
                 [(arm, r.spec["seed"], s, *[p[k] for k, _ in MEASURES]) for arm, rs in arms.items() for r in rs
                  for s, p in zip(r.eval_steps, r.probes[probe])])

    def span(arm: str, key: str) -> str:
        v = mean[arm, key][early]
        return f"{np.nanmin(v):.3g}-{np.nanmax(v):.3g}"

    ratio = {key: float(np.nanmedian(mean["no_bn", key][early] / mean["bn", key][early])) for key, _ in MEASURES}
    window = steps[early]
    summary = (f"Steps {window[0]}-{window[-1]}, without vs with BN: loss range {span('no_bn', 'loss_range')} "
               f"vs {span('bn', 'loss_range')}; gradient change {span('no_bn', 'gradient_change')} vs "
               f"{span('bn', 'gradient_change')} (median ratio {ratio['gradient_change']:.3g}x); beta-smoothness "
               f"{span('no_bn', 'beta_smoothness')} vs {span('bn', 'beta_smoothness')}. BN smaller (loss range / "
               f"gradient change / beta-smoothness) at {smaller['loss_range']:.0%} / {smaller['gradient_change']:.0%} / "
               f"{smaller['beta_smoothness']:.0%} of these checkpoints; over all {len(steps)} checkpoints to step "
               f"{steps[-1]}: {smaller_all['loss_range']:.0%} / {smaller_all['gradient_change']:.0%} / "
               f"{smaller_all['beta_smoothness']:.0%}.")
    metrics = {
        **{f"fraction_of_early_checkpoints_bn_smaller_{key}": v for key, v in smaller.items()},
        **{f"fraction_of_all_checkpoints_bn_smaller_{key}": v for key, v in smaller_all.items()},
        **{f"median_ratio_no_bn_over_bn_{key}": v for key, v in ratio.items()},
        **{f"{arm}_{key}": mean[arm, key].tolist() for arm in arms for key, _ in MEASURES},
        "steps": steps.tolist(),
        "diverged_runs": sum(r.diverged_at is not None for rs in arms.values() for r in rs),
    }
    return ctx.result(verdict, summary, metrics)
