"""Training-step time of two CIFAR CNNs with torch.nn's BN and batchnorm's, eager and
under torch.compile (fullgraph=True), in one run; then one BN layer alone at ResNet-50
shapes, forward + backward.

Models (defined here, no download): a CIFAR ResNet-18 (3x3 stem, no max-pool, stages of
64-128-256-512 channels, two basic blocks each) and a CIFAR MobileNetV2 (width 1.0, stem
and first stages at stride 1), batch 32, 3x32x32 input, 10 classes, float32, NCHW. A step
is forward, cross-entropy, backward and an SGD step (the model compiled, the loss,
backward and optimizer step as usual). The four variants of a model (torch.nn eager,
batchnorm eager, torch.nn compiled, batchnorm compiled) start from the same weights and
run in turn, round after round, swapping order every round; medians over the rounds of
the wall-clock time and of the process's CPU time (all threads; on a machine shared with
other loads the CPU time is the steadier of the two). ``ratio`` is torch.nn's time over
batchnorm's (>= 1: batchnorm is as fast or faster); ``paired`` is the median over rounds of
that ratio within a round (the two ran seconds apart, so a load that drifts over the run
cancels).

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        .venv/bin/python benchmarks/compile_step.py --threads 2 --json benchmarks/compile_step.json

Compiling takes minutes on 2 threads (Inductor compiles forward and backward of each of
the four compiled models once).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import batchnorm

Norm = Callable[[int], nn.Module]


# -- models ---------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: Norm):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet18(norm: Norm, classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), norm(64), nn.ReLU()]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride, norm), BasicBlock(cout, cout, 1, norm)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int, norm: Norm):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), norm(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), norm(hidden),
            nn.ReLU6(), nn.Conv2d(hidden, cout, 1, bias=False), norm(cout),
        ]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


def mobilenet_v2(norm: Norm, classes: int = 10) -> nn.Module:
    # (expansion, channels, repeats, stride): torchvision's table, CIFAR strides
    table = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
             (6, 160, 3, 2), (6, 320, 1, 1))
    layers: list[nn.Module] = [nn.Conv2d(3, 32, 3, 1, 1, bias=False), norm(32), nn.ReLU6()]
    cin = 32
    for t, c, n, s in table:
        for i in range(n):
            layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t, norm))
            cin = c
    layers += [nn.Conv2d(cin, 1280, 1, bias=False), norm(1280), nn.ReLU6(),
               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, classes)]
    return nn.Sequential(*layers)


MODELS = {"resnet18": resnet18, "mobilenet_v2": mobilenet_v2}
NORMS: dict[str, Norm] = {"torch.nn": nn.BatchNorm2d, "batchnorm": batchnorm.BatchNorm2d}


# -- timing ---------------------------------------------------------------------------------
def interleaved(
    fns: dict[str, Callable[[], None]], rounds: int, warmup: int
) -> dict[str, dict[str, float]]:
    """Median wall-clock and CPU seconds of each callable over ``rounds``, called in turn
    (order reversed every other round), after ``warmup`` calls each (which compile)."""
    for name, fn in fns.items():
        start = time.perf_counter()
        for _ in range(warmup):
            fn()
        print(f"    warm-up {name}: {time.perf_counter() - start:.1f} s", flush=True)
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            start, start_cpu = time.perf_counter(), time.process_time()
            fns[name]()
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start)
    result = {name: {"wall": statistics.median(wall[name]), "cpu": statistics.median(cpu[name])}
              for name in fns}
    for mode in ("eager", "compiled"):
        theirs, ours = f"torch.nn {mode}", f"batchnorm {mode}"
        if theirs in fns and ours in fns:
            result[f"paired {mode}"] = {
                clock: statistics.median(a / b for a, b in zip(times[theirs], times[ours]))
                for clock, times in (("wall", wall), ("cpu", cpu))
            }
    return result


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def fresh_compiler() -> None:
    """Forget what torch.compile compiled before. Every ``torch.compile(module)`` of torch
    2.13 runs through one wrapper function, whose compile cache is shared: a layer
    compiled after another input size gets a dynamic-shape graph ("automatic dynamic"),
    which is not what a user compiling one model at one shape gets, and the cache holds 8
    entries (``recompile_limit``) before calls fall back to eager. Each model and each
    layer shape here starts from an empty cache (static shapes)."""
    torch._dynamo.reset()


def model_steps(
    name: str, batch: int, rounds: int, warmup: int, modes: list[str]
) -> dict[str, dict[str, float]]:
    fresh_compiler()
    torch.manual_seed(0)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    reference = MODELS[name](NORMS["torch.nn"])
    fns = {}
    for compiled in [mode == "compiled" for mode in modes]:
        for norm_name, norm in NORMS.items():
            model = MODELS[name](norm)
            model.load_state_dict(reference.state_dict())
            model.train()
            run = torch.compile(model, fullgraph=True) if compiled else model
            fns[f"{norm_name} {'compiled' if compiled else 'eager'}"] = train_step(run, x, y)
    return interleaved(fns, rounds, warmup)


def layer_steps(shape: tuple[int, ...], rounds: int) -> dict[str, dict[str, float]]:
    """One BN layer, forward + backward of ``y.backward(dy)``."""
    fresh_compiler()
    x = torch.randn(shape, requires_grad=True)
    dy = torch.randn(shape)
    fns = {}
    for compiled in (False, True):
        for norm_name, norm in NORMS.items():
            layer = norm(shape[1])
            run = torch.compile(layer, fullgraph=True) if compiled else layer

            def fn(run=run):
                run(x).backward(dy)
                x.grad = None

            fns[f"{norm_name} {'compiled' if compiled else 'eager'}"] = fn
    return interleaved(fns, rounds, warmup=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"],
                        choices=["eager", "compiled"])
    parser.add_argument("--layer-rounds", type=int, default=30,
                        help="rounds of the BN layer alone (0: skip it)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {
        "torch": torch.__version__, "threads": args.threads, "batch": args.batch,
        "rounds": args.rounds, "machine": platform.processor() or platform.machine(),
        "loadavg_before": os.getloadavg(), "models": {}, "layers": {},
    }
    rows = []
    for name in args.models:
        print(f"{name}, batch {args.batch}:", flush=True)
        t = model_steps(name, args.batch, args.rounds, args.warmup, args.modes)
        result["models"][name] = t
        for mode in args.modes:
            nn_t, ours, paired = t[f"torch.nn {mode}"], t[f"batchnorm {mode}"], t[f"paired {mode}"]
            rows.append(
                f"| {name} | {mode} | {nn_t['wall'] * 1e3:.1f} | {ours['wall'] * 1e3:.1f} "
                f"| {nn_t['wall'] / ours['wall']:.2f} | {paired['wall']:.2f} "
                f"| {nn_t['cpu'] * 1e3:.1f} | {ours['cpu'] * 1e3:.1f} "
                f"| {nn_t['cpu'] / ours['cpu']:.2f} | {paired['cpu']:.2f} |"
            )
    layer_rows = []
    if args.layer_rounds:
        for shape in ((8, 256, 56, 56), (8, 1024, 14, 14)):
            print(f"BN layer {shape}:", flush=True)
            t = layer_steps(shape, args.layer_rounds)
            result["layers"]["x".join(map(str, shape))] = t
            ne, nc = t["torch.nn eager"]["wall"], t["torch.nn compiled"]["wall"]
            oe, oc = t["batchnorm eager"]["wall"], t["batchnorm compiled"]["wall"]
            layer_rows.append(
                f"| {'x'.join(map(str, shape))} | {ne * 1e3:.2f} | {nc * 1e3:.2f} | {oe * 1e3:.2f} "
                f"| {oc * 1e3:.2f} | {ne / oe:.2f} | {nc / oe:.2f} | {nc / oc:.2f} |"
            )
    result["loadavg_after"] = os.getloadavg()
    print("\n| model | mode | torch.nn ms | batchnorm ms | ratio | paired | torch.nn CPU ms "
          "| batchnorm CPU ms | CPU ratio | CPU paired |\n|---|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    print("\n".join(rows))
    if layer_rows:
        print("\n(wall clock)\n| BN layer (fwd+bwd) | torch.nn eager ms | torch.nn compiled ms | batchnorm eager ms "
              "| batchnorm compiled ms | eager vs eager | eager vs nn compiled | compiled vs compiled |"
              "\n|---|--:|--:|--:|--:|--:|--:|--:|")
        print("\n".join(layer_rows))
    print(f"\nload average before {result['loadavg_before']}, after {result['loadavg_after']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
