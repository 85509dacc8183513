"""C4 Scale invariance (Ioffe & Szegedy 2015, Sec. 3.3).

Claim: BN(aWu) = BN(Wu) for a scalar a > 0, and d BN((aW)u) / d(aW) = (1/a) d BN(Wu) / dW:
scaling a layer's weights changes neither its output nor the gradient's effect on it,
and larger weights get smaller gradients (a stabilising effect).

Here: u is a real batch (the s-th block of 60 training examples), W a seed-s Linear
weight with 100 outputs, L = sum(R * BN(Wu)) with a fixed random R. The property is exact for eps = 0:
checked in float64 with eps = 1e-300 (``EXACT_EPS``), which float64 cannot tell from 0. With the
default eps = 1e-5 in float32 it holds up to eps / (a^2 var(Wu)): those errors are reported too
(the figure shows both).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import plots
from ..experiment import ClaimResult, Condition, Context, Profiles
from ..models import make_norm

ID = "C4"
TITLE = "BN is invariant to the scale of the weights"
CLAIM = (
    "BN(aWu) = BN(Wu) and d BN((aW)u)/d(aW) = (1/a) d BN(Wu)/dW for any scalar a > 0 "
    "(Ioffe & Szegedy 2015, Sec. 3.3): the scale of a layer's weights does not change its "
    "output, and larger weights get proportionally smaller gradients."
)
#: The float64 run's eps. The property is exact for eps = 0, which BN layers refuse in training
#: (torch.nn and batchnorm: "eps must be positive during training"). 1e-300 is positive but
#: invisible to float64: var + 1e-300 == var exactly for every var above ~1e-284 (1e-300 is less
#: than half an ulp), and the batch variances here are above 1e-12 (the smallest scale, 1e-3,
#: squared, times var(Wu)), so every operation is bit for bit the eps = 0 one
#: (tests/test_lab_models.py checks var + EXACT_EPS == var on these batches).
EXACT_EPS = 1e-300
EXPECTATION = (
    "With eps = 1e-300 in float64 (exactly eps = 0 to float64: var + eps == var), for every "
    "scale a tested, the output and a times the weight gradient differ from those at a = 1 by at most 1e-10 relative to their size."
)
TOLERANCE = 1e-10
CONDITIONS = (
    Condition("float64", "largest relative difference of output and a x gradient from a = 1 (float64, eps = 1e-300)", "<",
              TOLERANCE, "exact in real arithmetic; float64 rounding over 60-example sums is about 1e-15, so 1e-10 "
              "only fails if the property does", check=True),
)
PAPER = (("BN(aWu) = BN(Wu); a dL/d(aW) = dL/dW", "exact (algebra)"),)


@dataclass(frozen=True)
class Config(Profiles):
    seeds: int = 1
    scales: tuple[float, ...] = (1e-3, 1e-2, 0.1, 0.5, 2.0, 10.0, 100.0, 1e3)
    batch_size: int = 60
    channels: int = 100
    norm: str = "ours"

    FULL = dict(seeds=5)


def output_and_grad(bn: nn.Module, w: torch.Tensor, u: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BN(u W^T) and the gradient of sum(r * BN(u W^T)) with respect to W."""
    w = w.detach().requires_grad_(True)
    y = bn(u @ w.T)
    (grad,) = torch.autograd.grad((r * y).sum(), w)
    return y.detach(), grad


def errors(cfg: Config, u: torch.Tensor, w: torch.Tensor, r: torch.Tensor, dtype: torch.dtype, eps: float) -> list[dict]:
    """Relative output and gradient errors for each scale, in ``dtype`` with ``eps``."""
    bn = make_norm(cfg.norm, cfg.channels, eps=eps, affine=False).to(dtype).train()
    u, w, r = u.to(dtype), w.to(dtype), r.to(dtype)
    y1, g1 = output_and_grad(bn, w, u, r)
    out = []
    for a in cfg.scales:
        ya, ga = output_and_grad(bn, a * w, u, r)
        out.append({"scale": a,
                    "output": float((ya - y1).abs().max() / y1.abs().max()),
                    "gradient": float((a * ga - g1).abs().max() / g1.abs().max())})
    return out


def worst(rows_per_seed: list[list[dict]]) -> list[dict]:
    """Per scale, the largest errors over the seeds."""
    return [{"scale": rows[0]["scale"], "output": max(r["output"] for r in rows), "gradient": max(r["gradient"] for r in rows)}
            for rows in zip(*rows_per_seed)]


def run(ctx: Context) -> ClaimResult:
    cfg = ctx.config()
    exact_runs, practical_runs = [], []
    for seed in ctx.seeds():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            w = nn.Linear(ctx.data.n_features, cfg.channels).weight.detach()
            r = torch.randn(cfg.batch_size, cfg.channels)
        u = ctx.data.x_train[seed * cfg.batch_size : (seed + 1) * cfg.batch_size]
        exact_runs.append(errors(cfg, u, w, r, torch.float64, eps=EXACT_EPS))
        practical_runs.append(errors(cfg, u, w, r, torch.float32, eps=1e-5))
    exact, practical = worst(exact_runs), worst(practical_runs)
    worst64 = max(max(e["output"], e["gradient"]) for e in exact)

    fig, (ax,) = plots.new()
    for rows, label, style in ((exact, "float64, eps = 1e-300", "-"), (practical, "float32, eps = 1e-5", "--")):
        scales = [e["scale"] for e in rows]
        ax.plot(scales, [max(e["output"], 1e-18) for e in rows], "o" + style, label=f"output, {label}")
        ax.plot(scales, [max(e["gradient"], 1e-18) for e in rows], "s" + style, label=f"a x gradient, {label}")
    ax.axhline(TOLERANCE, color="gray", linestyle=":", label="tolerance (float64)")
    ax.set(xscale="log", yscale="log", xlabel="weight scale a (exact zeros drawn at 1e-18)",
           ylabel="max relative difference from a = 1 (worst seed)",
           title="BN(aWu) vs BN(Wu), and a dL/d(aW) vs dL/dW")
    ax.legend(fontsize="small")
    ctx.save_figure(fig, "scale", "Relative difference from a = 1 for each weight scale a; float64 with eps = 1e-300 (0 to float64) should sit far below the dotted tolerance, float32 with eps = 1e-5 shows the eps term at small a.")
    ctx.save_csv("errors", ["dtype", "eps", "scale", "output_error", "gradient_error"],
                 [(dt, eps, e["scale"], e["output"], e["gradient"])
                  for dt, eps, rows in (("float64", EXACT_EPS, exact), ("float32", 1e-5, practical)) for e in rows])

    worst32 = max(max(e["output"], e["gradient"]) for e in practical)
    summary = (f"Scales a from {min(cfg.scales):g} to {max(cfg.scales):g}: largest relative difference {worst64:.1e} "
               f"(float64, eps = 1e-300, which float64 cannot tell from 0); {worst32:.1e} in float32 with eps = 1e-5, the eps term showing at small a.")
    # the keys keep their names: "eps0" is the float64 run, eps = 0 as float64 computes it
    metrics = {"max_relative_error_float64_eps0": worst64, "max_relative_error_float32_eps1e-5": worst32,
               "float64_eps0": exact, "float32_eps1e-5": practical, "tolerance": TOLERANCE}
    here = (f"largest relative difference {worst64:.1e} (float64, eps = 1e-300), {worst32:.1e} (float32, eps = 1e-5)",)
    return ctx.result(summary, metrics, {"float64": worst64}, here)
