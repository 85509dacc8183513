"""The Triton backend's two reduction paths side by side (benchmarks/gpu/README.md, "The
two reduction paths").

Usage: ``python benchmarks/gpu/compare_paths.py OUTDIR``. Reads ``bench-split.json``,
``bench-whole.json`` and, if present, ``bench-auto.json`` (``batchnorm.bench_gpu --out``
runs with ``BATCHNORM_TRITON_PATH`` set to each), pairs their rows by (shape, layout,
dtype, op), writes ``OUTDIR/paths.json`` and prints a markdown table: the Triton time of
each path, ``split / whole`` (above 1: the whole-channel path is faster), elements per
channel (the crossover's first variable) and ``auto / best`` (above 1: the choice missed
the faster path by that factor), sorted by elements per channel.
"""

from __future__ import annotations

import json
import math
import os
import sys

PATHS = ("split", "whole", "auto")


def _rows(outdir: str, path: str) -> dict | None:
    name = os.path.join(outdir, f"bench-{path}.json")
    if not os.path.exists(name):
        return None
    with open(name) as f:
        result = json.load(f)
    forced = result.get("tuning", {}).get("path")
    if forced != path:
        raise ValueError(f"{name}: expected a run with BATCHNORM_TRITON_PATH={path}, got "
                         f"tuning.path={forced!r}; rerun bench_gpu with that variable")
    return {(r["shape"], r["layout"], r["dtype"], r["op"]): r["ours_ms"]
            for r in result["rows"] if "ours_ms" in r}


def per_channel(shape: str) -> int:
    """Elements per channel of an 'NxCxHxW' shape: N * H * W."""
    dims = [int(d) for d in shape.split("x")]
    return dims[0] * math.prod(dims[2:])


def compare(outdir: str) -> list[dict]:
    runs = {path: _rows(outdir, path) for path in PATHS}
    for path in ("split", "whole"):
        if runs[path] is None:
            raise FileNotFoundError(f"{outdir}/bench-{path}.json is missing: run "
                                    f"BATCHNORM_TRITON_PATH={path} python -m batchnorm.bench_gpu "
                                    f"--out {outdir}/bench-{path}.json")
    table = []
    for key in runs["split"].keys() & runs["whole"].keys():
        split_ms, whole_ms = runs["split"][key], runs["whole"][key]
        row = dict(zip(("shape", "layout", "dtype", "op"), key), per_channel=per_channel(key[0]),
                   split_ms=split_ms, whole_ms=whole_ms, split_over_whole=split_ms / whole_ms)
        auto = (runs["auto"] or {}).get(key)
        if auto is not None:
            row.update(auto_ms=auto, auto_over_best=auto / min(split_ms, whole_ms))
        table.append(row)
    table.sort(key=lambda r: (r["op"], r["layout"], r["per_channel"], r["shape"], r["dtype"]))
    return table


def markdown(table: list[dict]) -> str:
    lines = ["| op | shape | layout | dtype | per channel | split ms | whole ms | split / whole "
             "| auto / best |", "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in table:
        auto = f"{r['auto_over_best']:.2f}" if "auto_over_best" in r else "-"
        lines.append(f"| {r['op']} | {r['shape']} | {r['layout']} | {r['dtype']} | "
                     f"{r['per_channel']} | {r['split_ms']:.3f} | {r['whole_ms']:.3f} | "
                     f"{r['split_over_whole']:.2f} | {auto} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python benchmarks/gpu/compare_paths.py OUTDIR", file=sys.stderr)
        return 2
    table = compare(args[0])
    with open(os.path.join(args[0], "paths.json"), "w") as f:
        json.dump(table, f, indent=1)
    print(markdown(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
