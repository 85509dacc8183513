"""Run the lab: load the data, run the chosen experiments, write results.json and index.html.

Progress shows as rich bars: one for the experiments, one for the training run in
progress (step, loss, test accuracy at the last checkpoint). Runs found in the store are
reused, so an interrupted lab resumes where it stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import output, report, results
from .data import DataError, Dataset, load
from .experiment import PROFILES, ClaimResult, Context
from .experiments import select
from .store import RunStore
from .train import ProgressFn

LAB_THREADS = 1  # small models: one thread is fastest, and leaves the other cores free
VERDICT_STYLE = {"supported": "green", "not supported": "red", "inconclusive": "yellow"}


def set_threads(n: int, numba_n: int | None = None) -> tuple[int, int | None]:
    """Use ``n`` threads in torch and ``numba_n`` (default ``n``) in numba's parallel loops
    (batchnorm's CPU kernels) when numba is installed; returns the previous counts. On a busy
    machine a parallel kernel that waits at every barrier for a descheduled thread runs 100x
    slower (measured: a BN2d step on 128x16x8x8 took 58 ms instead of 0.3 ms)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        import numba
    except ImportError:
        return previous, None
    numba_previous = numba.get_num_threads()
    numba.set_num_threads(min(numba_n or n, numba.config.NUMBA_NUM_THREADS))
    return previous, numba_previous


@dataclass
class BarProgress:
    """Shows each training run as a rich progress bar; counts trained and reused runs."""

    progress: Progress
    trained: int = 0
    reused: int = 0
    _tasks: dict[str, TaskID] = field(default_factory=dict)

    def start(self, label: str, steps: int) -> ProgressFn:
        task = self.progress.add_task(f"  {label}", total=steps, info="")
        self._tasks[label] = task
        last_accuracy = ["-"]

        def update(step: int, steps: int, loss: float, accuracy: float | None) -> None:
            if accuracy is not None:
                last_accuracy[0] = f"{accuracy:.1%}"
            self.progress.update(task, completed=step, info=f"loss {loss:.3f}  test acc {last_accuracy[0]}")

        return update

    def finish(self, label: str, stored: bool) -> None:
        if stored:
            self.reused += 1
            return
        self.trained += 1
        self.progress.remove_task(self._tasks.pop(label))


def run_lab(out: Path, profile: str = "quick", only: list[str] | None = None, data: str = "mnist1d",
            data_dir: Path | None = None, seeds: int | None = None, fresh: bool = False,
            console: Console | None = None, command: str = "batchnorm lab", replace: bool = False) -> Path:
    """Run the lab and write ``out/results.json`` and ``out/index.html``; returns the report's path.

    Before any training: the output folder is checked (``output.prepare``: a report there
    that this run would lose claims of, or of another profile or data set, is kept unless
    ``replace``), the data set is read and checked against the experiments' batch sizes;
    errors are ``output.OutputError`` and ``DataError``."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}: expected one of {PROFILES}")
    if seeds is not None and seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    console = console or Console()
    experiments = select(only)
    out = Path(out)
    previous = output.prepare(out, [e.ID for e in experiments], profile, data, replace)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    clock, cpu = time.perf_counter(), time.process_time()
    with console.status(f"loading {data}"):
        dataset = load(data, data_dir)
    console.print(f"data: {dataset.name}, {len(dataset.y_train)} train / {len(dataset.y_test)} test ({dataset.source})")
    check_batch_sizes(dataset, experiments, profile)
    store = RunStore(out, fresh=fresh, on_corrupt=lambda message: console.print(f"[yellow]warning:[/] {message}"))
    threads, numba_threads = set_threads(LAB_THREADS)
    claims: list[ClaimResult] = []
    image_data = None  # the conv-net arms' images, when they are not the lab's data
    try:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[info]}"))
        with Progress(*columns, console=console, transient=False) as progress:
            bars = BarProgress(progress)
            overall = progress.add_task("experiments", total=len(experiments), info="")
            for experiment in experiments:
                progress.update(overall, info=f"{experiment.ID} {experiment.TITLE}")
                tic = time.perf_counter()
                ctx = Context(experiment, profile, dataset, out, store, bars, seeds)
                claim = experiment.run(ctx)
                if ctx.loaded_images is not None:
                    image_data = ctx.loaded_images.describe()
                claim.seconds = time.perf_counter() - tic
                claims.append(claim)
                progress.advance(overall)
            progress.update(overall, info=f"{bars.trained} runs trained, {bars.reused} reused from {store.folder}")
    finally:
        set_threads(threads, numba_threads)
    written = results.write(out / "results.json", profile, dataset.describe(), claims, command, started,
                            time.perf_counter() - clock, time.process_time() - cpu, LAB_THREADS,
                            bars.trained, bars.reused, image_data)
    path = report.write(written, out)
    output.remove_orphans(out, previous, written)
    console.print(summary_table(claims, indicative=written["indicative"]))
    console.print(f"Report: {path.resolve()}")
    return path


BATCH_FIELDS = ("batch_size", "batch_sizes", "few_class_batch")  # Config fields that size training batches


def check_batch_sizes(dataset: Dataset, experiments: list[ModuleType], profile: str) -> None:
    """Raise ``DataError`` when an experiment's training batch (its Config's ``BATCH_FIELDS``
    in ``profile``) is larger than the training set: found before any training starts."""
    n = len(dataset.y_train)
    for experiment in experiments:
        cfg = getattr(experiment.Config, profile)()
        for name in BATCH_FIELDS:
            value = getattr(cfg, name, None)
            for size in value if isinstance(value, tuple) else (value,):
                if isinstance(size, int) and size > n:
                    raise DataError(f"{dataset.source}: {n} training examples, fewer than {experiment.ID}'s {name} "
                                    f"{size} in the {profile} profile; expected at least {size} training examples "
                                    f"(a larger training set, or other claims with --only)")


def summary_table(claims: list[ClaimResult], indicative: bool = False) -> Table:
    """One row per claim: ID and title, what was measured, the verdict (property checks marked)."""
    title = "batchnorm lab" + (" (indicative: run --profile full for the README's numbers)" if indicative else "")
    table = Table(title=title, show_lines=True)
    table.add_column("claim", max_width=28)
    table.add_column("measured")
    table.add_column("verdict", no_wrap=True)
    for c in claims:
        kind = " (check)" if c.kind == "check" else ""
        table.add_row(f"{c.id} {c.title}{kind}", c.summary, f"[{VERDICT_STYLE[c.verdict]}]{c.verdict}[/]")
    return table
