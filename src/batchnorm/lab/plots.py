"""Figures for the report: matplotlib ``Figure`` objects drawn by the Agg renderer.

No pyplot, no global figure state: ``new()`` makes a figure, the experiment draws on its
axes, ``save()`` writes the PNG atomically.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .store import write_atomic

BN_COLOR, NO_BN_COLOR = "tab:blue", "tab:red"


def new(ncols: int = 1, nrows: int = 1, width: float = 6.0, height: float = 3.8) -> tuple[Figure, np.ndarray]:
    """A figure with an ``nrows x ncols`` grid of axes (always a flat array)."""
    fig = Figure(figsize=(width * ncols, height * nrows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes.ravel()


def save(fig: Figure, path: Path) -> None:
    """Write ``fig`` as a PNG to ``path`` atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    write_atomic(path, buffer.getvalue())


def mean_band(ax: Axes, x: Sequence[float], ys: Sequence[Sequence[float]], label: str, color: str) -> None:
    """Plot the mean over seeds of ``ys`` (one row per seed) with a min-max band."""
    a = np.asarray(ys, dtype=float)
    ax.plot(x, a.mean(axis=0), color=color, label=f"{label} (mean of {len(a)})")
    if len(a) > 1:
        ax.fill_between(x, a.min(axis=0), a.max(axis=0), color=color, alpha=0.2, linewidth=0)


def windowed(rows: Sequence[Sequence[float]], windows: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Means of equal rows over ``windows`` consecutive windows: (last step of each window, means)."""
    a = np.asarray(rows, dtype=float)
    size = max(1, a.shape[1] // windows)
    n = a.shape[1] // size
    return (np.arange(n) + 1) * size, a[:, : n * size].reshape(len(a), n, size).mean(axis=2)


def seed_bars(ax: Axes, positions: Sequence[float], values: Sequence[Sequence[float]], width: float, color: str,
              label: str) -> None:
    """Bars at the mean of each group of per-seed ``values``, with every seed drawn as a dot
    on its bar (no error bar: with one seed there is no spread to show, and with a few the
    dots are the spread)."""
    means = [float(np.mean(v)) for v in values]
    ax.bar(positions, means, width, color=color, alpha=0.75, label=label)
    for x, v in zip(positions, values):
        v = np.asarray(v, dtype=float)
        ax.scatter(np.full(v.shape, x), v, s=12, color="black", zorder=3, linewidths=0)
