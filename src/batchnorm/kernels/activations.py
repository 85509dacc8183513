"""Activations used by BN + activation layers, with the pieces their backward needs.

``act`` is one of ACTIVATIONS; ``alpha`` is the negative slope of leaky_relu and the
scale of elu (ignored by the others). An activation is *invertible* when its pre-image
can be recovered from its output: then a BN + activation layer can keep only its output
for the backward pass (InPlace-ABN's idea).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

ACTIVATIONS = ("identity", "relu", "leaky_relu", "elu", "silu", "gelu")

# elu saturates: below y of about -17 its float32 output is exactly -alpha, whose inverse is
# -inf (and 0 * inf = NaN in the backward). Every backend clamps z / alpha at this floor,
# so such elements are recovered as y = log(2^-23), about -15.9: finite, with elu'(y) < 2e-7.
ELU_FLOOR = -1.0 + 2.0**-23


def check(act: str, alpha: float) -> None:
    """Raise a clear error for an unknown activation or a parameter it cannot use."""
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}: expected one of {ACTIVATIONS}")
    if act == "elu" and not alpha > 0:
        raise ValueError(f"elu needs alpha > 0, got {alpha}")


def is_invertible(act: str, alpha: float) -> bool:
    """True when y can be recovered from act(y) (strictly monotonic activations)."""
    return act == "identity" or (act in ("leaky_relu", "elu") and alpha > 0)


def apply(y: Tensor, act: str, alpha: float) -> Tensor:
    """z = act(y)."""
    if act == "identity":
        return y
    if act == "relu":
        return torch.relu(y)
    if act == "leaky_relu":
        return torch.where(y >= 0, y, y * alpha)
    if act == "elu":
        return torch.where(y > 0, y, alpha * torch.expm1(y))
    if act == "silu":
        return y * torch.sigmoid(y)
    return 0.5 * y * (1.0 + torch.erf(y / math.sqrt(2.0)))


def grad(y: Tensor, act: str, alpha: float) -> Tensor:
    """d act(y) / dy, from the pre-activation y."""
    if act == "identity":
        return torch.ones_like(y)
    if act == "relu":
        return (y > 0).to(y.dtype)
    if act == "leaky_relu":
        return torch.where(y >= 0, torch.ones_like(y), torch.full_like(y, alpha))
    if act == "elu":
        return torch.where(y > 0, torch.ones_like(y), alpha * torch.exp(y))
    if act == "silu":
        s = torch.sigmoid(y)
        return s * (1.0 + y * (1.0 - s))
    cdf = 0.5 * (1.0 + torch.erf(y / math.sqrt(2.0)))
    return cdf + y * torch.exp(-0.5 * y * y) / math.sqrt(2.0 * math.pi)


def inverse(z: Tensor, act: str, alpha: float) -> Tensor:
    """y = act^-1(z), for invertible activations only."""
    if act == "identity":
        return z
    if act == "leaky_relu":
        return torch.where(z >= 0, z, z / alpha)
    if act == "elu":
        return torch.where(z > 0, z, torch.log1p((z / alpha).clamp(min=ELU_FLOOR)))
    raise ValueError(f"activation {act!r} (alpha={alpha}) is not invertible")


def grad_from_output(z: Tensor, act: str, alpha: float) -> Tensor:
    """d act(y) / dy expressed through the output z = act(y), for invertible activations."""
    if act == "identity":
        return torch.ones_like(z)
    if act == "leaky_relu":
        return torch.where(z >= 0, torch.ones_like(z), torch.full_like(z, alpha))
    if act == "elu":
        return torch.where(z > 0, torch.ones_like(z), z + alpha)
    raise ValueError(f"activation {act!r} (alpha={alpha}) is not invertible")
