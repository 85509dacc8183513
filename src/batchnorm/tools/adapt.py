"""Adapt a trained model to new, unlabeled data through its BN layers: AdaBN and TENT.

- AdaBN (Li et al., "Revisiting Batch Normalization for Practical Domain Adaptation",
  2016): the target domain's statistics replace the source's; nothing else changes.
  Here: ``recalibrate`` (exact PreciseBN pooling) on the target data.
- TENT (Wang et al., "Tent: Fully Test-Time Adaptation by Entropy Minimization", ICLR
  2021): BN layers normalise with the statistics of each target batch, and only their
  affine parameters (gamma, beta) are trained to minimise the mean entropy of the
  model's predictions, one optimiser step (Adam, lr 1e-3) per batch by default.

``adapt(..., keep_source=True)`` keeps a copy of the source state; ``.restore()`` on the
returned ``Adaptation`` puts it back bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from . import _data
from .calibrate import recalibrate
from .find_layers import batchnorm_layers

METHODS = ("adabn", "tent")


class _SourceState:
    """Every parameter and buffer value (cloned), gradient, requires_grad flag, training
    flag and BN ``track_running_stats`` of a model, to be put back exactly."""

    def __init__(self, model: nn.Module) -> None:
        self.entries = []
        for m in model.modules():
            params = {k: (p, None if p is None else (p.detach().clone(), p.requires_grad,
                                                      None if p.grad is None else p.grad.clone()))
                      for k, p in m._parameters.items()}
            buffers = {k: (b, None if b is None else b.clone()) for k, b in m._buffers.items()}
            self.entries.append((m, m.training, getattr(m, "track_running_stats", None),
                                 params, buffers))

    @torch.no_grad()
    def restore(self) -> None:
        for m, training, track, params, buffers in self.entries:
            m.training = training
            if track is not None:
                m.track_running_stats = track
            for k, (p, saved) in params.items():
                m._parameters[k] = p
                if p is not None:
                    value, requires_grad, grad = saved
                    p.copy_(value)
                    p.requires_grad_(requires_grad)
                    p.grad = grad
            for k, (b, saved) in buffers.items():
                m._buffers[k] = b
                if b is not None:
                    b.copy_(saved)


@dataclass
class Adaptation:
    """What ``adapt`` did. ``entropy``: TENT's mean prediction entropy of each batch,
    measured by the forward before that batch's first step (empty for AdaBN)."""

    model: nn.Module
    method: str
    entropy: list[float] = field(default_factory=list)
    _source: _SourceState | None = None

    def restore(self) -> nn.Module:
        """Put the source state back (requires ``keep_source=True``); returns the model."""
        if self._source is None:
            raise RuntimeError(
                "the source state was not kept: call adapt(..., keep_source=True) to be able "
                "to restore it"
            )
        self._source.restore()
        return self.model


def prediction_entropy(logits: Tensor) -> Tensor:
    """Mean Shannon entropy (nats) of ``softmax(logits)`` over dim 1 (classes), averaged
    over the samples (and any further positions, e.g. pixels)."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()


def _tent(model: nn.Module, data: Iterable, num_samples: int | None, lr: float, steps: int,
          progress: bool) -> list[float]:
    layers = [m for _, m in batchnorm_layers(model)]
    params = [p for m in layers for p in (m.weight, getattr(m, "bias", None)) if p is not None]
    if not params:
        raise ValueError("TENT trains the BN affine parameters, but the model has none "
                         "(no BN layer, or all with affine=False)")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    requires = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    model.requires_grad_(False)
    for m in layers:  # batch statistics in every mode, as TENT's reference does
        m.track_running_stats = False
        m.running_mean = None
        m.running_var = None
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    device = params[0].device
    entropies = []
    try:
        with torch.enable_grad():
            for x in _data.inputs(data, device, num_samples, "tent", progress):
                for step in range(steps):
                    loss = prediction_entropy(model(x))
                    if step == 0:
                        entropies.append(loss.item())
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
    finally:
        for p in params:
            p.grad = None
        for p, flag in requires:
            p.requires_grad_(flag)
    return entropies


def adapt(
    model: nn.Module,
    data: Iterable,
    method: str = "adabn",
    *,
    num_samples: int | None = None,
    lr: float = 1e-3,
    steps: int = 1,
    keep_source: bool = False,
    progress: bool = True,
) -> Adaptation:
    """Adapt ``model`` in place to the unlabeled target ``data`` through its BN layers.

    Args:
        model: a trained model with BN layers (torch.nn's or batchnorm's).
        data: target batches: input tensors or ``(input, ...)`` tuples (labels unused).
        method: ``"adabn"``: re-estimate every BN layer's running statistics on the
            target data (``recalibrate``: exact pooled statistics, model left in eval
            mode). ``"tent"``: normalise with each target batch's statistics and train
            only the BN affine parameters to minimise the prediction entropy; the model's
            output must be logits with classes on dim 1. Afterwards the model is in eval
            mode with its BN layers normalising with batch statistics (their running
            statistics are dropped, as in TENT), every ``requires_grad`` flag as before.
        num_samples: use whole batches until at least this many samples (default: all).
        lr, steps: TENT's Adam learning rate and optimiser steps per batch.
        keep_source: keep a copy of the source state so ``.restore()`` can put it back.
        progress: show a progress line on stderr.

    Returns an ``Adaptation`` (``.model``, ``.entropy`` for TENT, ``.restore()``).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    source = _SourceState(model) if keep_source else None
    result = Adaptation(model, method, _source=source)
    if method == "adabn":
        recalibrate(model, data, num_samples, progress=progress)
    else:
        result.entropy = _tent(model, data, num_samples, lr, steps, progress)
    return result
