"""The lab's findings as a Markdown table, made from a results.json (never typed in by hand).

``markdown_table(results)`` gives one row per claim (claim, what was measured, verdict)
under a line that names the command which reproduces the numbers; ``replace_block(text,
block)`` puts such a block between the ``<!-- lab-results:start -->`` and
``<!-- lab-results:end -->`` markers of a README (``scripts/readme_table.py`` does both).
"""

from __future__ import annotations

from typing import Any

START, END = "<!-- lab-results:start -->", "<!-- lab-results:end -->"
MEASURED_LIMIT = 260  # characters of a claim's summary in the table (the report has all of it)
VERDICT_MARK = {"supported": "supported", "not supported": "**not supported**", "inconclusive": "*inconclusive*"}


def _cell(text: str, limit: int | None = None) -> str:
    """``text`` as one Markdown table cell: one line, pipes escaped, at most about ``limit``
    characters (cut after the last "; " or ", " that fits, marked with an ellipsis)."""
    text = " ".join(str(text).split())
    if limit is not None and len(text) > limit:
        head = text[:limit]
        cut = max(head.rfind("; "), head.rfind(", "))
        text = (head[:cut] if cut > limit // 2 else head.rsplit(" ", 1)[0]) + " …"
    return text.replace("|", "\\|")


def markdown_table(results: dict[str, Any]) -> str:
    """The table of ``results`` (the contents of a results.json), with its provenance line."""
    claims = results.get("claims")
    if not claims:
        raise ValueError("results.json has no claims: expected the output of `batchnorm lab` with at least one experiment")
    data = results.get("data", {})
    counts = {v: sum(c["verdict"] == v for c in claims) for v in VERDICT_MARK}
    seeds = sorted({len(c.get("seeds", [])) for c in claims})
    minutes = results.get("seconds", 0.0) / 60
    reused = results.get("runs_reused", 0)
    timing = f"{minutes:.0f} min on {results.get('machine', {}).get('cpus', '?')} CPUs"
    if reused:
        timing += (f", {reused} of {reused + results.get('runs_trained', 0)} training runs taken from the "
                   "run store (shared between experiments, or left by an earlier invocation)")
    lines = [
        f"Measured by `{results.get('command', 'batchnorm lab')}` (profile {results.get('profile', '?')}, "
        f"data {data.get('name', '?')}, {'-'.join(map(str, [seeds[0], seeds[-1]] if len(seeds) > 1 else seeds))} "
        f"seeds per experiment, {timing}); "
        f"{counts['supported']} supported, {counts['not supported']} not supported, "
        f"{counts['inconclusive']} inconclusive. Full numbers and figures: the run's index.html.",
        "",
        "| Claim | Measured | Verdict |",
        "|---|---|---|",
    ]
    for c in claims:
        if c["verdict"] not in VERDICT_MARK:
            raise ValueError(f"claim {c['id']}: verdict {c['verdict']!r}, expected one of {tuple(VERDICT_MARK)}")
        lines.append(f"| {_cell(c['id'])} {_cell(c['title'])} | {_cell(c['summary'], MEASURED_LIMIT)} | "
                     f"{VERDICT_MARK[c['verdict']]} |")
    return "\n".join(lines) + "\n"


def replace_block(text: str, block: str) -> str:
    """``text`` with everything between the START and END markers replaced by ``block``."""
    if text.count(START) != 1 or text.count(END) != 1:
        raise ValueError(f"expected exactly one {START} and one {END} marker, found "
                         f"{text.count(START)} and {text.count(END)}")
    if text.index(END) < text.index(START):
        raise ValueError(f"the {END} marker comes before {START}")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{block.rstrip()}\n{END}{tail}"
