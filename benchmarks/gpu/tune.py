"""Sweep the Triton backend's launch tuning (``GPU_TUNING``) on a GPU, one parameter at a
time, and keep what makes the training forward + backward faster (issue 19: the
channels-last kernels run at 0.65x cuDNN in float32, benchmarks/README.md, run 4).

Usage (on the GPU machine, from the repository root; benchmarks/gpu/README.md)::

    PYTHONPATH=src python3 benchmarks/gpu/tune.py --out OUT/tune.json --budget-s 240

Method: for each layout and each reduction path (split, whole: forced through
``Tuning.path``), start from ``GPU_TUNING`` and try every value of one parameter with the
others held (coordinate descent, the parameters in the order of ``PARAMS``); a value is
kept when it lowers the objective by more than ``KEEP`` (2%: below that, the run-to-run
noise of sub-millisecond kernels). The objective is the geometric mean, over the shapes
(ResNet-50's BN inputs at ``--batches``) and ``--dtypes``, of the Triton kernels' time
for one training forward + backward (``forward_train`` then ``backward``; median of
``--reps`` calls with a cold L2 cache, ``bench_gpu``'s timer). A candidate whose output
disagrees with torch's native BN (``bench_gpu.TOL``) or that fails to launch is recorded
and never kept. Triton compiles every new combination of block sizes (seconds each), which
bounds how many candidates a budget allows: ``--budget-s`` stops starting candidates.

Writes after every candidate (a run killed from outside keeps what it measured): the base
and best tuning per (layout, path), and every candidate's per-shape times, from which the
crossover between the paths can be read at the best tunings.

``--dry-run``: on CPU in Triton's interpreter (``TRITON_INTERPRET=1`` set before Python
starts), one tiny shape and two values per parameter, starting from
``INTERPRETER_TUNING``: checks the script, not the speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time

import torch

from batchnorm import bench_gpu

#: Candidate values, per parameter (powers of two where they size a block).
SPACE = {
    "tile": (1024, 2048, 4096, 8192, 16384),
    "num_warps": (2, 4, 8, 16),
    "max_cols_cl": (16, 32, 64, 128, 256),
    "max_cols_ncs": (128, 256, 512, 1024, 2048),
    "programs_per_sm": (1, 2, 4, 8, 16),
    "merge_block": (32, 64, 128),
    "whole_min_cols_cl": (8, 16, 32, 64),
    "whole_fill": (0.5, 1.0, 2.0, 4.0),
}
DRY_SPACE = {
    "tile": (32, 64), "num_warps": (1, 2), "max_cols_cl": (4, 8), "max_cols_ncs": (8, 16),
    "programs_per_sm": (2, 4), "merge_block": (2, 4), "whole_min_cols_cl": (1, 2),
    "whole_fill": (1.0, 2.0),
}
#: The parameters each (layout, path) uses, in the order they are swept.
PARAMS = {
    ("channels_last", "split"): ("max_cols_cl", "tile", "num_warps", "programs_per_sm",
                                 "merge_block"),
    ("channels_last", "whole"): ("whole_min_cols_cl", "whole_fill", "max_cols_cl", "tile",
                                 "num_warps"),
    ("nchw", "split"): ("max_cols_ncs", "tile", "num_warps", "programs_per_sm", "merge_block"),
    ("nchw", "whole"): ("max_cols_ncs", "tile", "num_warps"),
}
KEEP = 0.98  # a candidate is kept below this fraction of the best objective so far


def _cases(device: torch.device, batches, shapes, layout, dtypes):
    torch.manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    for n in batches:
        for c, h, w in shapes:
            for dtype in dtypes:
                x = torch.randn(n, c, h, w, device=device).to(dtype, memory_format=fmt)
                yield (f"{n}x{c}x{h}x{w} {str(dtype).removeprefix('torch.')}", x,
                       torch.randn_like(x), torch.rand(c, device=device) + 0.5,
                       torch.randn(c, device=device))


def evaluate(backend, attr: str, tuning, cases, timer, reps: int) -> dict:
    """Install ``tuning`` as ``backend.<attr>``, time every case; returns the per-case
    times (ms), the objective (geometric mean) or the error that disqualified it."""
    setattr(backend, attr, tuning)
    times = {}
    try:
        for i, (name, x, dy, w, b) in enumerate(cases):
            ours, native = bench_gpu.op_pair("train fwd+bwd", x, w, b, dy)
            if i == 0:  # agreement, once per candidate (the block sizes change the kernels)
                want = native().float()
                err = (ours().float() - want).abs().max().item()
                limit = bench_gpu.TOL[x.dtype] * (1.0 + want.abs().max().item())
                if not err <= limit:
                    return dict(times=times, error=f"disagrees with native at {name}: "
                                f"max |diff| {err:.3g} > {limit:.3g}")
            times[name] = timer.ms(ours, reps, warmup=2)
    except Exception as e:  # noqa: BLE001  recorded; the candidate is never kept
        return dict(times=times, error=f"{type(e).__name__}: {e}"[:500])
    return dict(times=times, objective=math.exp(
        sum(math.log(t) for t in times.values()) / len(times)))


def sweep(args) -> dict:
    from batchnorm import kernels

    backend = kernels.load("triton")
    if backend is None:
        raise SystemExit("tune.py: the Triton backend is not available (triton installed?)")
    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.dry_run and not backend.INTERPRETED:
        raise SystemExit("tune.py --dry-run: set TRITON_INTERPRET=1 before starting Python")
    attr = "INTERPRETER_TUNING" if args.dry_run else "GPU_TUNING"
    space = DRY_SPACE if args.dry_run else SPACE
    shapes = bench_gpu.DRY_RUN_SHAPES if args.dry_run else bench_gpu.RESNET50_SHAPES
    batches = (2,) if args.dry_run else tuple(args.batches)
    dtypes = tuple(getattr(torch, d) for d in args.dtypes)
    base = getattr(backend, attr)
    timer = bench_gpu._Timer(device)
    start = time.monotonic()
    result = dict(device=str(device) if args.dry_run else torch.cuda.get_device_name(),
                  torch=torch.__version__, base=dataclasses.asdict(base), keep=KEEP,
                  batches=batches, dtypes=args.dtypes, reps=args.reps, sweeps={},
                  left_out=[])
    try:
        for layout in args.layouts:
            cases = list(_cases(device, batches, shapes, layout, dtypes))
            for path in ("split", "whole"):
                key = f"{layout} {path}"
                best = dataclasses.replace(base, path=path)
                first = evaluate(backend, attr, best, cases, timer, args.reps)
                entry = dict(base=first, best=dataclasses.asdict(best),
                             best_objective=first.get("objective"), candidates=[])
                result["sweeps"][key] = entry
                for param in PARAMS[(layout, path)]:
                    for value in space[param]:
                        if value == getattr(best, param):
                            continue
                        if time.monotonic() - start > args.budget_s:
                            result["left_out"].append(f"{key}: {param}={value}")
                            continue
                        candidate = dataclasses.replace(best, **{param: value})
                        r = evaluate(backend, attr, candidate, cases, timer, args.reps)
                        r.update(param=param, value=value)
                        entry["candidates"].append(r)
                        objective = r.get("objective")
                        if objective is not None and (entry["best_objective"] is None or
                                                      objective < KEEP * entry["best_objective"]):
                            best = candidate
                            entry.update(best=dataclasses.asdict(best), best_objective=objective,
                                         best_times=r["times"])
                        print(f"[tune +{time.monotonic() - start:.0f}s] {key} {param}={value}: "
                              f"{objective if objective is None else round(objective, 4)} ms "
                              f"(best {entry['best_objective']})", flush=True)
                        _write(args.out, result)
    finally:
        setattr(backend, attr, base)
    result["seconds"] = time.monotonic() - start
    _write(args.out, result)
    return result


def _write(path: str, result: dict) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--layouts", nargs="+", default=["channels_last", "nchw"],
                        choices=["channels_last", "nchw"])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"],
                        choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batches", nargs="+", type=int, default=[32])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--budget-s", type=float, default=240.0)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    result = sweep(args)
    for key, entry in result["sweeps"].items():
        base_obj = entry["base"].get("objective")
        best_obj = entry["best_objective"]
        changed = {k: v for k, v in entry["best"].items() if result["base"].get(k) != v
                   and k != "path"}
        ratio = "" if not (base_obj and best_obj) else f" ({base_obj / best_obj:.2f}x)"
        print(f"{key}: base {base_obj} ms -> best {best_obj} ms{ratio}; changed: {changed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
