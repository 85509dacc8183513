"""Catch the common misuses of BN: ``diagnose`` inspects a model (and optionally runs it
on data) and returns a readable report; ``watch`` installs hooks that warn while it runs.

What is checked, for torch.nn's and batchnorm's layers alike (finding kinds):
- ``eval_in_train_mode``: a forward without gradients (evaluation, usually) while BN is in
  training mode: outputs depend on the batch and the running statistics drift to the
  evaluation data. Usually a forgotten ``model.eval()``. (hooks)
- ``never_updated``: ``num_batches_tracked == 0``, so evaluation would normalise with
  the initial statistics (mean 0, variance 1).
- ``batch_of_one``: a training batch with one sample: its statistics are those of one
  example (or an error, with no spatial axes). (hooks)
- ``train_eval_gap``: in eval mode the input's statistics are far from the running ones
  (domain shift, stale statistics after training or fine-tuning: see ``recalibrate``).
- ``non_finite``: NaN/Inf running statistics (an overflow reached them).
- ``dead_channels``: channels with ``|gamma| <= dead_tol``: they output beta only.

The gap test per channel: ``|mean_x - running_mean| / sqrt(running_var + eps)`` above
``gap_tol``, or ``var_x / running_var`` outside ``[1/(1+gap_tol), 1+gap_tol]``, each
threshold widened by three standard errors of the estimate from ``n`` values
(``3/sqrt(n)`` and ``3*sqrt(2/(n-1))`` in log-ratio), so small batches do not raise alarms
by chance. It is a heuristic: a warning, not a proof.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core import stats
from . import _data
from .find_layers import InputMoments, batchnorm_layers, tracks_running_stats
from ..core.modules import in_backward
from ..core.stats import Moments


class BNMisuseWarning(UserWarning):
    """A likely misuse of a batch-norm layer (see ``batchnorm.diagnostics``)."""


@dataclass
class Finding:
    layer: str
    kind: str  # one of the kinds in the module docstring
    message: str


@dataclass
class LayerRow:
    """One BN layer as ``diagnose`` saw it (gap columns None without data)."""

    name: str
    type: str
    mode: str  # "train" or "eval"
    channels: int
    batches_tracked: int | None
    dead: list[int]
    mean_shift: float | None = None  # worst channel, in running standard deviations
    var_ratio: float | None = None  # the channel's var / running var furthest from 1
    kinds: list[str] = field(default_factory=list)


@dataclass
class Diagnosis:
    """``diagnose``'s result: a row per BN layer and the list of findings. ``str()``
    gives a plain-text table; rich renders it as a table too (``rich.print(d)``)."""

    rows: list[LayerRow]
    findings: list[Finding]

    @property
    def ok(self) -> bool:
        return not self.findings

    def kinds(self) -> set[str]:
        return {f.kind for f in self.findings}

    def _cells(self) -> tuple[list[str], list[list[str]]]:
        head = ["layer", "type", "mode", "C", "batches", "dead", "mean shift", "var ratio",
                "issues"]

        def num(v: float | None, fmt: str) -> str:
            return "-" if v is None else format(v, fmt)

        body = [[r.name, r.type, r.mode, str(r.channels),
                 "-" if r.batches_tracked is None else str(r.batches_tracked),
                 str(len(r.dead)), num(r.mean_shift, ".3f"), num(r.var_ratio, ".3f"),
                 ", ".join(r.kinds) or "ok"] for r in self.rows]
        return head, body

    def __str__(self) -> str:
        head, body = self._cells()
        widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                 for row in [head, *body]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        summary = (f"{len(self.rows)} BN layer(s), {len(self.findings)} finding(s)"
                   if self.rows else "no BN layer found")
        return "\n".join([*lines, summary, *(f"- {f.layer}: {f.message}" for f in self.findings)])

    def __rich__(self):
        from rich.console import Group
        from rich.table import Table

        head, body = self._cells()
        table = Table(*head, title="BatchNorm diagnosis")
        for row in body:
            table.add_row(*row, style=None if row[-1] == "ok" else "yellow")
        return Group(table, *(f"[yellow]- {f.layer}[/]: {f.message}" for f in self.findings))


def _gap(m: Moments, bn: nn.Module, gap_tol: float) -> tuple[float, float, bool]:
    """(worst mean shift, var ratio furthest from 1, whether either is beyond threshold)."""
    n = float(m.count[0])
    std = torch.sqrt(bn.running_var.double() + bn.eps)
    shift = (m.mean - bn.running_mean.double()).abs() / std
    log_ratio = torch.log((m.var + bn.eps) / (bn.running_var.double() + bn.eps))
    worst = int(log_ratio.abs().argmax())
    far = bool((shift > gap_tol + 3 / math.sqrt(n)).any())
    if n > 1:
        far |= bool((log_ratio.abs() > math.log1p(gap_tol) + 3 * math.sqrt(2 / (n - 1))).any())
    return float(shift.max()), float(log_ratio[worst].exp()), far


def _gap_message(shift: float, ratio: float) -> str:
    return (f"input statistics far from the running ones (mean shift up to {shift:.2f} "
            f"running std, variance ratio {ratio:.2f}): a domain shift or stale statistics; "
            "consider batchnorm.recalibrate or batchnorm.adapt")


def _static_findings(name: str, m: nn.Module, dead_tol: float) -> tuple[list[Finding], list[int]]:
    found = []
    if tracks_running_stats(m):
        if int(m.num_batches_tracked) == 0:
            initial = bool((m.running_mean == 0).all() and (m.running_var == 1).all())
            found.append(Finding(name, "never_updated", (
                "num_batches_tracked is 0: running statistics were never updated"
                + (" (still mean 0, variance 1)" if initial else "")
                + "; in eval mode it normalises with them")))
        if not (torch.isfinite(m.running_mean).all() and torch.isfinite(m.running_var).all()):
            found.append(Finding(name, "non_finite", "running statistics contain NaN/Inf"))
    dead = []
    if m.weight is not None:
        dead = (m.weight.detach().abs() <= dead_tol).nonzero().flatten().tolist()
        if dead:
            found.append(Finding(name, "dead_channels", (
                f"{len(dead)} channel(s) with |gamma| <= {dead_tol:g}: "
                f"{dead[:10]}{' ...' if len(dead) > 10 else ''}")))
    return found, dead


@torch.no_grad()
def diagnose(
    model: nn.Module,
    data: Iterable | None = None,
    *,
    num_samples: int | None = None,
    dead_tol: float = 1e-3,
    gap_tol: float = 0.5,
    progress: bool = False,
) -> Diagnosis:
    """Inspect every BN layer of ``model`` and report likely misuse.

    Without ``data`` it checks the state: statistics never updated, non-finite
    statistics, dead channels. With ``data`` (batches, or ``(input, ...)`` tuples, e.g.
    evaluation data) it also runs the model in eval mode, without gradients and without
    changing anything, pools every layer's input statistics exactly, and compares them
    with the running statistics (the train/eval gap; see the module docstring). Modes
    are restored afterwards.

    Args:
        num_samples: with data, use whole batches until at least this many samples.
        dead_tol: a channel is dead when ``|gamma| <= dead_tol``.
        gap_tol: the train/eval gap threshold (mean shift in running standard
            deviations; variance ratio within ``[1/(1+gap_tol), 1+gap_tol]``).
        progress: show a progress line while running over ``data``.

    Returns a ``Diagnosis``: ``print(d)`` shows a table, ``d.findings`` lists the findings.
    """
    layers = batchnorm_layers(model)
    rows, findings = [], []
    pooled: dict[str, Moments] = {}
    if data is not None and layers:
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        device = next((t.device for t in model.buffers()), torch.device("cpu"))
        try:
            with InputMoments(layers) as recorder:
                for x in _data.inputs(data, device, num_samples, "diagnose", progress):
                    model(x)
        finally:
            for m, training in modes:
                m.training = training
        pooled = recorder.moments
    for name, m in layers:
        found, dead = _static_findings(name, m, dead_tol)
        row = LayerRow(name, type(m).__name__, "train" if m.training else "eval",
                       m.num_features,
                       int(m.num_batches_tracked) if tracks_running_stats(m) else None, dead)
        if name in pooled and tracks_running_stats(m) and int(m.num_batches_tracked) > 0:
            row.mean_shift, row.var_ratio, far = _gap(pooled[name], m, gap_tol)
            if far:
                found.append(Finding(name, "train_eval_gap",
                                     _gap_message(row.mean_shift, row.var_ratio)))
        row.kinds = [f.kind for f in found]
        rows.append(row)
        findings += found
    return Diagnosis(rows, findings)


class WatchHandle:
    """The hooks ``watch`` installed. ``findings``: what they warned about (each layer and
    kind once); ``remove()`` takes the hooks off."""

    def __init__(self) -> None:
        self.findings: list[Finding] = []
        self._handles: list = []
        self._seen: set[tuple[str, str]] = set()

    def _warn(self, layer: str, kind: str, message: str) -> None:
        if (layer, kind) in self._seen:
            return
        self._seen.add((layer, kind))
        self.findings.append(Finding(layer, kind, message))
        warnings.warn(f"{layer}: {message}", BNMisuseWarning, stacklevel=4)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _check_call(handle: WatchHandle, name: str, m: nn.Module, x: torch.Tensor,
                gap_tol: float) -> None:
    tracking = tracks_running_stats(m)
    if m.training:
        if tracking and not torch.is_grad_enabled() and not in_backward():
            handle._warn(name, "eval_in_train_mode", (
                "forward without gradients while in training mode: the output uses batch "
                "statistics and the running statistics are updated with this data. "
                "Evaluating? Call model.eval() (ignore under "
                "torch.utils.checkpoint(use_reentrant=True))"))
        if x.dim() > 0 and x.shape[0] == 1:
            handle._warn(name, "batch_of_one", (
                "training batch of one sample: batch statistics of a single example"))
        return
    if not tracking:
        return
    if int(m.num_batches_tracked) == 0:  # then a gap is no news: skip that check
        handle._warn(name, "never_updated", (
            "evaluating with running statistics that were never updated "
            "(num_batches_tracked == 0)"))
        return
    if not (torch.isfinite(m.running_mean).all() and torch.isfinite(m.running_var).all()):
        handle._warn(name, "non_finite", "evaluating with NaN/Inf running statistics")
    if x.numel() > x.shape[1]:
        with torch.no_grad():
            shift, ratio, far = _gap(Moments(*(t.double() for t in stats.moments(x.detach()))),
                                     m, gap_tol)
        if far:
            handle._warn(name, "train_eval_gap", _gap_message(shift, ratio))


def watch(model: nn.Module, *, gap_tol: float = 0.5) -> WatchHandle:
    """Hooks on every BN layer of ``model`` that warn (``BNMisuseWarning``, once per
    layer and kind) on each misuse listed in the module docstring as it happens. The
    eval-mode gap check computes the input's statistics on every call: a debugging aid,
    not for production. ``handle.remove()`` takes the hooks off."""
    handle = WatchHandle()
    for name, m in batchnorm_layers(model):
        def hook(module: nn.Module, args: tuple, name: str = name) -> None:
            if args and isinstance(args[0], torch.Tensor):
                _check_call(handle, name, module, args[0], gap_tol)

        handle._handles.append(m.register_forward_pre_hook(hook))
    return handle
