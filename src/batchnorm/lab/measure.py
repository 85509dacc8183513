"""Small numeric helpers that experiments use to read their runs."""

from __future__ import annotations

import ctypes
import gc
import math
import time
from collections.abc import Callable, Sequence

import numpy as np

from .train import RunResult


def checkpoint_matrix(runs: Sequence[RunResult], metric: str = "test_accuracy") -> tuple[np.ndarray, np.ndarray]:
    """The checkpoint steps and a (runs, checkpoints) array of ``metric``.

    The runs must share their schedule; a run that stopped early (diverged) keeps its last
    value (the one measured at the divergence step, an extra checkpoint when that step is
    off the schedule) for the checkpoints it did not reach.
    """
    longest = max(runs, key=lambda r: (r.diverged_at is None, len(r.eval_steps)))
    steps = np.asarray(longest.eval_steps)
    rows = []
    for r in runs:
        values = list(getattr(r, metric))
        reached = len(values) - int(r.diverged_at is not None and r.eval_steps[-1] not in longest.eval_steps)
        if r.eval_steps[:reached] != longest.eval_steps[:reached]:
            raise ValueError(f"runs with different checkpoints: {r.eval_steps[:5]}... vs {longest.eval_steps[:5]}...")
        rows.append(values[:reached] + [values[-1]] * (len(steps) - reached))
    return steps, np.asarray(rows, dtype=float)


def early_mean(steps: np.ndarray, acc: np.ndarray, fraction: float) -> np.ndarray:
    """Per run (row of ``acc``): the mean over the checkpoints after step 0 up to ``fraction`` of
    the run (at least one checkpoint), i.e. the area under the early learning curve."""
    steps = np.asarray(steps)
    window = (steps > 0) & (steps <= fraction * steps[-1])
    if not window.any():
        window = steps == steps[steps > 0][0] if (steps > 0).any() else steps == steps[-1]
    return acc[:, window].mean(axis=1)


def steps_to(steps: np.ndarray, curve: np.ndarray, target: float) -> int | None:
    """The first checkpoint step where ``curve`` reaches ``target``, or None if it never does."""
    hits = np.flatnonzero(curve >= target)
    return int(steps[hits[0]]) if hits.size else None


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard deviation (0 for a single value)."""
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def pin_allocator() -> bool:
    """Make glibc's malloc keep freed memory in this process from now on (as
    ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` do for ``batchnorm bench``): blocks
    up to 32 MB come from the heap and the heap's top is not handed back, so an allocation
    does not pay for fresh zero-filled pages depending on what the process freed before.
    Returns whether it applied (False without glibc). It cannot be undone: glibc's adaptive
    thresholds stay off, and the process keeps its peak memory.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def paired_times(fns: dict[str, Callable[[], object]], rounds: int, min_sample: float = 0.005) -> dict[str, np.ndarray]:
    """Seconds per call of each callable in each of ``rounds`` rounds, the callables timed in turns.

    A sample repeats a call as often as one (untimed, warm-up) call says it takes to last about
    ``min_sample`` seconds; the order reverses every other round (whatever runs second finds the
    caches as the first left them); Python's garbage collector is paused while timing, as
    ``timeit`` does (a collection lands on whichever call happens to trigger it). Round i of
    every callable ran at the same moment, so per-round ratios cancel the machine's drift.
    """
    names = list(fns)
    calls = {}
    for name in names:
        tic = time.perf_counter()
        fns[name]()
        calls[name] = max(1, math.ceil(min_sample / max(time.perf_counter() - tic, 1e-7)))
    times = {name: np.empty(rounds) for name in names}
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                fn, n = fns[name], calls[name]
                tic = time.perf_counter()
                for _ in range(n):
                    fn()
                times[name][r] = (time.perf_counter() - tic) / n
    finally:
        if enabled:
            gc.enable()
    return times
