"""A6 Vanishing gradients with saturating activations (the article; Ioffe & Szegedy 2015, Sec. 1).

Claim: in a deep network of saturating nonlinearities (sigmoid) the gradients of the
early layers vanish and units saturate; BN keeps the activations' inputs out of the
saturated regime, so gradients flow through every layer.

Here: a deep sigmoid MLP (quick: 10 hidden layers of 100 units; full: 20) with and
without BN before each sigmoid, plain SGD, same initial weights and batches per seed, in
two settings judged apart:

- gradient flow, with torch's default initialisation: the norm of the loss gradient
  w.r.t. each hidden Linear weight (cross-entropy on 1000 training examples, training
  mode) at step 0 and at the end. Vanishing = the last hidden layer's gradient over the
  first's; BN's flow = its largest over smallest layer gradient;
- saturation, with an initialisation that reaches it (``init="saturating"``: weights
  N(0, 36 / fan_in), so a sigmoid input has a standard deviation of about 6 times the
  root mean square of the layer's input): the fraction of sigmoid inputs with |z| > 4
  (sigmoid' < 0.018) on the held-out batch, mean over layers, at the end of training.

Rule history: until the eighth session the saturation condition used torch's default
initialisation, with which the sigmoid inputs' standard deviation is about 0.3: the no-BN
network never saturates (its gradients vanish from the sigmoid's 0.25 slope alone), so the
condition could never hold and A6 read "inconclusive" while its gradient half was clear.
Now saturation is tested where it can occur, and each condition has a 95% interval over seeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import plots
from ..experiment import ClaimResult, Condition, Context, Profiles
from ..probes import SATURATED
from ..train import RunResult, TrainSpec

ID = "A6"
TITLE = "BN prevents vanishing gradients in a deep sigmoid network"
CLAIM = (
    "With saturating activations, gradients vanish in the early layers of a deep network and "
    "units saturate; BN keeps the inputs of the nonlinearities in the non-saturated regime so "
    "the gradients flow (the article; Ioffe & Szegedy 2015, Sec. 1)."
)
EXPECTATION = (
    "At initialisation the no-BN network's last hidden layer gets at least 100x the first's gradient, "
    "relative to BN's same ratio; with BN every layer's gradient is within 10x of every other's at the "
    "end of training; with a saturating initialisation, at least 10 points more sigmoid inputs are "
    "saturated without BN than with it at the end of training."
)
VANISHED, SMALL_FACTOR, SATURATION_GAP = 100.0, 10.0, 0.10
CONDITIONS = (
    Condition("vanishing", "at step 0, (last/first layer gradient) without BN over the same with BN", ">", VANISHED,
              "'vanish' means orders of magnitude: two, i.e. the first layer learns 100x slower relative to the last",
              log=True),
    Condition("flow", "with BN, largest over smallest layer gradient at the end of training", "<", SMALL_FACTOR,
              "'gradients flow through every layer': no layer more than one order of magnitude behind another", log=True),
    Condition("saturation", "saturating init: fraction of saturated sigmoid inputs at the end, no BN minus BN", ">",
              SATURATION_GAP, "'units saturate' without BN and not with it: a gap of 10 points of the inputs, far "
              "above BN's own share (|z| > 4 is 6e-5 of a standard normal)"),
)
PAPER = (("Deep sigmoid networks (qualitative, Sec. 1)", "gradients vanish, units saturate without BN"),)


@dataclass(frozen=True)
class Config(Profiles):
    seeds: int = 5
    depth: int = 10  # hidden layers
    width: int = 100
    steps: int = 200
    eval_every: int = 50
    lr: float = 0.5
    batch_size: int = 60
    norm: str = "ours"

    FULL = dict(seeds=5, depth=20, steps=3000, eval_every=500)
    SMOKE = dict(seeds=1, depth=4, steps=20, eval_every=10)


def grads(run: RunResult) -> np.ndarray:
    """(checkpoints, layers) weight-gradient norms."""
    return np.asarray([g["weight"] for g in run.probes["grad_norms"]])


def saturation(run: RunResult) -> np.ndarray:
    """(checkpoints, layers) fraction of saturated sigmoid inputs."""
    return np.asarray([s["fraction"] for s in run.probes["saturation"]])


def run(ctx: Context) -> ClaimResult:
    cfg = ctx.config()
    arms: dict[tuple[str, str], list[RunResult]] = {}
    for init in ("torch", "saturating"):
        by_arm = ctx.train_arms(lambda seed: TrainSpec(widths=(cfg.width,) * cfg.depth, activation="sigmoid", lr=cfg.lr,
                                                       batch_size=cfg.batch_size, steps=cfg.steps,
                                                       eval_every=cfg.eval_every, seed=seed, init=init,
                                                       probes=("grad_norms", "saturation")), cfg.norm)
        arms.update({(arm, init): rs for arm, rs in by_arm.items()})

    g = {arm: np.asarray([grads(r) for r in arms[arm, "torch"]]) for arm in ("bn", "no_bn")}  # (seeds, checkpoints, layers)
    last_over_first = {arm: v[:, 0, -1] / v[:, 0, 0] for arm, v in g.items()}
    spread_end = {arm: v[:, -1].max(axis=1) / v[:, -1].min(axis=1) for arm, v in g.items()}
    sat = {arm: np.asarray([saturation(r)[-1].mean() for r in arms[arm, "saturating"]]) for arm in ("bn", "no_bn")}
    sat0 = {arm: np.asarray([saturation(r)[0].mean() for r in arms[arm, "saturating"]]) for arm in ("bn", "no_bn")}
    accuracy = {key: float(np.mean([r.final_test_accuracy for r in rs])) for key, rs in arms.items()}
    measured = {"vanishing": last_over_first["no_bn"] / last_over_first["bn"], "flow": spread_end["bn"],
                "saturation": sat["no_bn"] - sat["bn"]}

    fig, axes = plots.new(ncols=2)
    layers = np.arange(1, cfg.depth + 1)
    for arm, label, color in (("bn", "BN", plots.BN_COLOR), ("no_bn", "no BN", plots.NO_BN_COLOR)):
        for i, when, style in ((0, "step 0", "--"), (-1, f"step {cfg.steps}", "-")):
            per_seed = g[arm][:, i]
            geo = np.exp(np.log(per_seed).mean(axis=0))
            axes[0].plot(layers, geo, "o" + style, color=color, label=f"{label}, {when}")
            if len(per_seed) > 1:
                axes[0].fill_between(layers, per_seed.min(axis=0), per_seed.max(axis=0), color=color, alpha=0.12, linewidth=0)
            s = np.asarray([saturation(r)[i] for r in arms[arm, "saturating"]])
            axes[1].plot(layers, s.mean(axis=0), "o" + style, color=color, label=f"{label}, {when}")
            if len(s) > 1:
                axes[1].fill_between(layers, s.min(axis=0), s.max(axis=0), color=color, alpha=0.12, linewidth=0)
    axes[0].set(yscale="log", xlabel="hidden layer (1 = nearest the input)", ylabel="||dLoss/dW||",
                title=f"Gradient norm per layer, default init ({cfg.depth}x{cfg.width} sigmoid)")
    axes[1].set(xlabel="hidden layer", ylabel=f"fraction with |sigmoid input| > {SATURATED:g}",
                title="Saturated sigmoid inputs, saturating init")
    for ax in axes:
        ax.legend(fontsize="small")
    ctx.save_figure(fig, "gradients", "Left: per layer, the gradient norm (geometric mean over seeds, min-max band); a "
                    "line falling towards layer 1 is a vanishing gradient, a flat one is flow. Right: with the saturating "
                    "initialisation, the share of saturated sigmoid inputs per layer at step 0 and at the end.")
    ctx.save_csv("per_layer", ["init", "arm", "seed", "step", "layer", "grad_norm", "saturated_fraction"],
                 [(init, arm, r.spec["seed"], s, layer + 1, grads(r)[i, layer], saturation(r)[i, layer])
                  for (arm, init), rs in arms.items() for r in rs for i, s in enumerate(r.eval_steps)
                  for layer in range(cfg.depth)])

    def geo(v: np.ndarray) -> float:
        return float(np.exp(np.log(v).mean()))

    summary = (f"Default init, step 0: last/first hidden layer gradient {geo(last_over_first['no_bn']):.3g}x without BN, "
               f"{geo(last_over_first['bn']):.3g}x with (geometric means of {len(ctx.seeds())} seeds); with BN the largest/"
               f"smallest layer gradient is {geo(spread_end['bn']):.3g}x at step {cfg.steps} (without: "
               f"{geo(spread_end['no_bn']):.3g}x). Saturating init: {sat['no_bn'].mean():.1%} of sigmoid inputs saturated "
               f"without BN vs {sat['bn'].mean():.1%} with at step {cfg.steps} ({sat0['no_bn'].mean():.1%} vs "
               f"{sat0['bn'].mean():.1%} at step 0). Test accuracy, default init: {accuracy['no_bn', 'torch']:.1%} without "
               f"BN vs {accuracy['bn', 'torch']:.1%} with; saturating init: {accuracy['no_bn', 'saturating']:.1%} vs "
               f"{accuracy['bn', 'saturating']:.1%}.")
    metrics = {
        "last_over_first_grad_init_no_bn": last_over_first["no_bn"].tolist(),
        "last_over_first_grad_init_bn": last_over_first["bn"].tolist(),
        "grad_spread_end_bn": spread_end["bn"].tolist(),
        "grad_spread_end_no_bn": spread_end["no_bn"].tolist(),
        "saturated_fraction_end_no_bn": sat["no_bn"].tolist(),
        "saturated_fraction_end_bn": sat["bn"].tolist(),
        "saturated_fraction_init_no_bn": sat0["no_bn"].tolist(),
        "saturated_fraction_init_bn": sat0["bn"].tolist(),
        "final_test_accuracy": {f"{arm}/{init}": a for (arm, init), a in accuracy.items()},
    }
    here = (f"last/first layer gradient {geo(last_over_first['no_bn']):.3g}x without BN vs {geo(last_over_first['bn']):.3g}x "
            f"with; saturated {sat['no_bn'].mean():.1%} vs {sat['bn'].mean():.1%} (saturating init)",)
    return ctx.result(summary, metrics, measured, here)
