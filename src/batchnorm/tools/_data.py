"""Passes over user data: pull the input out of each batch, stop after enough samples,
and report progress on stderr (no dependency)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor


def batch_input(item: object) -> Tensor:
    """The input tensor of ``item``: the item itself, or the first element of an
    ``(input, target, ...)`` tuple or list."""
    x = item[0] if isinstance(item, (tuple, list)) and item else item
    if not isinstance(x, Tensor):
        raise TypeError(
            "expected batches that are tensors or (input, target) pairs with a tensor "
            f"input, got {type(item).__name__}"
            + (f" whose first element is {type(x).__name__}" if x is not item else "")
        )
    return x


class Progress:
    """``label: 12/50 batches, 384 samples`` rewritten in place at most 10 times a second;
    ``total`` is the number of batches when known, ``enabled=False`` prints nothing."""

    def __init__(self, label: str, total: int | None = None, enabled: bool = True) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self._last = 0.0
        self._text = ""

    def update(self, batches: int, samples: int) -> None:
        of = f"/{self.total}" if self.total is not None else ""
        self._text = f"{self.label}: {batches}{of} batches, {samples} samples"
        now = time.monotonic()
        if self.enabled and now - self._last >= 0.1:
            self._last = now
            sys.stderr.write("\r" + self._text)
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self._text:
            sys.stderr.write("\r" + self._text + "\n")
            sys.stderr.flush()


def inputs(
    data: Iterable,
    device: torch.device,
    num_samples: int | None = None,
    label: str = "batches",
    progress: bool = True,
) -> Iterator[Tensor]:
    """Yield each batch's input moved to ``device``: whole batches, until at least
    ``num_samples`` samples (rows of dim 0) were yielded (all of ``data`` when None).
    Raises ValueError if ``data`` yields nothing."""
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"num_samples must be a positive number of samples, got {num_samples}")
    total = len(data) if hasattr(data, "__len__") and num_samples is None else None
    bar = Progress(label, total, progress)
    batches = samples = 0
    try:
        for item in data:
            x = batch_input(item).to(device)
            yield x
            batches += 1
            samples += x.shape[0] if x.dim() else 1
            bar.update(batches, samples)
            if num_samples is not None and samples >= num_samples:
                break
    finally:
        bar.close()
    if batches == 0:
        raise ValueError("data yielded no batches: nothing to compute statistics from")
