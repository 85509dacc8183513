"""How long the first training step waits for numba, on a new install and afterwards.

Each measurement is a fresh interpreter with its own empty ``NUMBA_CACHE_DIR`` (a new
install) or the one the previous run filled (every later process):

* ``cold``: the first BatchNorm2d training step (forward + backward, float32, a tensor
  large enough for the fused kernels) compiles what it needs;
* ``warm``: the same step in a second process, which loads the kernels from the cache;
* ``warmup``: ``batchnorm warmup`` on an empty cache (every kernel, float32 and float64),
  then the step in a new process.

    .venv/bin/python benchmarks/first_call.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

_STEP = """
import time, torch
start = time.perf_counter()
import batchnorm
m = batchnorm.BatchNorm2d(64)
x = torch.randn(8, 64, 32, 32, requires_grad=True)
m(x).sum().backward()
print(time.perf_counter() - start)
"""

_WARMUP = """
import time
from typer.testing import CliRunner
from batchnorm.cli import app
start = time.perf_counter()
assert CliRunner().invoke(app, ["warmup"]).exit_code == 0
print(time.perf_counter() - start)
"""


def _seconds(code: str, cache: Path) -> float:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    with tempfile.TemporaryDirectory() as first, tempfile.TemporaryDirectory() as second:
        cold = _seconds(_STEP, Path(first))
        warm = _seconds(_STEP, Path(first))
        warmup = _seconds(_WARMUP, Path(second))
        after = _seconds(_STEP, Path(second))
    print("| first training step (import + forward + backward) | s |")
    print("|---|--:|")
    print(f"| new install (empty cache) | {cold:.1f} |")
    print(f"| next process (cache filled by the step above) | {warm:.1f} |")
    print(f"| `batchnorm warmup` on an empty cache | {warmup:.1f} |")
    print(f"| first step after the warm-up | {after:.1f} |")


if __name__ == "__main__":
    main()
