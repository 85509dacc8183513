"""index.html: the lab's report, rendered from results.json by a Jinja2 template.

The figures are embedded as base64 data URIs, so the page is one file that opens from
disk (or an e-mail) without a server; the CSV tables are linked by relative path.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import jinja2

from . import summary
from .store import write_atomic

_ENV = jinja2.Environment(loader=jinja2.PackageLoader("batchnorm.lab", "templates"),
                          autoescape=jinja2.select_autoescape(["html"]), undefined=jinja2.StrictUndefined)


def fmt(value: Any) -> str:
    """A metric for the page: floats with 4 significant digits, lists and dicts as compact JSON
    of such floats (never cut)."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(_rounded(value), separators=(", ", ": "), default=str)
    return "n/a" if value is None else str(value)


def _rounded(value: Any) -> Any:
    """``value`` with every float rounded to 4 significant digits."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def holds(value: bool | None) -> str:
    """A condition's outcome in words: held, failed or undecided."""
    return {True: "held", False: "failed", None: "undecided"}[value]


_ENV.filters["fmt"] = fmt
_ENV.filters["holds"] = holds


def data_uri(path: Path) -> str:
    """The PNG file ``path`` as a data URI."""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def render(results: dict[str, Any], out: Path) -> str:
    """The report's HTML for ``results``; figure paths are read relative to ``out``."""
    figures = {f: data_uri(out / f) for claim in results["claims"] for f in claim["figures"]}
    counts = summary.counts(results["claims"])
    return _ENV.get_template("report.html").render(r=results, figures=figures, counts=counts)


def write(results: dict[str, Any], out: Path) -> Path:
    """Write ``out/index.html`` atomically; returns its path."""
    path = Path(out) / "index.html"
    write_atomic(path, render(results, Path(out)))
    return path
