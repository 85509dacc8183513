"""The experiment interface: what a claim's module provides and what the lab gives it.

An experiment is a module of ``batchnorm.lab.experiments`` with

- ``ID`` ("C1"), ``TITLE`` (short), ``CLAIM`` (the claim, the paper's setup and number),
  ``EXPECTATION`` (the measurable outcome the verdict checks);
- ``Config``: a dataclass with an ``int`` field ``seeds`` and the classmethods
  ``quick()``, ``full()`` and ``smoke()`` (a few steps, for tests);
- ``run(ctx: Context) -> ClaimResult``.

``run`` reads its configuration with ``ctx.config()``, trains with ``ctx.train(spec)``
(stored runs are reused), saves figures and tables with ``ctx.save_figure`` and
``ctx.save_csv``, and ends with ``return ctx.result(verdict, summary, metrics)``; the
verdict comes from ``decide`` applied to the measurement, never from a constant.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from matplotlib.figure import Figure

from . import plots
from .data import Dataset
from .store import RunStore, write_atomic
from .train import ProgressFn, RunResult, TrainSpec, train

VERDICTS = ("supported", "not supported", "inconclusive")
PROFILES = ("quick", "full", "smoke")


def decide(supported: bool, refuted: bool) -> str:
    """"supported" if the expectation is met, "not supported" if the measurement contradicts
    it, "inconclusive" otherwise."""
    if supported:
        return "supported"
    return "not supported" if refuted else "inconclusive"


@dataclass
class ClaimResult:
    """One claim's outcome: an entry of results.json's "claims"."""

    id: str
    title: str
    claim: str
    expectation: str
    verdict: str  # one of VERDICTS
    summary: str  # the measured numbers in a sentence or two
    metrics: dict[str, Any]
    figures: list[str] = field(default_factory=list)  # PNG files, relative to the output folder
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
    tables: list[str] = field(default_factory=list)
    _config: Any = field(default=None, init=False, repr=False)

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

    def train(self, spec: TrainSpec) -> RunResult:
        """The result of ``spec`` on the lab's data: from the store, or trained and stored."""
        label = spec.label()
        key = self.store.key(spec.to_json(), self.data.fingerprint)
        stored = self.store.get(label, key, RunResult.from_json)
        if stored is not None:
            self.progress.finish(label, stored=True)
            return stored
        result = train(spec, self.data, self.progress.start(label, spec.steps))
        self.store.put(label, key, result.to_json())
        self.progress.finish(label, stored=False)
        return result

    def _file(self, folder: str, name: str, suffix: str) -> tuple[Path, str]:
        relative = f"{folder}/{self.experiment.ID}_{name}{suffix}"
        return self.out / relative, relative

    def save_figure(self, fig: Figure, name: str) -> None:
        """Save ``fig`` as ``figures/<ID>_<name>.png`` and list it in the result."""
        path, relative = self._file("figures", name, ".png")
        plots.save(fig, path)
        self.figures.append(relative)

    def save_csv(self, name: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Save a table as ``data/<ID>_<name>.csv`` and list it in the result."""
        path, relative = self._file("data", name, ".csv")
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        write_atomic(path, buffer.getvalue())
        self.tables.append(relative)

    def result(self, verdict: str, summary: str, metrics: dict[str, Any]) -> ClaimResult:
        """The ``ClaimResult`` of this experiment, with its figures, tables and configuration."""
        if verdict not in VERDICTS:
            raise ValueError(f"verdict {verdict!r}: expected one of {VERDICTS}")
        e = self.experiment
        return ClaimResult(e.ID, e.TITLE, e.CLAIM, e.EXPECTATION, verdict, summary, metrics,
                           list(self.figures), list(self.tables), asdict(self.config()), self.seeds())
