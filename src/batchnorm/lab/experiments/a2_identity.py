"""A2 Identity recovery (Ioffe & Szegedy 2015, Sec. 3).

Claim: BN can represent the identity. "If the best distribution is unnormalised, gamma
and beta converge to sqrt(Var[x]) and E[x] and the original x is returned."

Here, x is a real layer's output: the sigmoid activations of a Linear layer with seed-0
weights applied to the data (100 channels). (1) Exactly: with gamma = sqrt(var_B + eps)
and beta = mean_B the BN module returns its input. (2) By learning: a BN layer starting
from gamma = 1, beta = 0 is trained by SGD on batches of the training set to reproduce
its input (loss: squared error summed over channels, mean over the batch); gamma and
beta are compared with sqrt(Var[x]) and E[x] over the whole training set. With batch
statistics the best gamma is E[std_B], a little below the population value (about
3/(4 batch) relative), so the comparison allows 5%.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .. import plots
from ..experiment import ClaimResult, Condition, Context, Profiles
from ..models import make_norm

ID = "A2"
TITLE = "BN can recover the identity"
CLAIM = (
    "BN can represent the identity transform: with gamma = sqrt(Var[x]) and beta = E[x] it "
    "returns the original x, and when that is what the network needs, gamma and beta "
    "converge there (Ioffe & Szegedy 2015, Sec. 3)."
)
EXPECTATION = (
    "With gamma = sqrt(var_B + eps) and beta = mean_B the BN output equals its input within "
    "1e-5 (float32); trained by SGD to reproduce its input, gamma ends within 5% of sqrt(Var[x]) "
    "and beta within 5% of sqrt(Var[x]) from E[x] (mean over channels)."
)
EXACT_TOLERANCE, LEARNED_TOLERANCE = 1e-5, 0.05
CONDITIONS = (
    Condition("exact", "largest |BN(x) - x| with gamma = sqrt(var_B + eps), beta = mean_B (float32)", "<", EXACT_TOLERANCE,
              "exact in real arithmetic; float32 rounding of activations in (0, 1) is about 1e-7", check=True),
    Condition("gamma", "learned gamma's mean relative distance from sqrt(Var[x])", "<", LEARNED_TOLERANCE,
              "with batch statistics the best gamma is E[std_B], about 3/(4 batch) below the population value; 5% "
              "leaves room for that and for SGD's noise, not for a gamma that does not converge", check=True),
    Condition("beta", "learned beta's mean distance from E[x], in units of sqrt(Var[x])", "<", LEARNED_TOLERANCE,
              "as for gamma", check=True),
)
PAPER = (("Sec. 3: gamma, beta after learning the identity", "sqrt(Var[x]), E[x]"),)


@dataclass(frozen=True)
class Config(Profiles):
    seeds: int = 1
    channels: int = 100
    batch_size: int = 60
    steps: int = 600
    lr: float = 0.01
    norm: str = "ours"

    FULL = dict(seeds=5, steps=3000)
    SMOKE = dict(steps=20)


def features(ctx: Context, channels: int) -> torch.Tensor:
    """Sigmoid activations of a seed-0 Linear layer on the training set: (examples, channels)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        linear = nn.Linear(ctx.data.n_features, channels)
    with torch.no_grad():
        return torch.sigmoid(linear(ctx.data.x_train))


def fit(x: torch.Tensor, cfg: Config, seed: int) -> tuple[nn.Module, list[float]]:
    """Train a fresh BN layer's gamma and beta by SGD to reproduce its input; returns it and the losses."""
    bn = make_norm(cfg.norm, cfg.channels).train()
    optimizer = torch.optim.SGD(bn.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(cfg.steps):
        batch = x[torch.randint(len(x), (cfg.batch_size,), generator=gen)]
        loss = ((bn(batch) - batch) ** 2).mean(dim=0).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return bn, losses


def run(ctx: Context) -> ClaimResult:
    cfg = ctx.config()
    x = features(ctx, cfg.channels)
    batch = x[: cfg.batch_size]

    exact = make_norm(cfg.norm, cfg.channels).train()
    with torch.no_grad():
        exact.weight.copy_(torch.sqrt(batch.var(dim=0, unbiased=False) + exact.eps))
        exact.bias.copy_(batch.mean(dim=0))
        exact_error = float((exact(batch) - batch).abs().max())

    mean, std = x.double().mean(dim=0), x.double().std(dim=0)
    fits = [fit(x, cfg, seed) for seed in ctx.seeds()]
    gamma = np.asarray([bn.weight.detach().double().numpy() for bn, _ in fits])
    beta = np.asarray([bn.bias.detach().double().numpy() for bn, _ in fits])
    gamma_error = float(np.mean(np.abs(gamma - std.numpy()) / std.numpy()))
    beta_error = float(np.mean(np.abs(beta - mean.numpy()) / std.numpy()))

    fig, axes = plots.new(ncols=3, width=4.6)
    axes[0].scatter(std.numpy(), gamma[0], s=12)
    axes[0].set(xlabel="sqrt(Var[x]) over the training set", ylabel="learned gamma", title="gamma -> sqrt(Var[x])")
    axes[1].scatter(mean.numpy(), beta[0], s=12)
    axes[1].set(xlabel="E[x] over the training set", ylabel="learned beta", title="beta -> E[x]")
    for ax, values in ((axes[0], std.numpy()), (axes[1], mean.numpy())):
        ax.plot([values.min(), values.max()], [values.min(), values.max()], "k--", linewidth=1, label="y = x")
        ax.legend()
    for _, losses in fits:
        axes[2].plot(np.arange(1, cfg.steps + 1), losses, linewidth=0.8)
    axes[2].set(yscale="log", xlabel="SGD step", ylabel="||BN(x) - x||^2 per example", title="Reconstruction loss")
    ctx.save_figure(fig, "identity", "Learned gamma and beta (seed 0) against the training set's sqrt(Var[x]) and E[x]: points on the dashed line mean the identity was recovered; right: the reconstruction loss of every seed.")
    ctx.save_csv("learned", ["seed", "channel", "gamma", "sqrt_var_x", "beta", "mean_x"],
                 [(seed, c, gamma[i, c], float(std[c]), beta[i, c], float(mean[c]))
                  for i, seed in enumerate(ctx.seeds()) for c in range(cfg.channels)])

    summary = (f"With gamma = sqrt(var_B + eps), beta = mean_B the output equals the input within {exact_error:.1e}; "
               f"after {cfg.steps} SGD steps gamma is within {gamma_error:.1%} of sqrt(Var[x]) and beta within "
               f"{beta_error:.1%} (of sqrt(Var[x])) of E[x], mean over {cfg.channels} channels; reconstruction loss "
               f"{np.mean([f[1][0] for f in fits]):.3g} -> {np.mean([f[1][-1] for f in fits]):.3g}.")
    metrics = {
        "exact_identity_max_error": exact_error,
        "learned_gamma_relative_error": gamma_error,
        "learned_beta_relative_error": beta_error,
        "initial_loss": float(np.mean([f[1][0] for f in fits])),
        "final_loss": float(np.mean([f[1][-1] for f in fits])),
        "x_variance_sum": float((std**2).sum()),
    }
    here = (f"gamma within {gamma_error:.1%} of sqrt(Var[x]), beta within {beta_error:.1%}; exact identity within {exact_error:.1e}",)
    return ctx.result(summary, metrics, {"exact": exact_error, "gamma": gamma_error, "beta": beta_error}, here)
