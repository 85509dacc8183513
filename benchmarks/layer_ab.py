"""A/B of one BN layer's training step between this tree and another commit: how much a
change to the per-call code moved the layer against torch.nn.

The other commit's ``src/`` is unpacked into a temporary folder (``git archive``). Child
processes then alternate between the two trees (base, this, base, this, ...); each runs
``compile_step.layer_steps`` at one shape (our layer and torch.nn's, eager and compiled,
forward + backward of ``y.backward(dy)``, in turn, the order reversed every other round)
and reports the medians and the ratio torch.nn eager / ours eager, so that each ratio
comes from one process and the machine's drift between processes cancels in it.

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        .venv/bin/python benchmarks/layer_ab.py --base HEAD~1 --shape 8x1024x14x14

The first child of a tree compiles its numba kernels (its cache lives in the unpacked
folder), outside the timed rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_CHILD = r"""
import json, sys
import torch
sys.path.insert(0, sys.argv[4])
import compile_step
torch.set_num_threads(int(sys.argv[3]))
times = compile_step.layer_steps(tuple(int(s) for s in sys.argv[1].split("x")), int(sys.argv[2]))
print(json.dumps({name: t["wall"] for name, t in times.items() if not name.startswith("paired")}))
"""


def unpack(rev: str, into: Path) -> Path:
    """``rev``'s ``src/`` under ``into``."""
    archive = subprocess.run(["git", "archive", rev, "src"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    tar = into / "src.tar"
    tar.write_bytes(archive)
    with tarfile.open(tar) as t:
        t.extractall(into, filter="data")
    return into / "src"


def child(src: Path, shape: str, rounds: int, threads: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run([sys.executable, "-c", _CHILD, shape, str(rounds), str(threads),
                           str(ROOT / "benchmarks")],
                          env=env, capture_output=True, text=True, check=True, timeout=1800)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the commit to compare with")
    parser.add_argument("--shape", default="8x1024x14x14")
    parser.add_argument("--processes", type=int, default=6, help="children per tree")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write every child's medians here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"base": unpack(args.base, Path(tmp)), "this": ROOT / "src"}
        results: dict[str, list[dict[str, float]]] = {"base": [], "this": []}
        for i in range(args.processes):
            for name in ("base", "this") if i % 2 == 0 else ("this", "base"):
                start = time.perf_counter()
                medians = child(trees[name], args.shape, args.rounds, args.threads)
                results[name].append(medians)
                ratio = medians["torch.nn eager"] / medians["batchnorm eager"]
                print(f"{name} {i + 1}: ours {medians['batchnorm eager'] * 1e3:.3f} ms, "
                      f"torch.nn {medians['torch.nn eager'] * 1e3:.3f} ms, ratio {ratio:.3f} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
    summary = {}
    for name, runs in results.items():
        ratios = [r["torch.nn eager"] / r["batchnorm eager"] for r in runs]
        summary[name] = {"median": statistics.median(ratios), "min": min(ratios),
                         "max": max(ratios)}
        print(f"{name}: torch.nn eager / ours eager, median {summary[name]['median']:.3f} "
              f"(range {summary[name]['min']:.3f}-{summary[name]['max']:.3f}, "
              f"{len(ratios)} processes)")
    change = summary["this"]["median"] / summary["base"]["median"] - 1
    print(f"this vs {args.base}: {change:+.1%} in the median ratio")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"base": args.base, "shape": args.shape, "rounds": args.rounds,
             "threads": args.threads, "runs": results, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
