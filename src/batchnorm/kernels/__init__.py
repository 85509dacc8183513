"""Compute backends behind one interface (``interface.Backend``).

A backend is a module with the members of ``interface.Backend``: ``name``, ``OPS`` (the
operations it implements), ``supports(x)`` (it can run on ``x``), ``prefers(op, x)`` (it
is the fastest choice there, measured by ``batchnorm bench``) and what it does itself
(``records_autograd``, ``blends_running``). ``pick(op, x)`` takes the first backend, in
order of preference, that implements ``op`` and supports ``x`` (in ``auto`` mode: prefers
it); the pure-torch backend closes every list, so a call never fails for want of a
kernel. ``batchnorm.plan`` calls ``pick`` once per BN call.

Choosing by hand::

    batchnorm.kernels.set_backend("torch")      # force the pure-torch path everywhere
    with batchnorm.kernels.use_backend("cpu"):  # or only inside a block
        ...

``"auto"`` (the default, or the environment variable ``BATCHNORM_BACKEND``) uses, on CPU,
the fused numba kernels where they beat PyTorch (channel-major tensors of moderate and
large size), PyTorch's own ATen kernels for the other float32/float64 training calls and
BN + activation calls (``native``), and the pure-torch backend for the rest (half types,
eval with autograd); on CUDA, ATen's (cuDNN) kernels for plain BN (torch.nn's own call,
every float dtype) and the Triton kernels for BN + activation.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator
from types import ModuleType

from torch import Tensor

from . import torch_backend

BACKENDS = ("auto", "torch", "cpu", "native", "triton")
_OPTIONAL = {
    "cpu": "batchnorm.kernels.cpu.backend",
    "native": "batchnorm.kernels.native_backend",
    "triton": "batchnorm.kernels.triton.backend",
}
_loaded: dict[str, ModuleType | None] = {"torch": torch_backend}
_choice = os.environ.get("BATCHNORM_BACKEND", "auto")


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: expected one of {BACKENDS}")
    return name


def load(name: str) -> ModuleType | None:
    """The backend module ``name``, or None when its optional dependency is missing."""
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(_OPTIONAL[name])
        except ImportError:
            _loaded[name] = None
    return _loaded[name]


def set_backend(name: str) -> None:
    """Choose the backend for every later call: "auto", "torch", "cpu" or "triton"."""
    global _choice
    _choice = _check(name)


def get_backend() -> str:
    """The backend choice in force."""
    return _choice


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Within the block, use backend ``name`` (falling back to torch where it does not apply)."""
    global _choice
    previous, _choice = _choice, _check(name)
    try:
        yield
    finally:
        _choice = previous


def _preference(cuda: bool) -> tuple[str, ...]:
    if _choice != "auto":
        return (_choice,)
    # CUDA: ATen's (cuDNN) plain BN first, measured faster than the Triton kernels at
    # almost every layer shape (native_backend); Triton for the rest (BN + activation)
    return ("native", "triton") if cuda else ("cpu", "native")


#: (choice, op, cuda) -> the candidate backends of ``pick`` in order. Built once per key:
#: ``pick`` runs on every call, so it does no imports of its own.
_candidates: dict[tuple[str, str, bool], tuple[ModuleType, ...]] = {}


def _listed(op: str, cuda: bool) -> tuple[ModuleType, ...]:
    key = (_choice, op, cuda)
    listed = _candidates.get(key)
    if listed is None:
        backends = (load(name) for name in _preference(cuda))
        listed = _candidates[key] = tuple(
            backend for backend in backends if backend is not None and op in backend.OPS
        )
    return listed


def pick(op: str, x: Tensor) -> ModuleType:
    """The backend that runs kernel function ``op`` on tensor ``x``: in ``auto`` mode the
    first that prefers it (a backend prefers only tensors it supports), with a forced
    backend the first that supports it, else the pure-torch one."""
    auto = _choice == "auto"
    for backend in _listed(op, x.is_cuda):
        if backend.prefers(op, x) if auto else backend.supports(x):
            return backend
    return torch_backend


def updater(buffer: Tensor) -> ModuleType | None:
    """The backend whose fused guarded running update (``update_running``: the variance
    recovery, the finite check and both blends in one call, see ``interface.Backend``)
    ``batchnorm.stats`` tries on running buffers like ``buffer``: the first backend in the
    order of preference that implements it (``auto``: the numba kernels on CPU, Triton's
    on CUDA; a forced backend: its own), or None (stats then runs torch operations; the
    pure-torch backend has no fused update). The backend itself declines (returns None)
    buffers it cannot write."""
    listed = _listed("update_running", buffer.is_cuda)
    return listed[0] if listed else None


def call(op: str, *args, **kwargs):
    """Run kernel function ``op``; its first argument (a tensor) guides the choice."""
    return getattr(pick(op, args[0]), op)(*args, **kwargs)


#: The backends' module paths of earlier releases (``batchnorm.kernels.cpu_backend``):
#: loaded when first asked for, as numba and triton are heavy imports.
_OLD_PATHS = {
    "cpu_backend": "batchnorm.kernels.cpu.backend",
    "cpu_backup": "batchnorm.kernels.cpu.backup",
    "cpu_warmup": "batchnorm.kernels.cpu.warmup",
    "triton_backend": "batchnorm.kernels.triton.backend",
}


def __getattr__(name: str) -> ModuleType:
    if name not in _OLD_PATHS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(_OLD_PATHS[name])
    sys.modules[f"{__name__}.{name}"] = module
    return module


def running_backup():
    """A new ``cpu_backup.RunningBackup`` for a layer (the non-finite guard of the
    running buffers that ATen updates in place), or None where numba is missing."""
    try:
        from .cpu.backup import RunningBackup
    except ImportError:
        return None
    return RunningBackup()
