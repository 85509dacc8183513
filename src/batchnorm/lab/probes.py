"""Probes: measurements of a model taken at the checkpoints of a training run.

A probe is ``probe(model, data) -> dict`` of JSON-ready numbers. It runs the model in
training mode (batch statistics, as the training steps see it) and leaves it as it found
it: buffers such as running statistics are put back, gradients cleared.
Add one with ``@register_probe("name")``; a run asks for probes by name (``TrainSpec.probes``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from .data import Dataset
from .models import MLP

HELD_OUT = 1000  # examples of the test set that make the fixed held-out batch
SATURATED = 4.0  # a sigmoid unit is saturated when |input| > 4 (sigmoid' < 0.018)

Probe = Callable[[MLP, Dataset], dict]
PROBES: dict[str, Probe] = {}


def register_probe(name: str) -> Callable[[Probe], Probe]:
    """Decorator: register ``probe(model, data) -> dict`` as ``name``."""

    def add(probe: Probe) -> Probe:
        PROBES[name] = probe
        return probe

    return add


def register_with(name: str, probe: Callable[..., dict], **params: object) -> str:
    """Register ``probe(model, data, **params)`` as ``name(key=value,...)`` and return that name.

    The parameters are part of the name, so they are part of a run's spec: runs measured
    with other parameters are stored apart.
    """
    full = f"{name}(" + ",".join(f"{k}={v!r}" for k, v in sorted(params.items())) + ")"
    PROBES[full] = functools.partial(probe, **params)
    return full


@contextlib.contextmanager
def untouched(model: MLP) -> Iterator[None]:
    """Run a probe in training mode; afterwards restore the buffers, the mode and the gradients."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    was_training = model.training
    model.train()
    try:
        yield
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        model.train(was_training)
        model.zero_grad(set_to_none=True)


@register_probe("unit_percentiles")
def unit_percentiles(model: MLP, data: Dataset) -> dict:
    """15th/50th/85th percentiles of each last-hidden-layer activation input on the held-out batch."""
    with untouched(model), torch.no_grad():
        _, zs = model.preactivations(data.x_test[:HELD_OUT])
        q = torch.quantile(zs[-1].double(), torch.tensor([0.15, 0.50, 0.85], dtype=torch.float64), dim=0)
    return {"p15": q[0].tolist(), "p50": q[1].tolist(), "p85": q[2].tolist()}


@register_probe("saturation")
def saturation(model: MLP, data: Dataset) -> dict:
    """Per hidden layer: fraction of activation inputs with |z| > SATURATED on the held-out batch."""
    with untouched(model), torch.no_grad():
        _, zs = model.preactivations(data.x_test[:HELD_OUT])
    return {"fraction": [(z.abs() > SATURATED).double().mean().item() for z in zs]}


@register_probe("grad_norms")
def grad_norms(model: MLP, data: Dataset) -> dict:
    """Per hidden layer: l2 norm of the training loss's gradient w.r.t. the Linear weight.

    The loss is the cross-entropy on the first HELD_OUT training examples.
    """
    with untouched(model):
        loss = F.cross_entropy(model(data.x_train[:HELD_OUT]), data.y_train[:HELD_OUT])
        weights = [block.linear.weight for block in model.blocks]
        grads = torch.autograd.grad(loss, weights)
    return {"weight": [g.norm().item() for g in grads]}
