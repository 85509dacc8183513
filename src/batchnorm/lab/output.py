"""The output folder (``--out``): checked before any training, and never loses a report.

A folder holds one report: ``results.json``, ``index.html`` and the ``figures/`` and
``data/`` files its claims list. A run may write into a new folder, or into one whose
report it reports again: the same profile and data set, and every claim of that report
(the same command again resumes and refreshes it; adding ``--only`` claims extends it). A
report that the run would lose claims of (another ``--only``), or of another profile or data
set, is kept: the run stops before training with a message that says what the folder holds
and what to do (another ``--out``; all the claims in one command, which reuses the stored
runs; or ``replace=True`` / ``--replace`` to overwrite it). When a report is
replaced or refreshed, the figures and tables of the old one that the new one does not list
are deleted, so no orphan is left. The run store (``runs/``) is shared by every run in the
folder: its files are keyed by what decides them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .experiments import select


class OutputError(ValueError):
    """The output folder cannot take this run's report: the message says why and what to do."""


def _describe(claims: list[str], profile: str, data: str) -> str:
    return f"claims {', '.join(claims) or 'none'}, profile {profile}, data {data}"


def prepare(out: Path, claims: list[str], profile: str, data: str, replace: bool = False) -> dict[str, Any] | None:
    """Create ``out`` if needed and check that this run may write its report there.

    ``claims`` are the IDs this run reports. Returns the report already in ``out``
    (results.json's contents) that this run will write over (refresh, extend or
    ``replace``), else None. Raises ``OutputError`` when ``out`` is not a writable folder,
    or holds a report this run would lose claims of (or of another profile or data set)
    and ``replace`` is False."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; expected a folder (a new one, or one that holds a lab report)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the output folder {out}: {e.strerror or e}; expected a path where a folder "
                          "can be made") from e
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"the output folder {out} is not writable; expected a folder this user can write to")
    for folder in ("runs", "figures", "data"):
        if (out / folder).exists() and not (out / folder).is_dir():
            raise OutputError(f"{out / folder} is a file; expected the lab's {folder}/ folder there (move the file away)")
    results, index = out / "results.json", out / "index.html"
    if not results.exists():
        if index.exists() and not replace:
            raise OutputError(f"{index} exists but {results} does not: the folder holds something other than a lab "
                              "report; expected a new folder or one that holds a lab report. Use another --out, "
                              "or --replace to overwrite it")
        return None
    try:
        previous = json.loads(results.read_bytes())
        old = ([str(c["id"]) for c in previous["claims"]], str(previous["profile"]), str(previous["data"]["name"]))
    except (OSError, ValueError, TypeError, KeyError) as e:
        if replace:
            return None
        raise OutputError(f"{results} cannot be read as a lab report ({type(e).__name__}: {e}); expected the "
                          "results.json of an earlier run. Use another --out, or --replace to overwrite it") from e
    if replace or (set(old[0]) <= set(claims) and old[1:] == (profile, data)):
        return previous  # replaced, or reported again (with more claims): nothing is lost
    advice = ["use another --out to keep both"]
    if old[1:] == (profile, data):
        order = [e.ID for e in select(None)]
        rank = {c: order.index(c) if c in order else len(order) for c in set(old[0]) | set(claims)}
        together = " ".join(f"--only {c}" for c in sorted(rank, key=lambda c: (rank[c], c)))
        advice.append(f"report all of them in one run with {together} (the stored runs in {out / 'runs'} are reused)")
    advice.append("or add --replace to overwrite it")
    raise OutputError(f"{out} holds the report of another run ({_describe(*old)}); this run ({_describe(claims, profile, data)}) "
                      f"would replace it. Nothing was run: {'; '.join(advice)}")


def remove_orphans(out: Path, previous: dict[str, Any] | None, current: dict[str, Any]) -> list[Path]:
    """Delete the figures and tables that ``previous`` listed and ``current`` does not
    (only files under ``out/figures`` and ``out/data``); returns the deleted paths."""
    if not previous:
        return []

    def listed(results: dict[str, Any]) -> set[str]:
        try:
            return {str(f) for c in results["claims"] for f in [*c.get("figures", []), *c.get("tables", [])]}
        except (TypeError, KeyError, AttributeError):
            return set()

    out = Path(out).resolve()
    removed = []
    for relative in sorted(listed(previous) - listed(current)):
        path = (out / relative).resolve()
        if path.parent not in (out / "figures", out / "data") or not path.is_file():
            continue  # never delete outside the report's own folders
        path.unlink()
        removed.append(path)
    return removed
