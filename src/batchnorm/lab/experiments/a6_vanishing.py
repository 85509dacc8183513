"""A6 Vanishing gradients with saturating activations (the article; Ioffe & Szegedy 2015, Sec. 1).

Claim: in a deep network of saturating nonlinearities (sigmoid) the gradients of the
early layers vanish and units saturate; BN keeps the activations' inputs out of the
saturated regime, so gradients flow through every layer.

Here: a deep sigmoid MLP (quick: 10 hidden layers of 100 units; full: 20) with and
without BN before each sigmoid, plain SGD, same initial weights and batches per seed.
At every checkpoint: the norm of the loss gradient w.r.t. each hidden Linear weight
(cross-entropy on 1000 training examples) and the fraction of saturated sigmoid inputs
(|z| > 4) on the held-out batch, both in training mode.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .. import plots
from ..experiment import ClaimResult, Context, decide
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
    "At initialisation, without BN the last hidden layer's weight gradient is at least 100x the "
    "first's; with BN every layer's gradient norm is within 10x of every other's, at "
    "initialisation and at the end of training; at the end, a larger fraction of sigmoid "
    "inputs is saturated without BN than with it."
)
VANISHED, SMALL_FACTOR = 100.0, 10.0


@dataclass(frozen=True)
class Config:
    seeds: int = 2
    depth: int = 10  # hidden layers
    width: int = 100
    steps: int = 500
    eval_every: int = 50
    lr: float = 0.5
    batch_size: int = 60
    norm: str = "ours"

    @classmethod
    def quick(cls) -> Config:
        return cls()

    @classmethod
    def full(cls) -> Config:
        return cls(seeds=3, depth=20, steps=10_000, eval_every=500)

    @classmethod
    def smoke(cls) -> Config:
        return cls(seeds=1, depth=4, steps=20, eval_every=10)


def grads(run: RunResult) -> np.ndarray:
    """(checkpoints, layers) weight-gradient norms."""
    return np.asarray([g["weight"] for g in run.probes["grad_norms"]])


def saturation(run: RunResult) -> np.ndarray:
    """(checkpoints, layers) fraction of saturated sigmoid inputs."""
    return np.asarray([s["fraction"] for s in run.probes["saturation"]])


def run(ctx: Context) -> ClaimResult:
    cfg = ctx.config()
    arms: dict[str, list[RunResult]] = {"bn": [], "no_bn": []}
    for seed in ctx.seeds():
        base = TrainSpec(widths=(cfg.width,) * cfg.depth, activation="sigmoid", lr=cfg.lr, batch_size=cfg.batch_size,
                         steps=cfg.steps, eval_every=cfg.eval_every, seed=seed, probes=("grad_norms", "saturation"))
        arms["bn"].append(ctx.train(replace(base, norm=cfg.norm)))
        arms["no_bn"].append(ctx.train(base))

    # geometric means over seeds of the per-layer gradient norms, at the first and last checkpoint
    g = {arm: {when: np.exp(np.mean([np.log(grads(r)[i]) for r in rs], axis=0)) for when, i in (("init", 0), ("end", -1))}
         for arm, rs in arms.items()}
    last_over_first = {arm: {when: float(v[-1] / v[0]) for when, v in d.items()} for arm, d in g.items()}
    spread = {arm: {when: float(v.max() / v.min()) for when, v in d.items()} for arm, d in g.items()}
    sat = {arm: float(np.mean([saturation(r)[-1].mean() for r in rs])) for arm, rs in arms.items()}
    sat_init = {arm: float(np.mean([saturation(r)[0].mean() for r in rs])) for arm, rs in arms.items()}
    accuracy = {arm: float(np.mean([r.final_test_accuracy for r in rs])) for arm, rs in arms.items()}

    vanishes = last_over_first["no_bn"]["init"] >= VANISHED
    bn_flat = spread["bn"]["init"] <= SMALL_FACTOR and spread["bn"]["end"] <= SMALL_FACTOR
    saturates = sat["no_bn"] > sat["bn"]
    verdict = decide(supported=vanishes and bn_flat and saturates,
                     refuted=spread["bn"]["init"] >= spread["no_bn"]["init"] or spread["bn"]["init"] > VANISHED)

    fig, axes = plots.new(ncols=2)
    layers = np.arange(1, cfg.depth + 1)
    for arm, label, color in (("bn", "BN", plots.BN_COLOR), ("no_bn", "no BN", plots.NO_BN_COLOR)):
        axes[0].plot(layers, g[arm]["init"], "o--", color=color, label=f"{label}, step 0")
        axes[0].plot(layers, g[arm]["end"], "o-", color=color, label=f"{label}, step {cfg.steps}")
        for when, i, style in (("step 0", 0, "o--"), (f"step {cfg.steps}", -1, "o-")):
            axes[1].plot(layers, np.mean([saturation(r)[i] for r in arms[arm]], axis=0), style, color=color,
                         label=f"{label}, {when}")
    axes[0].set(yscale="log", xlabel="hidden layer (1 = nearest the input)", ylabel="||dLoss/dW||",
                title=f"Weight gradient norm per layer ({cfg.depth}x{cfg.width} sigmoid)")
    axes[1].set(xlabel="hidden layer", ylabel=f"fraction with |sigmoid input| > {SATURATED:g}",
                title="Saturated sigmoid inputs per layer (held-out batch)")
    for ax in axes:
        ax.legend()
    ctx.save_figure(fig, "gradients")
    ctx.save_csv("per_layer", ["arm", "seed", "step", "layer", "grad_norm", "saturated_fraction"],
                 [(arm, r.spec["seed"], s, layer + 1, grads(r)[i, layer], saturation(r)[i, layer])
                  for arm, rs in arms.items() for r in rs for i, s in enumerate(r.eval_steps) for layer in range(cfg.depth)])

    summary = (f"Gradient norm of the last hidden layer over the first: {last_over_first['no_bn']['init']:.3g}x without BN, "
               f"{last_over_first['bn']['init']:.3g}x with BN at step 0; largest/smallest layer: without BN "
               f"{spread['no_bn']['init']:.3g}x (step 0), {spread['no_bn']['end']:.3g}x (step {cfg.steps}); with BN "
               f"{spread['bn']['init']:.3g}x, {spread['bn']['end']:.3g}x. Saturated sigmoid inputs at step {cfg.steps}: "
               f"{sat['no_bn']:.1%} without BN vs {sat['bn']:.1%} with"
               + (" (without BN the sigmoid inputs stay small: the gradients vanish without saturation)"
                  if vanishes and not saturates else "")
               + f". Test accuracy {accuracy['no_bn']:.1%} without BN vs {accuracy['bn']:.1%} with.")
    metrics = {
        "last_over_first_grad_no_bn_init": last_over_first["no_bn"]["init"],
        "last_over_first_grad_bn_init": last_over_first["bn"]["init"],
        "grad_spread_no_bn_init": spread["no_bn"]["init"],
        "grad_spread_no_bn_end": spread["no_bn"]["end"],
        "grad_spread_bn_init": spread["bn"]["init"],
        "grad_spread_bn_end": spread["bn"]["end"],
        "saturated_fraction_no_bn_init": sat_init["no_bn"],
        "saturated_fraction_bn_init": sat_init["bn"],
        "saturated_fraction_no_bn_end": sat["no_bn"],
        "saturated_fraction_bn_end": sat["bn"],
        "final_test_accuracy_no_bn": accuracy["no_bn"],
        "final_test_accuracy_bn": accuracy["bn"],
    }
    return ctx.result(verdict, summary, metrics)
