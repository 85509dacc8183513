"""C6 Noisy BN (Santurkar et al. 2018, "How Does Batch Normalization Help Optimization?", Fig. 2).

Paper: after every BN layer of a VGG on CIFAR-10, add noise that changes at every step
(per unit: mu ~ U(-0.5, 0.5), nu ~ U(1, 1.25); per sample: m ~ U(mu +- 0.1),
s ~ N(nu, 0.1); output s * BN(x) + m). The input distributions become *less* stable
than without BN, yet the noisy network trains about as well as the BN one: BN 83% vs
no BN 80% test accuracy, noisy BN close to BN. A small MLP pilot did not reproduce it.

Here: C1's two networks and configuration (the 3x100 sigmoid MLP, SGD lr 0.5, and the
conv net on images; the BN and no-BN runs are C1's, from the run store) with a third
arm, noisy BN (``lab.noisy``; in the conv net the noise is per sample and channel), same
initial weights and batches per seed. Besides the accuracy, the instability of the
distribution: C2's scale-free drift of the last-hidden-layer sigmoid inputs of the MLP,
measured in training mode (for the noisy network: with its noise, as the next layer
sees it); reported, not judged.

Rule history: until the eighth session the rule compared means of 1-3 seeds (noisy
within 3 points of BN, both above no BN), with its own, shorter configuration. Now:
C1's configuration, per-seed differences with 95% intervals, and the conv net.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .. import plots
from ..experiment import ClaimResult, Condition, Context
from ..measure import checkpoint_matrix
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
    "For the MLP and the conv net, the noisy-BN network's final test accuracy is within 3 points of "
    "the BN network's and above the no-BN network's, per seed."
)
CLOSE = 0.03
CONDITIONS = (
    Condition("mlp_close", "MLP: final test accuracy, noisy BN minus BN", "within", CLOSE,
              "'about as well': closer than the paper's BN vs no-BN gap (3 points), which it calls a difference"),
    Condition("mlp_above", "MLP: final test accuracy, noisy BN minus no BN", ">", 0.0,
              "the noisy network keeps BN's advantage: a positive gap"),
    Condition("conv_close", "conv net: final test accuracy, noisy BN minus BN", "within", CLOSE, "as for the MLP"),
    Condition("conv_above", "conv net: final test accuracy, noisy BN minus no BN", ">", 0.0, "as for the MLP"),
)
PAPER = (("VGG on CIFAR-10, test accuracy BN / noisy BN / no BN", "83% / close to BN / 80%"),)
ARMS = (("bn", "BN", plots.BN_COLOR), ("noisy", "noisy BN", "tab:purple"), ("no_bn", "no BN", plots.NO_BN_COLOR))
Config = c1_training.Config  # C1's runs are the BN and no-BN arms


def run(ctx: Context) -> ClaimResult:
    cfg = ctx.config()
    nets: dict[str, dict[str, list[RunResult]]] = {"mlp": {a: [] for a, _, _ in ARMS}, "conv": {a: [] for a, _, _ in ARMS}}
    for seed in ctx.seeds():
        for net, specs, data in (("mlp", c1_training.specs(cfg, seed), ctx.data),
                                 ("conv", c1_training.conv_specs(cfg, seed), ctx.images())):
            specs["noisy"] = replace(specs["bn"], norm="noisy")
            for arm, _, _ in ARMS:
                nets[net][arm].append(ctx.train(specs[arm], data))
    final = {net: {arm: np.asarray([r.final_test_accuracy for r in rs]) for arm, rs in arms.items()}
             for net, arms in nets.items()}
    measured = {}
    for net in nets:
        measured[f"{net}_close"] = final[net]["noisy"] - final[net]["bn"]
        measured[f"{net}_above"] = final[net]["noisy"] - final[net]["no_bn"]
    movement = {arm: float(np.mean([c2_distribution.drift(r)[0] for r in rs])) for arm, rs in nets["mlp"].items()}

    fig, axes = plots.new(ncols=3, width=4.6)
    for ax, (net, title) in zip(axes[:2], (("mlp", "3x100 sigmoid MLP"), ("conv", f"conv net, {ctx.images().name}"))):
        for arm, label, color in ARMS:
            steps, a = checkpoint_matrix(nets[net][arm])
            plots.mean_band(ax, steps, a, label, color)
        ax.set(xlabel="training step", ylabel="test accuracy", title=f"{title}: test accuracy")
        ax.legend()
    for arm, label, color in ARMS:
        r = nets["mlp"][arm][0]
        p = c2_distribution.percentiles(r)
        axes[2].plot(r.eval_steps, p[:, 1, 0], color=color, label=f"{label}: median")
        axes[2].fill_between(r.eval_steps, p[:, 0, 0], p[:, 2, 0], color=color, alpha=0.15, linewidth=0)
    axes[2].set(xlabel="training step", ylabel="sigmoid input (train mode)",
                title="MLP, last hidden layer, unit 0 (seed 0): median, 15-85% band")
    axes[2].legend()
    ctx.save_figure(fig, "noisy_bn", "Left and middle: test accuracy of BN, noisy BN and no BN (mean, min-max band over "
                    "seeds); the purple curve should track the blue one. Right: the noisy network's sigmoid input moves "
                    "more than BN's (the instability the claim injects).")
    ctx.save_csv("final", ["net", "arm", "seed", "final_test_accuracy"],
                 [(net, arm, r.spec["seed"], r.final_test_accuracy) for net, arms in nets.items()
                  for arm, rs in arms.items() for r in rs])

    mean = {net: {arm: float(v.mean()) for arm, v in f.items()} for net, f in final.items()}
    summary = "; ".join(
        f"{label}: BN {mean[net]['bn']:.1%}, noisy BN {mean[net]['noisy']:.1%}, no BN {mean[net]['no_bn']:.1%}"
        for net, label in (("mlp", f"MLP, {cfg.steps} steps"), ("conv", f"conv net on {ctx.images().name}, {cfg.conv_steps} steps"))
    ) + (f" (final test accuracy, means of {len(ctx.seeds())} seeds). MLP drift of a last-layer sigmoid input's median "
         f"(in 15-85% widths): noisy BN {movement['noisy']:.2f}, BN {movement['bn']:.2f}, no BN {movement['no_bn']:.2f}.")
    metrics = {"final_test_accuracy": {net: {arm: v.tolist() for arm, v in f.items()} for net, f in final.items()},
               "net_drift_mlp": movement,
               "diverged_runs": sum(r.diverged_at is not None for arms in nets.values() for rs in arms.values() for r in rs)}
    here = (f"conv net on {ctx.images().name}: {mean['conv']['bn']:.1%} / {mean['conv']['noisy']:.1%} / "
            f"{mean['conv']['no_bn']:.1%}; MLP: {mean['mlp']['bn']:.1%} / {mean['mlp']['noisy']:.1%} / {mean['mlp']['no_bn']:.1%}",)
    return ctx.result(summary, metrics, measured, here)
