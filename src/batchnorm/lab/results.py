"""results.json: everything a lab run measured, enough to rebuild its report.

Layout::

    {"profile": "quick", "indicative": true for the quick and smoke profiles,
     "data": {name, train, test, features, classes, source, image_shape, sha256},
     "image_data": the same for the conv-net arms' images when they are not "data" (else null),
     "commit": {"sha": git commit of the code, "dirty": uncommitted changes} (null outside a checkout),
     "versions": {...}, "machine": {...}, "command": the command that reproduces it,
     "started": ISO time, "seconds": wall-clock time, "cpu_seconds": this process's CPU time,
     "claims": [ClaimResult.to_json(), ...]}

Strict JSON: a non-finite number (a diverged loss) is written as null.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from .experiment import ClaimResult
from .store import write_atomic

PACKAGES = ("batchnorm", "torch", "numpy", "matplotlib", "scikit-learn", "mnist1d", "jinja2")


def versions() -> dict[str, str]:
    """Python and the versions of the packages the lab uses."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


COMMIT_ENV = "BATCHNORM_LAB_COMMIT"  # the commit of a copy of the code that has no .git (e.g. on another machine)


def commit() -> dict[str, Any] | None:
    """The git commit of the code that ran and whether the checkout had uncommitted changes.
    Outside a git checkout: the commit named by the ``BATCHNORM_LAB_COMMIT`` environment
    variable (the person who copied the code says which; "dirty" is then unknown), else None."""
    here = Path(__file__).resolve().parent
    named = os.environ.get(COMMIT_ENV)

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, check=True, timeout=30).stdout

    try:
        sha = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.SubprocessError):
        return {"sha": named, "dirty": None, "from": COMMIT_ENV} if named else None
    return {"sha": sha, "dirty": dirty}


def machine(threads: int) -> dict[str, Any]:
    """Where the lab ran: platform, CPU count, torch threads used, load average when known."""
    info: dict[str, Any] = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": threads}
    if hasattr(os, "getloadavg"):
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    return info


def finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def write(path: Path, profile: str, data: dict[str, Any], claims: list[ClaimResult], command: str,
          started: str, seconds: float, cpu_seconds: float, threads: int,
          runs_trained: int = 0, runs_reused: int = 0, image_data: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write results.json atomically and return its contents. ``seconds`` is this
    invocation's time: runs reused from an earlier invocation (``runs_reused``) cost none."""
    results = {
        "profile": profile,
        "indicative": profile != "full",
        "data": data,
        "image_data": image_data,
        "commit": commit(),
        "versions": versions(),
        "machine": machine(threads),
        "command": command,
        "started": started,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "runs_trained": runs_trained,
        "runs_reused": runs_reused,
        "claims": [c.to_json() for c in claims],
    }
    results = finite(results)
    write_atomic(path, json.dumps(results, indent=1, allow_nan=False))
    return results


def read(path: Path) -> dict[str, Any]:
    """The contents of a results.json."""
    return json.loads(Path(path).read_text())
