"""Gradient-based measurements of a model at one point of training (Santurkar et al. 2018).

- ``gradient_shift``: "internal covariate shift" as the change of a layer's gradient when
  the layers before it take their SGD step (Sec. 2.2, Fig. 3): G = dL/dW_i at the current
  weights, G' = dL/dW_i after every parameter of the earlier layers moved by -lr * grad,
  same batch. Reports ||G - G'|| and cos(G, G') per layer.
- ``landscape``: the loss and gradient along the gradient direction (Sec. 3.1, Fig. 4):
  at W - eta * g for several step sizes eta, the range of the loss, the largest change of
  the gradient ("gradient predictiveness") and the largest change of the gradient per
  unit of distance ("effective beta-smoothness").

Both work on a copy of the model in training mode (batch statistics), so the model being
trained is untouched. ``layer_params(model)`` lists the parameter groups, first layer
first, the last entry being the output layer; the weight whose gradient is tracked is the
first parameter of each group.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

LossFn = Callable[[nn.Module], Tensor]


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def gradient_shift(model: nn.Module, groups: Callable[[nn.Module], list[list[nn.Parameter]]], loss_fn: LossFn,
                   lr: float) -> dict[str, list[float]]:
    """Per layer i >= 1 (the first has no earlier layers): ||G - G'||, cos(G, G'), ||G||.

    ``groups(model)`` gives each layer's parameters (tracked weight first); ``loss_fn(model)``
    the loss on a fixed batch.
    """
    work = copy.deepcopy(model).train()
    layers = groups(work)
    params = [p for group in layers for p in group]
    grads = dict(zip(params, torch.autograd.grad(loss_fn(work), params)))
    out: dict[str, list[float]] = {"l2": [], "cos": [], "norm": []}
    for i in range(1, len(layers)):
        earlier = [p for group in layers[:i] for p in group]
        saved = [p.detach().clone() for p in earlier]
        with torch.no_grad():
            for p in earlier:
                p.sub_(lr * grads[p])
        (g_after,) = torch.autograd.grad(loss_fn(work), [layers[i][0]])
        with torch.no_grad():
            for p, s in zip(earlier, saved):
                p.copy_(s)
        g = grads[layers[i][0]]
        out["l2"].append((g - g_after).norm().item())
        out["cos"].append(torch.nn.functional.cosine_similarity(g.reshape(1, -1), g_after.reshape(1, -1)).item())
        out["norm"].append(g.norm().item())
    return out


def landscape(model: nn.Module, loss_fn: LossFn, lr: float, multipliers: Sequence[float]) -> dict[str, float]:
    """Loss range, gradient predictiveness and effective beta-smoothness along -grad.

    Step sizes ``eta = m * lr`` for each multiplier ``m``; all on a copy of ``model``.
    """
    work = copy.deepcopy(model).train()
    params = [p for p in work.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    loss0 = loss_fn(work)
    g0 = torch.autograd.grad(loss0, params)
    flat_g0 = _flat(g0)
    losses, changes, smooth = [loss0.item()], [], []
    for m in multipliers:
        eta = m * lr
        with torch.no_grad():
            for p, s, g in zip(params, start, g0):
                p.copy_(s - eta * g)
        loss = loss_fn(work)
        g = _flat(torch.autograd.grad(loss, params))
        losses.append(loss.item())
        change = (g - flat_g0).norm().item()
        changes.append(change)
        smooth.append(change / (eta * flat_g0.norm().item()))
    finite = all(math.isfinite(v) for v in losses + changes)
    nan = float("nan")
    return {"loss_range": max(losses) - min(losses) if finite else nan,
            "gradient_change": max(changes) if finite else nan,
            "beta_smoothness": max(smooth) if finite else nan,
            "loss": loss0.item(), "grad_norm": flat_g0.norm().item()}
