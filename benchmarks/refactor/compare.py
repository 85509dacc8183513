"""Old against new code from `batchnorm bench` JSON files of the same run (issue 18).

Each file's rows give our speed-up over torch.nn measured in that run, so a busy moment
of the machine moves both sides; the per-row median over rounds of the old code's and of
the new code's speed-up are compared (new / old: 1.00 means no change).

    python benchmarks/refactor/compare.py [FOLDER]   # bench_old_*.json, bench_new_*.json
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def speedups(folder: Path, name: str) -> dict[tuple[str, ...], list[float]]:
    rows: dict[tuple[str, ...], list[float]] = {}
    for path in sorted(folder.glob(f"bench_{name}_*.json")):
        for row in json.loads(path.read_text())["rows"]:
            key = (row["name"], row["layout"], row["dtype"], row["op"])
            rows.setdefault(key, []).append(row["speedup"])
    return rows


def main(folder: Path) -> None:
    old, new = speedups(folder, "old"), speedups(folder, "new")
    print("| case | layout | dtype | op | speed-up old | speed-up new | new / old |")
    print("|---|---|---|---|---|---|---|")
    ratios = []
    for key, values in old.items():
        if key not in new:
            continue
        a, b = statistics.median(values), statistics.median(new[key])
        ratios.append(b / a)
        print(f"| {' | '.join(key)} | {a:.2f}x | {b:.2f}x | {b / a:.2f} |")
    print(f"\nmedian new / old {statistics.median(ratios):.3f}, lowest {min(ratios):.2f} "
          f"({len(ratios)} rows)")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent))
