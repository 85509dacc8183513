"""The shape of the package: imports point one way (lab -> library -> kernels) without a
cycle, every backend implements the one interface, and a BN call reaches its kernel
through a handful of the package's frames (docs/design.md draws the path)."""

import ast
import inspect
import pathlib
import sys

import pytest
import torch

import batchnorm
from batchnorm import kernels
from batchnorm.kernels import interface

SRC = pathlib.Path(batchnorm.__file__).parent
#: The command-line layer: the lab and the commands may import the library, never back.
TOP = ("batchnorm.lab", "batchnorm.cli", "batchnorm.bench", "batchnorm.bench_gpu")


def _modules() -> dict[str, tuple[pathlib.Path, bool]]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports, anywhere in its source (inside
    functions too): ``from . import x`` names the submodule x, ``from .m import y`` m."""
    modules = _modules()

    def owner(name: str) -> str:
        while name not in modules:
            name = name.rsplit(".", 1)[0]
        return name

    graph = {}
    for name, (path, is_package) in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {owner(a.name) for a in node.names if a.name.startswith("batchnorm")}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".")[: len(name.split(".")) - node.level + is_package]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not target.startswith("batchnorm"):
                    continue
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    edges.add(full if full in modules else owner(target))
        graph[name] = edges - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_counting_imports_inside_functions():
    assert _cycles(_import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


#: The layers, bottom to top: a module imports only from its own layer or those below.
LAYERS = ("batchnorm.kernels", "batchnorm.core", "batchnorm.variants", "batchnorm.distributed",
          "batchnorm.tools")


def _layer(name: str) -> int:
    for rank, prefix in enumerate(LAYERS):
        if name == prefix or name.startswith(prefix + "."):
            return rank
    return len(LAYERS)  # the package's __init__, the command line, the lab: the top


def test_each_layer_imports_only_from_itself_or_below():
    upward = [
        (name, target) for name, edges in _import_graph().items() for target in edges
        if _layer(target) > _layer(name)
    ]
    assert upward == []


def test_imports_point_one_way_lab_library_kernels():
    graph = _import_graph()
    for name, edges in graph.items():
        if name.startswith("batchnorm.kernels"):
            above = {e for e in edges if not e.startswith("batchnorm.kernels")}
            assert not above, f"{name} (kernels) imports {above} from above"
        elif not name.startswith(TOP) and name != "batchnorm":
            above = {e for e in edges if e.startswith(TOP)}
            assert not above, f"{name} (library) imports {above} from the command layer"


@pytest.mark.parametrize("name", ["torch", "cpu", "native", "triton"])
def test_every_backend_implements_the_interface(name):
    if name == "triton" and "batchnorm.kernels.triton.backend" not in sys.modules:
        # importing it here would build its kernels outside Triton's interpreter, which
        # tests/test_kernels_triton.py sets up before importing it
        pytest.skip("the Triton backend is checked once tests/test_kernels_triton.py loaded it")
    backend = kernels.load(name)
    if backend is None:
        pytest.skip(f"the {name} backend's dependency is not installed")
    assert backend.name == name
    assert backend.OPS <= set(interface.OPERATIONS)
    for member in ("supports", "prefers", "accepts_running", *backend.OPS):
        assert callable(getattr(backend, member)), member
    assert isinstance(backend.records_autograd, bool) and isinstance(backend.blends_running, bool)
    assert isinstance(backend.takes_backup, bool)
    if backend.blends_running:
        assert "forward_train_update" in backend.OPS
    if backend.takes_backup:
        assert "running" in inspect.signature(backend.forward_train).parameters


def test_kernels_number_activations_from_one_table():
    from batchnorm.kernels import activations
    from batchnorm.kernels.cpu import _act as _cpu_act

    assert set(activations.CODES) == set(activations.ACTIVATIONS)
    assert len(set(activations.CODES.values())) == len(activations.CODES)
    assert (_cpu_act.SILU, _cpu_act.GELU) == (activations.CODES["silu"], activations.CODES["gelu"])


def _package_frames_at_first_kernel(run) -> int | None:
    """How many of the package's frames are on the stack when the first compute call
    starts (a numba kernel, whose call numba reports to the profiler, or ATen's batch
    norm op); None when no package frame reaches one (ATen's autograd in C++)."""
    seen = []
    kernel_files = tuple(f"kernels/cpu/_{name}.py"
                         for name in ("address", "nchw", "nhwc", "loops", "params"))
    aten_ops = {"native_batch_norm", "batch_norm", "native_batch_norm_backward"}

    def count(frame) -> int:
        n = 0
        while frame is not None:
            n += pathlib.Path(frame.f_code.co_filename).is_relative_to(SRC)
            frame = frame.f_back
        return n

    def profile(frame, event, arg):
        if seen:
            return
        if event == "call" and frame.f_code.co_filename.endswith(kernel_files):
            seen.append(count(sys._getframe(1)))  # the kernel's callers, not the kernel
        elif event == "c_call" and getattr(arg, "__name__", "") in aten_ops:
            seen.append(count(frame))

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return seen[0] if seen else None


@pytest.mark.parametrize(
    "shape, route", [((8, 64, 32, 32), "cpu"), ((4, 8, 5, 5), "native")],
    ids=["fused-cpu-kernels", "small-tensor-aten"],
)
def test_a_training_step_reaches_its_kernel_through_at_most_six_frames(shape, route):
    from batchnorm.core import plan

    bn = batchnorm.BatchNorm2d(shape[1])
    x = torch.randn(shape, requires_grad=True)
    if route == "cpu" and kernels.load("cpu") is None:
        pytest.skip("numba is not installed")
    with kernels.use_backend("auto"):
        assert plan.train_plan(x, bn.weight, bn.bias).route == route
        bn(x).sum().backward()  # compiled and warm
        forward = _package_frames_at_first_kernel(lambda: bn(x))
        y = bn(x)
        backward = _package_frames_at_first_kernel(lambda: y.sum().backward())
    assert forward is not None and forward <= 6
    if route == "native":  # ATen's autograd records the step: its backward is all C++
        assert backward is None
    else:
        assert backward is not None and backward <= 6
