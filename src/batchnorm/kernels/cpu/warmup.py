"""Compile (or load from numba's cache) every CPU kernel ahead of time: ``batchnorm warmup``.

Numba compiles a kernel on its first call with a new argument type and caches it next to
the sources (``__pycache__``, or ``NUMBA_CACHE_DIR``). A new install therefore pays the
compilation on the first training step (about 9 s for a plain BN layer on a 2-core
machine, more for float64, the activations and eval afterwards). Running the warm-up once
after installing (in a Docker image build, or before a timed run) moves that cost out of
the first step: every later process loads the compiled kernels from the cache.

Each case calls the backend's public functions on a small tensor that takes one of its
code paths (channel-major with many channels: the fused kernels; with few: channels cut
into parts; channels-last; eval; BN + activation; the running-statistic guards), in
float32 and float64, so every kernel is compiled for both.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch

from . import backend as cpu
from . import backup as cpu_backup

#: (label, shape) of the inputs: many channels -> fused kernels; few channels with long
#: rows -> channels cut into parts (``cpu_backend._parts``); 2-d -> channels-last rows.
_SHAPES = (
    ("channel-major, fused", (2, 16, 8)),
    ("channel-major, split", (2, 2, 4 * cpu.MIN_TASK)),
    ("channels-last", (8, 16)),
)
_DTYPES = (torch.float32, torch.float64)


def _run(x: torch.Tensor) -> None:
    """Every backend function once on x (values irrelevant, positive for the activation
    inverses)."""
    c = x.shape[1]
    w = torch.rand(c, dtype=x.dtype) + 0.5
    b = torch.zeros(c, dtype=x.dtype)
    dy = torch.randn_like(x)
    y, mean, invstd = cpu.forward_train(x, w, b, 1e-5)
    cpu.backward(dy, x, mean, invstd, w)
    cpu.backward_elemt(dy, x, mean, invstd, w, *cpu.backward_reduce(dy, x, mean, invstd),
                       x.numel() // c)
    cpu.batch_stats(x)
    cpu.normalize(x, mean, invstd, w, b)
    cpu.backward_eval(dy, x, mean, invstd, w)
    # one activation compiles every activation's loops (the code is a runtime value);
    # the memory-saving backward needs an invertible one
    z, mean, invstd = cpu.forward_train_act(x, w, b, 1e-5, "leaky_relu", 0.01)
    cpu.backward_act(dy, z, mean, invstd, w, b, "leaky_relu", 0.01, True)
    cpu.forward_eval_act(x, mean, invstd, w, b, "leaky_relu", 0.01)
    cpu.backward_act_input(dy, x, mean, invstd, w, b, "relu", 0.0, True)
    cpu.finite_batch(mean, invstd, 1e-5)
    cpu.magnitudes_at_least(w, 1e-5)  # BatchNormAct's effective weight
    running = (torch.zeros(c, dtype=x.dtype), torch.ones(c, dtype=x.dtype))
    cpu.update_running(*running, mean, invstd, 1e-5, 1.0, 0.1)
    backup = cpu_backup.RunningBackup()  # the guard of the ATen path
    backup.save(*running, torch.zeros((), dtype=torch.int64))
    backup.commit()
    backup.restore()
    backup.update(*running, torch.zeros((), dtype=torch.int64), mean, invstd, 1e-5, 1.0, 0.1)


def cases() -> Iterator[tuple[str, Callable[[], None]]]:
    """(label, call) for every shape and dtype."""
    for label, shape in _SHAPES:
        for dtype in _DTYPES:
            x = torch.rand(shape, dtype=dtype) + 0.1
            yield f"{label}, {str(dtype).removeprefix('torch.')}", (lambda x=x: _run(x))


def warm_up(on_case: Callable[[str, float], None] | None = None) -> float:
    """Run every case; ``on_case(label, seconds)`` after each. Returns the total seconds."""
    start = time.perf_counter()
    for label, call in cases():
        t0 = time.perf_counter()
        call()
        if on_case is not None:
            on_case(label, time.perf_counter() - t0)
    return time.perf_counter() - start
