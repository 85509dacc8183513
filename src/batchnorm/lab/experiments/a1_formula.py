"""A1 The formula (Ioffe & Szegedy 2015, Algorithm 1).

Per channel, over the mini-batch: x_hat = (x - mean_B) / sqrt(var_B + eps) with the
biased variance, then y = gamma * x_hat + beta.

Here, on a real batch: the first hidden layer's pre-activations (a Linear layer with
seed-s weights applied to the s-th block of 60 training examples, 100 channels). The
formula is computed step by step in float64; the BN module (float32, training mode) is
checked against its properties and its output.
After normalising, each channel has mean 0 and variance var_B / (var_B + eps), which is
1 up to eps / var_B; after the affine step, mean beta and standard deviation |gamma| times that.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .. import plots
from ..experiment import ClaimResult, Condition, Context, Profiles
from ..models import make_norm

ID = "A1"
TITLE = "The BN formula, step by step on a real batch"
CLAIM = (
    "BN normalises each channel over the mini-batch, x_hat = (x - mean_B) / sqrt(var_B + eps), "
    "then scales and shifts it, y = gamma * x_hat + beta (Ioffe & Szegedy 2015, Algorithm 1)."
)
EXPECTATION = (
    "After normalising, every channel has mean 0 and variance var_B / (var_B + eps) (= 1 up to "
    "eps / var_B), after the affine step mean beta and standard deviation |gamma| times the same "
    "factor, all within 1e-5; the BN module's output equals the float64 step-by-step formula within 1e-5."
)
TOLERANCE = 1e-5
CONDITIONS = (
    Condition("max_error", "largest error of the normalised and affine moments and of the module vs the float64 formula",
              "<", TOLERANCE, "float32 arithmetic on 60 values per channel is accurate to about 1e-6; 1e-5 leaves room "
              "for the sums and no room for a wrong formula (biased vs unbiased variance differs by 1/60)", check=True),
)
PAPER = (("Algorithm 1: normalised mean / variance; output mean / std", "0 / 1; beta / gamma"),)


@dataclass(frozen=True)
class Config(Profiles):
    seeds: int = 1
    batch_size: int = 60
    channels: int = 100
    eps: float = 1e-5
    norm: str = "ours"

    FULL = dict(seeds=5)


def batch(ctx: Context, cfg: Config, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seed ``seed``'s batch of pre-activations (batch, channels) float32, and a random gamma and beta."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        linear = nn.Linear(ctx.data.n_features, cfg.channels)
    with torch.no_grad():
        x = linear(ctx.data.x_train[seed * cfg.batch_size : (seed + 1) * cfg.batch_size])
    gen = torch.Generator().manual_seed(seed)
    gamma = torch.empty(cfg.channels).uniform_(0.5, 2.0, generator=gen)
    return x, gamma, torch.randn(cfg.channels, generator=gen)


def formula(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> dict[str, torch.Tensor]:
    """Algorithm 1 step by step in float64: mean_B, var_B, x_hat, y."""
    x, gamma, beta = x.double(), gamma.double(), beta.double()
    mean_b = x.mean(dim=0)
    var_b = ((x - mean_b) ** 2).mean(dim=0)
    x_hat = (x - mean_b) / torch.sqrt(var_b + eps)
    return {"x": x, "mean_b": mean_b, "var_b": var_b, "x_hat": x_hat, "y": gamma * x_hat + beta}


def check(cfg: Config, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> dict[str, float]:
    """Largest errors of the BN module (float32, training mode) against the formula's properties."""
    ref = formula(x, gamma, beta, cfg.eps)
    factor = ref["var_b"] / (ref["var_b"] + cfg.eps)
    plain = make_norm(cfg.norm, cfg.channels, eps=cfg.eps, affine=False).train()
    affine = make_norm(cfg.norm, cfg.channels, eps=cfg.eps).train()
    with torch.no_grad():
        affine.weight.copy_(gamma)
        affine.bias.copy_(beta)
        x_hat, y = plain(x).double(), affine(x).double()

    def err(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max())

    return {
        "normalised_mean": err(x_hat.mean(dim=0), torch.zeros_like(factor)),
        "normalised_variance": err(x_hat.var(dim=0, unbiased=False), factor),
        "output_mean": err(y.mean(dim=0), beta.double()),
        "output_std": err(y.std(dim=0, unbiased=False), gamma.double().abs() * factor.sqrt()),
        "module_vs_formula": err(y, ref["y"]),
        "variance_minus_1": err(factor, torch.ones_like(factor)),
    }


def run(ctx: Context) -> ClaimResult:
    cfg = ctx.config()
    per_seed = [check(cfg, *batch(ctx, cfg, seed)) for seed in ctx.seeds()]
    checks = {k: max(c[k] for c in per_seed) for k in per_seed[0]}
    var_minus_1 = checks.pop("variance_minus_1")

    x, gamma, beta = batch(ctx, cfg, ctx.seeds()[0])
    ref = formula(x, gamma, beta, cfg.eps)
    x64, x_hat, y, g64, b64 = ref["x"], ref["x_hat"], ref["y"], gamma.double(), beta.double()
    shown = np.arange(min(16, cfg.channels))
    fig, (left, right) = plots.new(ncols=2)
    width = 0.27
    series = (("x (pre-activation)", x64), ("x_hat (normalised)", x_hat), ("y = gamma x_hat + beta", y))
    for k, (label, t) in enumerate(series):
        left.bar(shown + (k - 1) * width, t.mean(dim=0)[shown].numpy(), width, label=label)
        right.bar(shown + (k - 1) * width, t.std(dim=0, unbiased=False)[shown].numpy(), width, label=label)
    left.plot(shown, b64[shown].numpy(), "k_", markersize=12, label="beta")
    right.plot(shown, g64[shown].numpy(), "k_", markersize=12, label="gamma")
    left.set(xlabel="channel", ylabel="mean over the batch", title=f"Per-channel mean, batch of {cfg.batch_size}")
    right.set(xlabel="channel", ylabel="standard deviation over the batch", title="Per-channel standard deviation")
    left.legend(fontsize="small")
    right.legend(fontsize="small")
    ctx.save_figure(fig, "channels", "Per channel, the mean and standard deviation of the input, of x_hat and of y; x_hat's should sit at 0 and 1, y's on the black marks (beta, gamma).")
    ctx.save_csv("channels_seed0", ["channel", "mean_x", "var_x", "mean_x_hat", "var_x_hat", "gamma", "beta", "mean_y", "std_y"],
                 [(c, float(ref["mean_b"][c]), float(ref["var_b"][c]), float(x_hat[:, c].mean()), float(x_hat[:, c].var(unbiased=False)),
                   float(g64[c]), float(b64[c]), float(y[:, c].mean()), float(y[:, c].std(unbiased=False)))
                  for c in range(cfg.channels)])

    module = type(make_norm(cfg.norm, cfg.channels))
    name = f"{module.__module__}.{module.__name__}"
    summary = (f"{len(ctx.seeds())} batch(es) of {cfg.batch_size} examples x {cfg.channels} channels, BN module {name} "
               f"in float32: normalised means within {checks['normalised_mean']:.1e} of 0, variances within "
               f"{checks['normalised_variance']:.1e} of var_B/(var_B+eps) (|variance - 1| up to {var_minus_1:.1e}, from eps); "
               f"after the affine step means within {checks['output_mean']:.1e} of beta and standard deviations within "
               f"{checks['output_std']:.1e} of |gamma|; output within {checks['module_vs_formula']:.1e} of the float64 formula.")
    metrics = {**{f"max_error_{k}": v for k, v in checks.items()},
               "max_abs_variance_minus_1": var_minus_1, "tolerance": TOLERANCE, "module": name}
    here = (f"within {checks['normalised_mean']:.1e} of 0, {checks['normalised_variance']:.1e} of var_B/(var_B+eps); "
            f"within {checks['output_mean']:.1e} of beta, {checks['output_std']:.1e} of |gamma|",)
    return ctx.result(summary, metrics, {"max_error": max(checks.values())}, here)
