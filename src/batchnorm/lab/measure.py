"""Small numeric helpers that experiments use to read their runs."""

from __future__ import annotations

from collections.abc import Sequence

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


def steps_to(steps: np.ndarray, curve: np.ndarray, target: float) -> int | None:
    """The first checkpoint step where ``curve`` reaches ``target``, or None if it never does."""
    hits = np.flatnonzero(curve >= target)
    return int(steps[hits[0]]) if hits.size else None


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard deviation (0 for a single value)."""
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0
