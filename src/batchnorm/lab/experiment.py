"""The experiment interface: what a claim's module provides and what the lab gives it.

An experiment is a module of ``batchnorm.lab.experiments`` with

- ``ID`` ("C1"), ``TITLE`` (short), ``CLAIM`` (the claim, the paper's setup and number),
  ``EXPECTATION`` (in words, what the conditions below test);
- ``CONDITIONS``: its rule, a tuple of ``Condition`` written before anything runs: each an
  estimate (the mean of paired per-seed differences, or of per-seed ratios, between arms
  that share their seeds, initial weights and batches), a threshold and the reason for it;
- ``PAPER``: (setting, the paper's number) pairs, which the report shows beside ours;
- ``Config``: a frozen dataclass based on ``Profiles``, with an ``int`` field ``seeds``: its
  fields' defaults are the quick profile, its ``FULL`` and ``SMOKE`` dicts (a few steps, for
  tests) the other profiles' overrides;
- ``run(ctx: Context) -> ClaimResult``.

``run`` reads its configuration with ``ctx.config()``, trains with ``ctx.train(spec)``
(stored runs are reused), saves figures and tables with ``ctx.save_figure`` and
``ctx.save_csv``, and ends with ``return ctx.result(summary, metrics, measured, here)``:
``measured`` maps every condition's key to its per-seed values, ``here`` gives our number
beside each of ``PAPER``'s. The verdict follows mechanically from the conditions: each one
holds when its 95% Student-t interval over the seeds clears the threshold, fails when it
clears it on the other side, and is undecided otherwise; the claim is supported when every
condition holds, not supported when one fails, inconclusive otherwise. A rule changed after
a run is a new rule: the experiment's docstring says what changed and why.
"""

from __future__ import annotations

import csv
import functools
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, Protocol

import numpy as np
from matplotlib.figure import Figure
from scipy import stats

from . import plots
from .data import Dataset, load
from .store import RunStore, write_atomic
from .train import ProgressFn, RunResult, TrainSpec, train

VERDICTS = ("supported", "not supported", "inconclusive")
PROFILES = ("quick", "full", "smoke")
KINDS = ("finding", "check")  # a claim about what BN does, or a property of the code that cannot fail by chance
CONFIDENCE = 0.95
OPS = (">", "<", "within")


@dataclass(frozen=True)
class Condition:
    """One condition of a claim's rule, written in the experiment module before it runs.

    ``key`` names the measurement the experiment hands in (``Context.result(measured=...)``);
    ``text`` says what is estimated; the condition is ``estimate op threshold`` ("within":
    ``-threshold < estimate < threshold``); ``reason`` says why this threshold. With
    ``log=True`` the per-seed values are ratios, averaged and bounded on the log scale
    (a geometric mean and its interval). ``check=True``: a deterministic property check
    (one exact value, no interval), reported apart from the findings.
    """

    key: str
    text: str
    op: str
    threshold: float
    reason: str
    log: bool = False
    check: bool = False

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"condition {self.key!r}: op {self.op!r}, expected one of {OPS}")
        if self.log and not self.threshold > 0:
            raise ValueError(f"condition {self.key!r}: a ratio (log=True) needs a positive threshold, got {self.threshold}")

    def describe(self) -> str:
        """The condition as one line: ``text op threshold``."""
        if self.op == "within":
            return f"{self.text} within +-{self.threshold:g}"
        return f"{self.text} {self.op} {self.threshold:g}"


def with_conv_twins(*mlp: Condition) -> tuple[Condition, ...]:
    """The conditions ``mlp`` (keys "mlp_<name>", texts "MLP: <text>") followed by their twins on
    the conv net, in the same order: key "conv_<name>", text "conv net: <text>", reason "as for
    the MLP", the rest unchanged."""
    for c in mlp:
        if not (c.key.startswith("mlp_") and c.text.startswith("MLP: ")):
            raise ValueError(f"condition {c.key!r}: expected a key 'mlp_...' and a text 'MLP: ...', got {c.text!r}")
    return mlp + tuple(replace(c, key="conv_" + c.key[4:], text="conv net: " + c.text[5:], reason="as for the MLP")
                       for c in mlp)


def interval(values: Sequence[float], log: bool = False, confidence: float = CONFIDENCE
             ) -> tuple[float, float | None, float | None]:
    """Mean of ``values`` (per-seed paired differences, or ratios with ``log``) and its
    two-sided Student-t interval (``scipy.stats.t``): mean +- t_{n-1} * s / sqrt(n).

    One value, or values that are not all finite, give no interval (None, None); values that
    are all equal give a zero-width interval. Ratios: the geometric mean and
    exp(interval of the mean log).
    """
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        raise ValueError("no values to estimate from: expected one per seed")
    if log:
        if np.any(a <= 0):
            return float("nan"), None, None
        a = np.log(a)
    if not np.all(np.isfinite(a)):
        return float("nan"), None, None
    mean = float(a.mean())
    if a.size < 2:
        low = high = None
    else:
        if a.max() == a.min():  # no spread (e.g. every seed censored at the same step)
            low = high = mean
        else:
            sem = float(stats.sem(a))
            low, high = (float(v) for v in stats.t.interval(confidence, a.size - 1, loc=mean, scale=sem))
    if log:
        return float(np.exp(mean)), None if low is None else float(np.exp(low)), None if high is None else float(np.exp(high))
    return mean, low, high


def judge(condition: Condition, estimate: float, low: float | None, high: float | None) -> bool | None:
    """True when the interval ([low, high], or the exact ``estimate`` for a check) clears the
    threshold on the condition's side, False when it clears it on the other side, None when
    it straddles it (or there is no interval)."""
    if condition.check:
        low = high = estimate
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return None
    t = condition.threshold
    if condition.op == ">":
        return True if low > t else False if high < t else None
    if condition.op == "<":
        return True if high < t else False if low > t else None
    return True if -t < low and high < t else False if low > t or high < -t else None


def evidence(condition: Condition, values: Any) -> dict[str, Any]:
    """The evidence entry of ``condition`` from its per-seed ``values`` (or one exact value for a check)."""
    if condition.check:
        value = float(values)
        estimate, low, high, per_seed = value, None, None, [value]
    else:
        per_seed = [float(v) for v in values]
        estimate, low, high = interval(per_seed, condition.log)
    return {"key": condition.key, "condition": condition.describe(), "estimate": estimate, "low": low, "high": high,
            "threshold": condition.threshold, "op": condition.op, "holds": judge(condition, estimate, low, high),
            "reason": condition.reason, "check": condition.check, "values": per_seed,
            "scale": "ratio" if condition.log else "difference"}


def verdict(entries: Sequence[dict[str, Any]]) -> str:
    """Supported when every condition holds, not supported when any fails, inconclusive otherwise."""
    if not entries:
        raise ValueError("a verdict needs at least one condition")
    holds = [e["holds"] for e in entries]
    if all(h is True for h in holds):
        return "supported"
    return "not supported" if any(h is False for h in holds) else "inconclusive"


class Profiles:
    """The base of an experiment's ``Config`` (a frozen dataclass): the fields' defaults are the
    quick profile; the class attributes ``FULL`` and ``SMOKE`` (not fields) hold the fields
    that the full and smoke profiles change. ``Config.<profile>()`` builds one profile."""

    FULL: ClassVar[dict[str, Any]] = {}
    SMOKE: ClassVar[dict[str, Any]] = {}

    @classmethod
    def quick(cls) -> Any:
        return cls()

    @classmethod
    def full(cls) -> Any:
        return cls(**cls.FULL)

    @classmethod
    def smoke(cls) -> Any:
        return cls(**cls.SMOKE)


@functools.lru_cache(maxsize=1)
def _digits() -> Dataset:
    """scikit-learn's digits as 8x8 images, loaded once per process."""
    return load("digits")


@dataclass
class ClaimResult:
    """One claim's outcome: an entry of results.json's "claims"."""

    id: str
    title: str
    claim: str
    expectation: str
    verdict: str  # one of VERDICTS, from the evidence
    summary: str  # the measured numbers in a sentence or two
    metrics: dict[str, Any]
    evidence: list[dict[str, Any]] = field(default_factory=list)  # one entry per condition (see ``evidence``)
    kind: str = "finding"  # "check" when every condition is a property check
    paper: list[dict[str, str]] = field(default_factory=list)  # {"setting", "paper", "here"}
    figures: list[str] = field(default_factory=list)  # PNG files, relative to the output folder
    captions: list[str] = field(default_factory=list)  # one per figure: what to look at
    tables: list[str] = field(default_factory=list)  # CSV files, relative to the output folder
    config: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class RunProgress(Protocol):
    """How the lab shows training runs (the runner's rich progress bars, or nothing)."""

    def start(self, label: str, steps: int) -> ProgressFn: ...

    def finish(self, label: str, stored: bool) -> None: ...


class Silent:
    """A ``RunProgress`` that shows nothing."""

    def start(self, label: str, steps: int) -> ProgressFn:
        return lambda step, steps, loss, accuracy: None

    def finish(self, label: str, stored: bool) -> None:
        pass


@dataclass
class Context:
    """What an experiment gets from the lab: data, profile, run store, output folder."""

    experiment: ModuleType
    profile: str
    data: Dataset
    out: Path
    store: RunStore
    progress: RunProgress = field(default_factory=Silent)
    seeds_override: int | None = None
    figures: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    _config: Any = field(default=None, init=False, repr=False)
    loaded_images: Dataset | None = field(default=None, init=False, repr=False)  # set by ``images()``

    def config(self) -> Any:
        """The experiment's ``Config`` for this profile (``--seeds`` overrides its seeds)."""
        if self._config is None:
            cfg = getattr(self.experiment.Config, self.profile)()
            if self.seeds_override is not None:
                cfg = replace(cfg, seeds=self.seeds_override)
            self._config = cfg
        return self._config

    def seeds(self) -> list[int]:
        """The seeds of this profile: 0 .. seeds-1."""
        return list(range(self.config().seeds))

    def images(self) -> Dataset:
        """The data of the conv-net arms: the lab's data when they are images, else scikit-learn's
        digits as 8x8 images (embedded)."""
        if self.data.image_shape is not None:
            return self.data
        if self.loaded_images is None:
            self.loaded_images = _digits()
        return self.loaded_images

    def train(self, spec: TrainSpec, data: Dataset | None = None) -> RunResult:
        """The result of ``spec`` on ``data`` (default: the lab's data): from the store, or trained and stored."""
        data = data or self.data
        label = spec.label()
        key = self.store.key(spec.to_json(), data.fingerprint)
        stored = self.store.get(label, key, RunResult.from_json)
        if stored is not None:
            self.progress.finish(label, stored=True)
            return stored
        result = train(spec, data, self.progress.start(label, spec.steps))
        self.store.put(label, key, result.to_json())
        self.progress.finish(label, stored=False)
        return result

    def train_arms(self, base: Callable[[int], TrainSpec], norm: str, data: Dataset | None = None
                   ) -> dict[str, list[RunResult]]:
        """Both arms over the seeds, seed by seed: "bn" (``base(seed)`` with ``norm``) and "no_bn"
        (``base(seed)`` itself, whose norm is "none"), on ``data`` (default: the lab's data). The
        two arms of a seed share its initial weights and batches."""
        out: dict[str, list[RunResult]] = {"bn": [], "no_bn": []}
        for seed in self.seeds():
            spec = base(seed)
            out["bn"].append(self.train(replace(spec, norm=norm), data))
            out["no_bn"].append(self.train(spec, data))
        return out

    def _file(self, folder: str, name: str, suffix: str) -> tuple[Path, str]:
        relative = f"{folder}/{self.experiment.ID}_{name}{suffix}"
        return self.out / relative, relative

    def save_figure(self, fig: Figure, name: str, caption: str) -> None:
        """Save ``fig`` as ``figures/<ID>_<name>.png`` and list it in the result, with a
        caption that says what to look at."""
        path, relative = self._file("figures", name, ".png")
        plots.save(fig, path)
        self.figures.append(relative)
        self.captions.append(caption)

    def save_csv(self, name: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Save a table as ``data/<ID>_<name>.csv`` and list it in the result."""
        path, relative = self._file("data", name, ".csv")
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        write_atomic(path, buffer.getvalue())
        self.tables.append(relative)

    def result(self, summary: str, metrics: dict[str, Any], measured: dict[str, Any],
               here: Sequence[str] = ()) -> ClaimResult:
        """The ``ClaimResult`` of this experiment: its evidence from ``measured`` (every
        condition's key -> per-seed values, or the exact value of a check), the verdict from
        the evidence, ``here`` beside each of the module's ``PAPER`` entries."""
        e = self.experiment
        conditions: tuple[Condition, ...] = e.CONDITIONS
        keys = [c.key for c in conditions]
        if sorted(measured) != sorted(keys):
            raise ValueError(f"{e.ID}: measured {sorted(measured)}, expected exactly the conditions' keys {sorted(keys)}")
        paper = getattr(e, "PAPER", ())
        if len(here) != len(paper):
            raise ValueError(f"{e.ID}: {len(here)} 'here' values for {len(paper)} PAPER entries")
        entries = [evidence(c, measured[c.key]) for c in conditions]
        kind = "check" if all(c.check for c in conditions) else "finding"
        return ClaimResult(e.ID, e.TITLE, e.CLAIM, e.EXPECTATION, verdict(entries), summary, metrics, entries, kind,
                           [{"setting": s, "paper": p, "here": h} for (s, p), h in zip(paper, here)],
                           list(self.figures), list(self.captions), list(self.tables), asdict(self.config()),
                           self.seeds())
