"""What users see: one training step of a whole model with torch.nn's BatchNorm layers and
with batchnorm's (``batchnorm.from_torch``), step time and peak memory (issue 19, step 3).

Usage (repository root)::

    PYTHONPATH=src python benchmarks/gpu/model_step.py --device cuda --out OUT/model_step.json
    PYTHONPATH=src python benchmarks/gpu/model_step.py --device cpu --small --out /tmp/ms.json

The step: SGD (momentum 0.9) on cross-entropy with random labels, input and model in
channels_last, the forward under bfloat16 autocast, ``zero_grad(set_to_none=True)``.
Each configuration (model, BN implementation, eager or ``torch.compile``) builds the model
from the same seed (same initial weights for torch.nn and ours), runs ``--warmup`` steps
(the first one compiles) and times ``--steps`` more, one by one (CUDA events on CUDA,
wall clock on CPU). Reported per configuration: the median step time, images per second,
the first step's wall time (compilation included), the first and last losses, the CUDA
peak memory over the timed steps (``torch.cuda.max_memory_allocated`` after a reset) and
the memory held before them (weights, optimizer state), how many BatchNorm layers the
model has and how many ``from_torch`` converted, and torch.compile's graph count and
graph breaks.

Models: ResNet-50 (BatchNorm2d + ReLU) and CSPDarkNet-53 (timm's BatchNormAct2d with
leaky ReLU, the layers batchnorm's memory-saving BatchNormAct2d stands in for), batch 64 at
224x224, from timm (torchvision for ResNet-50 when timm is missing). Where neither can be
imported, and always with ``--small``, small stand-ins defined here (conv + BN + ReLU /
leaky ReLU); the log and the JSON say which model ran (``source``).

Every configuration is run in a try block: a failure is recorded (``error``) and the next
one runs. The JSON file is rewritten after each configuration, so a run stopped from
outside keeps what it measured. ``--budget-s``: a configuration is not started when less
time is left than it needs at least (eager 15 s, compiled 60 s); it is listed in
``left_out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from torch import nn

import batchnorm

MODELS = ("resnet50", "cspdarknet53")
IMPLS = ("torch.nn", "batchnorm")
# (model, mode) in the order they run: eager first (cheap), compiled last.
PLAN = [("resnet50", "eager"), ("cspdarknet53", "eager"), ("resnet50", "compile"),
        ("cspdarknet53", "compile")]
MIN_SECONDS = {"eager": 15.0, "compile": 60.0}


def log(msg: str) -> None:
    print(f"[model_step {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- models ---------------------------------------------------------------------------


def _conv_bn_act(cin: int, cout: int, stride: int, act: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         act)


class SmallNet(nn.Module):
    """A small stand-in: 4 conv + BatchNorm2d + activation blocks (ReLU for ResNet-50,
    leaky ReLU 0.01 for CSPDarkNet-53), global pooling, a linear classifier."""

    def __init__(self, leaky: bool, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()

        def act():
            return nn.LeakyReLU(0.01, inplace=True) if leaky else nn.ReLU(inplace=True)

        w = width
        self.features = nn.Sequential(
            _conv_bn_act(3, w, 2, act()), _conv_bn_act(w, w, 1, act()),
            _conv_bn_act(w, 2 * w, 2, act()), _conv_bn_act(2 * w, 2 * w, 1, act()),
        )
        self.head = nn.Linear(2 * w, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def build(name: str, small: bool) -> tuple[nn.Module, str]:
    """(model, source): the model ``name`` from timm (or torchvision), else SmallNet."""
    if small:
        return SmallNet(leaky=name == "cspdarknet53"), "small stand-in (--small)"
    try:
        import timm

        return timm.create_model(name, pretrained=False), f"timm {timm.__version__}"
    except Exception as e:  # noqa: BLE001  timm missing, or its torchvision import broken
        reason = f"{type(e).__name__}: {e}"
        log(f"timm not usable ({reason[:200]})")
    if name == "resnet50":
        try:
            import torchvision

            return torchvision.models.resnet50(), f"torchvision {torchvision.__version__}"
        except Exception as e:  # noqa: BLE001
            log(f"torchvision not usable ({type(e).__name__}: {str(e)[:200]})")
    log(f"{name}: falling back to the driver's small stand-in model (SmallNet), not {name}")
    return SmallNet(leaky=name == "cspdarknet53"), "small stand-in (timm/torchvision missing)"


def _ours(m: nn.Module) -> bool:
    return type(m).__module__.split(".")[0] == "batchnorm"


def count_bn(model: nn.Module) -> dict:
    """How many BatchNorm layers ``model`` has (``batchnorm.is_batchnorm``), how many are
    batchnorm's, and the class names of the rest."""
    found = [m for m in model.modules() if batchnorm.is_batchnorm(m)]
    ours = [m for m in found if _ours(m)]
    others = sorted({type(m).__module__ + "." + type(m).__qualname__
                     for m in found if not _ours(m)})
    return dict(bn_layers=len(found), converted=len(ours), not_converted_types=others,
                ours_types=sorted({type(m).__name__ for m in ours}))


# --- one configuration --------------------------------------------------------------------


class _Clock:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time_ms(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def _dynamo_counts() -> dict:
    from torch._dynamo.utils import counters

    return dict(unique_graphs=int(counters["stats"]["unique_graphs"]),
                graph_breaks=int(sum(counters["graph_break"].values())),
                graph_break_reasons=sorted(counters["graph_break"])[:10])


def run_config(model_name: str, impl: str, mode: str, args, device: torch.device) -> dict:
    """Build, (convert,) (compile,) warm up and time one configuration; the result row."""
    row = dict(model=model_name, impl=impl, mode=mode, batch=args.batch, size=args.size,
               device=str(device))
    torch.manual_seed(0)
    model, source = build(model_name, args.small)
    row["source"] = source
    if impl == "batchnorm":
        model = batchnorm.from_torch(model)
    row.update(count_bn(model))
    model = model.to(device, memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(
        device, memory_format=torch.channels_last)
    with torch.no_grad():
        model.eval()
        num_classes = model(x[:2]).shape[1]
        model.train()
    y = torch.randint(0, num_classes, (args.batch,), generator=gen).to(device)
    if mode == "compile":
        torch._dynamo.reset()
        from torch._dynamo.utils import counters

        counters.clear()
        step_model = torch.compile(model)
    else:
        step_model = model
    losses = []

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(step_model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    clock = _Clock(device)
    t0 = time.perf_counter()
    step()
    clock.sync()
    row["first_step_s"] = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        step()
    clock.sync()
    if clock.cuda:
        torch.cuda.reset_peak_memory_stats(device)
        row["held_mib"] = torch.cuda.memory_allocated(device) / 2**20
    times = [clock.time_ms(step) for _ in range(args.steps)]
    row["step_ms"] = statistics.median(times)
    row["step_ms_all"] = [round(t, 3) for t in times]
    row["images_per_s"] = args.batch / (row["step_ms"] / 1e3)
    if clock.cuda:
        row["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    loss_values = [float(v) for v in losses]
    row["first_loss"], row["last_loss"] = loss_values[0], loss_values[-1]
    row["losses_finite"] = all(map(lambda v: v == v and abs(v) != float("inf"), loss_values))
    if mode == "compile":
        row.update(_dynamo_counts())
    row["ok"] = True
    return row


# --- the plan -----------------------------------------------------------------------------


def summary(runs: list[dict]) -> dict:
    """The runs against issue 19's targets: ResNet-50 step with batchnorm's layers at least
    as fast as with torch.nn's (eager and compiled); CSPDarkNet-53 with batchnorm's layers
    at a lower peak memory; the first losses agree (same weights, same batch)."""

    def get(model, impl, mode):
        for r in runs:
            if (r["model"], r["impl"], r["mode"]) == (model, impl, mode) and r.get("ok"):
                return r
        return None

    out = {}
    for model in MODELS:
        for mode in ("eager", "compile"):
            nn_run, ours = get(model, "torch.nn", mode), get(model, "batchnorm", mode)
            if nn_run is None or ours is None:
                out[f"{model} {mode}"] = "missing (failed, left out or not planned)"
                continue
            entry = dict(
                source=ours["source"],
                step_ms_nn=nn_run["step_ms"], step_ms_ours=ours["step_ms"],
                speedup=nn_run["step_ms"] / ours["step_ms"],
                converted=f"{ours['converted']}/{ours['bn_layers']}",
                first_loss_rel_diff=abs(ours["first_loss"] - nn_run["first_loss"])
                / max(abs(nn_run["first_loss"]), 1e-12),
            )
            if "peak_mib" in ours and "peak_mib" in nn_run:
                entry.update(peak_mib_nn=nn_run["peak_mib"], peak_mib_ours=ours["peak_mib"],
                             peak_ratio=ours["peak_mib"] / nn_run["peak_mib"])
            out[f"{model} {mode}"] = entry

    def ok(key, test):
        entry = out.get(key)
        return test(entry) if isinstance(entry, dict) else None

    out["targets"] = {
        "resnet50 eager at least as fast as torch.nn": ok(
            "resnet50 eager", lambda e: e["speedup"] >= 1.0),
        "resnet50 compiled at least as fast as torch.nn": ok(
            "resnet50 compile", lambda e: e["speedup"] >= 1.0),
        "cspdarknet53 eager lower peak memory than torch.nn": ok(
            "cspdarknet53 eager", lambda e: e["peak_ratio"] < 1.0 if "peak_ratio" in e else None),
        # bf16 autocast, same weights and batch: the first losses agree to ~1e-2
        "first losses agree (rel. diff < 2e-2)": all(
            ok(k, lambda e: e["first_loss_rel_diff"] < 2e-2) is not False for k in list(out)),
    }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--small", action="store_true",
                        help="small stand-in models, batch 4 at 32x32, 1 warm-up + 2 steps")
    parser.add_argument("--batch", type=int, default=None, help="default 64 (--small: 4)")
    parser.add_argument("--size", type=int, default=None, help="default 224 (--small: 32)")
    parser.add_argument("--warmup", type=int, default=None, help="default 3 (--small: 1)")
    parser.add_argument("--steps", type=int, default=None, help="default 20 (--small: 2)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--modes", nargs="+", default=["eager", "compile"],
                        choices=["eager", "compile"])
    parser.add_argument("--budget-s", type=float, default=None)
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    small = args.small
    args.batch = args.batch or (4 if small else 64)
    args.size = args.size or (32 if small else 224)
    args.warmup = max(1, args.warmup or (1 if small else 3))
    args.steps = args.steps or (2 if small else 20)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        log("--device cuda but torch.cuda.is_available() is False: nothing to run")
        return 2
    start = time.monotonic()
    meta = dict(torch=torch.__version__, python=sys.version.split()[0], device=(
        torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
        backend=batchnorm.kernels.get_backend(), batch=args.batch, size=args.size,
        warmup=args.warmup, steps=args.steps)
    runs: list[dict] = []
    left_out: list[str] = []

    def write() -> None:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dict(meta=meta, runs=runs, left_out=left_out, summary=summary(runs)), f,
                      indent=1)
        os.replace(tmp, args.out)

    for model_name, mode in PLAN:
        if model_name not in args.models or mode not in args.modes:
            continue
        for impl in IMPLS:
            name = f"{model_name} {impl} {mode}"
            left = None if args.budget_s is None else args.budget_s - (time.monotonic() - start)
            if left is not None and left < MIN_SECONDS[mode]:
                log(f"{name}: left out ({left:.0f} s left, needs at least {MIN_SECONDS[mode]:.0f})")
                left_out.append(name)
                continue
            log(f"{name}: start")
            t0 = time.monotonic()
            try:
                row = run_config(model_name, impl, mode, args, device)
            except Exception as e:  # noqa: BLE001  recorded, and the next one runs
                row = dict(model=model_name, impl=impl, mode=mode, ok=False,
                           error=f"{type(e).__name__}: {e}"[:2000],
                           traceback=traceback.format_exc()[-4000:])
                log(f"{name}: FAILED {row['error'][:300]}")
            row["wall_s"] = time.monotonic() - t0
            runs.append(row)
            if row.get("ok"):
                log(f"{name}: {row['step_ms']:.1f} ms/step, {row['images_per_s']:.0f} img/s, "
                    f"peak {row.get('peak_mib', float('nan')):.0f} MiB, first step "
                    f"{row['first_step_s']:.1f} s, BN converted {row['converted']}/"
                    f"{row['bn_layers']}, loss {row['first_loss']:.4f} -> {row['last_loss']:.4f}"
                    f" ({row['source']})")
            write()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    write()
    log(json.dumps(summary(runs), indent=1))
    return 0 if all(r.get("ok") for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
