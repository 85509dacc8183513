"""Step 4 of the GPU check: one summary of the steps' results against issue 19's targets.

Usage: ``python benchmarks/gpu/summarize.py OUTDIR STEPS_TSV``. Reads what the steps wrote
in OUTDIR (env.json, tests.xml, bench.json, model_step.json; any may be missing) and the
step table (number, name, exit code, seconds, limit per line), writes OUTDIR/summary.json
and OUTDIR/summary.md, and prints the markdown.
"""

from __future__ import annotations

import json
import os
import sys
import xml.etree.ElementTree as ET


def _load(path: str):
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        return {"unreadable": f"{type(e).__name__}: {e}"}


def tests_summary(path: str) -> dict | None:
    """Counts of the JUnit XML report and the failing tests with the start of their message."""
    if not os.path.exists(path):
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        return {"unreadable": str(e)}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites)
              for k in ("tests", "failures", "errors", "skipped")}
    counts["time_s"] = round(sum(float(s.get("time", 0)) for s in suites), 1)
    failed, skipped = [], []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        for tag in ("failure", "error"):
            node = case.find(tag)
            if node is not None:
                text = (node.get("message") or node.text or "").strip()
                failed.append(f"{name} [{tag}]: {text[:400]}")
        node = case.find("skipped")
        if node is not None:
            skipped.append(f"{name}: {(node.get('message') or '')[:200]}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed"] = failed[:60]
    counts["skipped_reasons"] = sorted(set(s.split(": ", 1)[-1] for s in skipped))[:10]
    return counts


def steps_table(path: str) -> list[dict]:
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) == 5:
                    num, name, rc, took, limit = parts
                    rc_i = int(rc)
                    rows.append(dict(step=int(num), name=name, exit=rc_i, seconds=int(took),
                                     limit=int(limit),
                                     status="ok" if rc_i == 0 else
                                     "timed out" if rc_i in (124, 137) else "failed"))
    return rows


def markdown(summary: dict) -> str:
    lines = ["# GPU check summary", ""]
    env = summary.get("env") or {}
    lines.append(f"Device: {env.get('gpu', 'no GPU')}; torch {env.get('torch')}; "
                 f"triton {(env.get('packages') or {}).get('triton')}; "
                 f"timm {(env.get('packages') or {}).get('timm')}")
    lines += ["", "| step | name | status | s | limit |", "|---|---|---|---:|---:|"]
    for s in summary["steps"]:
        lines.append(f"| {s['step']} | {s['name']} | {s['status']} (exit {s['exit']}) | "
                     f"{s['seconds']} | {s['limit']} |")
    probes = env.get("probes") or {}
    bad = {k: v for k, v in probes.items() if str(v).startswith("FAILED")}
    lines += ["", f"Compatibility probes: {len(probes) - len(bad)}/{len(probes)} ok"]
    lines += [f"- {k}: {v}" for k, v in bad.items()]
    t = summary.get("tests")
    if t and "tests" in t:
        lines += ["", f"Tests: {t['passed']} passed, {t['failures']} failed, {t['errors']} "
                      f"errors, {t['skipped']} skipped ({t['time_s']} s)"]
        lines += [f"- {f}" for f in t["failed"][:20]]
    b = summary.get("bench")
    if b:
        lines += ["", f"Kernels: {b.get('rows')} rows, {b.get('left_out')} cases left out, "
                      f"copy {b.get('copy_gbps') or 0:.0f} GB/s"]
        for op, v in b.items():
            if isinstance(v, dict) and "median_speedup" in v:
                lines.append(f"- {op}: median speed-up {v['median_speedup']:.2f}x (min "
                             f"{v['min_speedup']:.2f}x), median {v['median_pct_of_bound']:.0f}% "
                             f"of copy, {len(v['slower_than_native'])} slower than native")
        lines += [f"- target {k}: {v}" for k, v in (b.get("targets") or {}).items()]
    m = summary.get("model_step")
    if m:
        lines.append("")
        lines.append("Model step (torch.nn vs batchnorm):")
        for k, v in m.items():
            if k == "targets":
                continue
            if isinstance(v, dict):
                mem = (f", peak {v['peak_mib_nn']:.0f} -> {v['peak_mib_ours']:.0f} MiB"
                       if "peak_mib_nn" in v else "")
                lines.append(f"- {k}: {v['step_ms_nn']:.1f} -> {v['step_ms_ours']:.1f} ms "
                             f"({v['speedup']:.2f}x){mem}, converted {v['converted']}, "
                             f"{v['source']}")
            else:
                lines.append(f"- {k}: {v}")
        lines += [f"- target {k}: {v}" for k, v in (m.get("targets") or {}).items()]
        for r in summary.get("model_step_failures", []):
            lines.append(f"- FAILED {r}")
    p = summary.get("profile")
    if p:
        lines += ["", f"Layer profile ({'x'.join(map(str, p['shape']))} {p['dtype']} "
                      f"{p['layout']}, fwd+bwd per call):"]
        for name, r in p["layers"].items():
            lines.append(f"- {name}: host {r['host_ms_per_call']:.3f} ms, wall "
                         f"{r['wall_ms_per_call']:.3f} ms, device "
                         f"{r['device_ms_per_call']:.3f} ms")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    out, steps = argv[0], argv[1]
    bench = _load(os.path.join(out, "bench.json"))
    model = _load(os.path.join(out, "model_step.json"))
    summary = dict(
        steps=steps_table(steps),
        env=_load(os.path.join(out, "env.json")),
        tests=tests_summary(os.path.join(out, "tests.xml")),
        bench=None if bench is None else dict(
            bench.get("summary", {}), complete=bench.get("complete"),
            seconds=bench.get("seconds")),
        model_step=None if model is None else model.get("summary"),
        model_step_failures=[] if model is None else [
            f"{r['model']} {r['impl']} {r['mode']}: {r.get('error', '')[:300]}"
            for r in model.get("runs", []) if not r.get("ok")],
        model_step_left_out=None if model is None else model.get("left_out"),
        profile=_load(os.path.join(out, "profile.json")),
    )
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    text = markdown(summary)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
