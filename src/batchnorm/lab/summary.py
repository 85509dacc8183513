"""The lab's findings as a Markdown table, made from a results.json (never typed in by hand).

``markdown_table(results)`` gives one row per claim (claim, the paper's numbers beside
ours, what was measured, the conditions with their estimates and 95% intervals, verdict) under a line that names the
command which reproduces the numbers; findings and property checks are counted apart.
``replace_block(text, block)`` puts such a block between the ``<!-- lab-results:start -->``
and ``<!-- lab-results:end -->`` markers of a README (``scripts/readme_table.py`` does both).
Nothing is cut: a summary's deciding numbers are all in the cell.
"""

from __future__ import annotations

from typing import Any

START, END = "<!-- lab-results:start -->", "<!-- lab-results:end -->"
VERDICT_MARK = {"supported": "supported", "not supported": "**not supported**", "inconclusive": "*inconclusive*"}
HOLDS_MARK = {True: "held", False: "**failed**", None: "*undecided*"}


def _cell(text: str) -> str:
    """``text`` as one Markdown table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def number(value: float | None) -> str:
    """A number with 3 significant digits ("n/a" for None)."""
    return "n/a" if value is None else f"{value:.3g}"


def condition_text(e: dict[str, Any]) -> str:
    """One condition as "text: estimate [low, high] -> held" (a check: "text: value -> held")."""
    interval = "" if e["low"] is None and e["high"] is None else f" [{number(e['low'])}, {number(e['high'])}]"
    return f"{e['condition']}: {number(e['estimate'])}{interval} → {HOLDS_MARK[e['holds']]}"


def counts(claims: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Verdict counts of the findings and of the property checks."""
    return {kind: {v: sum(c["verdict"] == v and c.get("kind", "finding") == kind for c in claims) for v in VERDICT_MARK}
            for kind in ("finding", "check")}


def markdown_table(results: dict[str, Any]) -> str:
    """The table of ``results`` (the contents of a results.json), with its provenance line."""
    claims = results.get("claims")
    if not claims:
        raise ValueError("results.json has no claims: expected the output of `batchnorm lab` with at least one experiment")
    for c in claims:
        if c["verdict"] not in VERDICT_MARK:
            raise ValueError(f"claim {c['id']}: verdict {c['verdict']!r}, expected one of {tuple(VERDICT_MARK)}")
    data = results.get("data", {})
    n = counts(claims)
    seeds = sorted({len(c.get("seeds", [])) for c in claims})
    minutes = results.get("seconds", 0.0) / 60
    reused = results.get("runs_reused", 0)
    timing = f"{minutes:.0f} min on {results.get('machine', {}).get('cpus', '?')} CPUs"
    if reused:
        timing += (f", {reused} of {reused + results.get('runs_trained', 0)} training runs taken from the run store "
                   "(trained by earlier invocations, or shared between experiments)")
    commit = results.get("commit") or {}
    sha = commit.get("sha", "unknown")[:10] + (" with uncommitted changes" if commit.get("dirty") else "")
    f, k = n["finding"], n["check"]
    failed = f", {k['not supported']} failed, {k['inconclusive']} undecided" if k["not supported"] or k["inconclusive"] else ""
    lines = [
        f"Measured by `{results.get('command', 'batchnorm lab')}` (profile {results.get('profile', '?')}"
        f"{', indicative' if results.get('indicative') else ''}, data {data.get('name', '?')} "
        f"(sha256 {str(data.get('sha256', '?'))[:12]}), "
        f"{'-'.join(map(str, [seeds[0], seeds[-1]] if len(seeds) > 1 else seeds))} seed(s) per experiment, commit {sha}, "
        f"{timing}). Findings: {f['supported']} supported, "
        f"{f['not supported']} not supported, {f['inconclusive']} inconclusive; property checks: {k['supported']} passed"
        f"{failed}. Each condition: estimate over "
        "per-seed paired differences (or ratios) [95% interval] → held / failed / undecided. Full numbers and "
        "figures: the run's index.html.",
        "",
        "| Claim | Paper → here | Measured | Conditions | Verdict |",
        "|---|---|---|---|---|",
    ]
    for c in claims:
        conditions = "<br>".join(_cell(condition_text(e)) for e in c.get("evidence", []))
        paper = "<br>".join(_cell(f"{p['setting']}: {p['paper']} → {p['here']}") for p in c.get("paper", []))
        kind = " (check)" if c.get("kind") == "check" else ""
        lines.append(f"| {_cell(c['id'])} {_cell(c['title'])}{kind} | {paper} | {_cell(c['summary'])} | {conditions} | "
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
