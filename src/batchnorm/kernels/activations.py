"""Activations used by BN + activation layers, with the pieces their backward needs.

``act`` is one of ACTIVATIONS; ``alpha`` is the negative slope of leaky_relu and the
scale of elu (ignored by the others). An activation is *invertible* when its pre-image
can be recovered from its output: then a BN + activation layer can keep only its output
for the backward pass (InPlace-ABN's idea).

At the kink (exactly 0) every derivative is torch's: relu's slope is 0, leaky_relu's is
``alpha`` (ATen's ``leaky_relu_backward``: ``y > 0 ? dz : alpha * dz``, NaN included),
elu's is ``alpha``. Every backend (numba, Triton, ATen, pure torch) takes the same, so a
layer's gradients equal torch.nn's and do not change with the route its size picks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

ACTIVATIONS = ("identity", "relu", "leaky_relu", "elu", "silu", "gelu")
#: The one numbering of the activations inside every backend's kernels (numba, Triton).
CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "silu": 3, "gelu": 4, "elu": 5}

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
        return torch.where(y > 0, y, y * alpha)
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
        return torch.where(y > 0, torch.ones_like(y), torch.full_like(y, alpha))
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
    if act == "leaky_relu":  # ATen's one pass: z where z > 0, else z * (1 / alpha)
        return torch.nn.functional.leaky_relu(z, 1.0 / alpha)
    # elu: max(z, 0) plus the negative branch at min(z, 0): the same values as a
    # torch.where, which on CPU costs several times these elementwise passes
    if act == "elu":
        return torch.relu(z) + torch.log1p((z / alpha).clamp_(ELU_FLOOR, 0.0))
    raise ValueError(f"activation {act!r} (alpha={alpha}) is not invertible")


def grad_from_output(z: Tensor, act: str, alpha: float) -> Tensor:
    """d act(y) / dy expressed through the output z = act(y), for invertible activations."""
    if act == "identity":
        return torch.ones_like(z)
    if act == "leaky_relu":  # z > 0 exactly where y > 0
        return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, alpha))
    if act == "elu":
        return torch.where(z > 0, torch.ones_like(z), z + alpha)
    raise ValueError(f"activation {act!r} (alpha={alpha}) is not invertible")


# ATen's own vectorised kernels, one pass each (used by the fast paths, without autograd):
# they agree with the formulas above, including which side of 0 gets which slope.


def apply_(y: Tensor, act: str, alpha: float) -> Tensor:
    """y = act(y) in place, by ATen's kernel."""
    if act == "relu":
        return torch.relu_(y)
    if act == "leaky_relu":
        return torch.nn.functional.leaky_relu_(y, alpha)
    if act == "elu":
        return torch.nn.functional.elu_(y, alpha)
    if act == "silu":
        return torch.nn.functional.silu(y, inplace=True)
    if act == "gelu":
        return torch.ops.aten.gelu_(y)
    return y


def backward(dz: Tensor, y: Tensor, act: str, alpha: float) -> Tensor:
    """dz * act'(y) from the pre-activation y, by ATen's activation backward."""
    if act == "relu":
        return torch.ops.aten.threshold_backward(dz, y, 0.0)
    if act == "leaky_relu":
        return torch.ops.aten.leaky_relu_backward(dz, y, alpha, False)
    if act == "elu":
        return torch.ops.aten.elu_backward(dz, alpha, 1.0, 1.0, False, y)
    if act == "silu":
        return torch.ops.aten.silu_backward(dz, y)
    if act == "gelu":
        return torch.ops.aten.gelu_backward(dz, y)
    return dz


def backward_from_output(dz: Tensor, z: Tensor, act: str, alpha: float) -> Tensor:
    """dz * act'(y) through the output z = act(y), for invertible activations."""
    if act == "elu":
        return torch.ops.aten.elu_backward(dz, alpha, 1.0, 1.0, True, z)
    if act == "leaky_relu":  # z > 0 exactly where y > 0 (alpha > 0)
        return torch.ops.aten.leaky_relu_backward(dz, z, alpha, True)
    if act == "identity":
        return dz
    return dz * grad_from_output(z, act, alpha)

