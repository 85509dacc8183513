"""The one interface every compute backend implements.

A backend is a module (``torch_backend``, ``cpu_backend``, ``native_backend``,
``triton_backend``) with the members of ``Backend`` below: what it is (``name``), which
operations it implements (``OPS``, a subset of ``OPERATIONS``), where it runs
(``supports``) and where ``auto`` mode prefers it (``prefers``), and what it does itself
(``records_autograd``: its training forward may be recorded by ATen's autograd instead of
our autograd Function; ``blends_running``: its training forwards (plain and with an
activation) can blend the batch into the running buffers inside the kernel,
``accepts_running`` saying for which buffers; ``takes_backup``: its ``forward_train``
also takes ``running=``, a layer's ``cpu_backup.RunningBackup`` prepared for the step,
and folds the batch into the buffers through it, guarded, right after its kernel). The
dispatcher (``batchnorm.kernels.pick``) reads these members, never probes for others; the
pure-torch backend implements every operation but ``update_running``, so a call never
fails for want of one (``update_running``, the one operation that writes into its
arguments, is an optional fusion: ``batchnorm.stats`` runs torch operations where no
backend offers it, ``kernels.updater``).

Conventions of every operation: tensors have their channel axis at 1, shape ``(N, C, *)``;
statistics (``mean``, ``invstd``, sums) are 1-d tensors of length C in the accumulation
dtype (float64 for float64 input, float32 otherwise); ``invstd = 1 / sqrt(var + eps)``
with the *biased* variance; outputs keep the input's dtype and memory format; ``act`` is
a name of ``activations.ACTIVATIONS`` and kernels number activations by
``activations.CODES``.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

Vector = Tensor | None  # a per-channel vector that may be absent (weight, bias)
Grads = tuple[Tensor | None, Tensor | None, Tensor | None]  # (dx, dweight, dbias)
Mask = tuple[bool, bool, bool]  # which of (dx, dweight, dbias) to compute
ALL = (True, True, True)

#: Every operation a backend may implement (its ``OPS`` lists the ones it does).
OPERATIONS = (
    "batch_stats", "normalize", "forward_train", "forward_train_update", "forward_eval",
    "backward_reduce", "backward_elemt", "backward", "backward_eval", "forward_train_act",
    "forward_train_act_update", "forward_eval_act", "backward_act", "backward_act_input",
    "update_running",
)


class Backend(Protocol):
    name: str
    OPS: frozenset[str]
    records_autograd: bool
    blends_running: bool
    takes_backup: bool

    def supports(self, x: Tensor) -> bool:
        """Whether the backend can run on ``x`` at all."""

    def prefers(self, op: str, x: Tensor) -> bool:
        """Whether ``auto`` mode should run ``op`` on ``x`` here (measured crossovers;
        only for tensors it supports)."""

    def accepts_running(self, x: Tensor, running_mean: Tensor, running_var: Tensor) -> bool:
        """With ``blends_running``: whether ``forward_train_update`` can take these buffers."""

    def batch_stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-channel (mean, biased variance)."""

    def normalize(self, x: Tensor, mean: Tensor, invstd: Tensor, weight: Vector,
                  bias: Vector) -> Tensor:
        """``(x - mean) * invstd * weight + bias`` with given statistics."""

    def forward_train(self, x: Tensor, weight: Vector, bias: Vector,
                      eps: float) -> tuple[Tensor, Tensor, Tensor]:
        """Training forward with the batch's statistics: (y, mean, invstd)."""

    def forward_train_update(self, x: Tensor, weight: Vector, bias: Vector, eps: float,
                             running_mean: Tensor, running_var: Tensor,
                             factor: float) -> tuple[Tensor, Tensor, Tensor]:
        """``forward_train`` that also blends the batch into the running buffers in place
        (``running += factor * (stat - running)``, unbiased variance), unguarded."""

    def forward_eval(self, x: Tensor, running_mean: Tensor, running_var: Tensor,
                     weight: Vector, bias: Vector, eps: float) -> Tensor:
        """Eval forward from the running variance itself (not ``invstd``)."""

    def backward_reduce(self, dy: Tensor, x: Tensor, mean: Tensor,
                        invstd: Tensor) -> tuple[Tensor, Tensor]:
        """(sum(dy), sum(dy * x_hat)) per channel."""

    def backward_elemt(self, dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor,
                       weight: Vector, sum_dy: Tensor, sum_dy_xhat: Tensor,
                       count: float) -> Tensor:
        """dx from the two sums over ``count`` values per channel (maybe all ranks')."""

    def backward(self, dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Vector,
                 output_mask: Mask = ALL) -> Grads:
        """Closed-form training backward: (dx, dweight, dbias), None where masked off."""

    def backward_eval(self, dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor,
                      weight: Vector, output_mask: Mask = ALL) -> Grads:
        """Backward with fixed statistics: dx = dy * weight * invstd, and the sums."""

    def forward_train_act(self, x: Tensor, weight: Vector, bias: Vector, eps: float,
                          act: str, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
        """Training forward of BN followed by an activation: (z, mean, invstd)."""

    def forward_train_act_update(self, x: Tensor, weight: Vector, bias: Vector, eps: float,
                                 act: str, alpha: float, running_mean: Tensor,
                                 running_var: Tensor,
                                 factor: float) -> tuple[Tensor, Tensor, Tensor]:
        """``forward_train_act`` that also blends the batch into the running buffers in
        place, as ``forward_train_update`` does, unguarded."""

    def forward_eval_act(self, x: Tensor, mean: Tensor, invstd: Tensor, weight: Vector,
                         bias: Vector, act: str, alpha: float) -> Tensor:
        """Eval forward of BN (given statistics) followed by an activation."""

    def backward_act(self, dz: Tensor, z: Tensor, mean: Tensor, invstd: Tensor,
                     weight: Vector, bias: Vector, act: str, alpha: float,
                     training: bool) -> tuple[Tensor, Tensor, Tensor]:
        """Backward of BN + invertible activation from its output z alone."""

    def backward_act_input(self, dz: Tensor, x: Tensor, mean: Tensor, invstd: Tensor,
                           weight: Vector, bias: Vector, act: str, alpha: float,
                           training: bool) -> tuple[Tensor, Tensor, Tensor]:
        """Backward of BN + activation from its input x."""

    def update_running(self, running_mean: Tensor, running_var: Tensor, mean: Tensor,
                       invstd: Tensor, eps: float, correction: float, momentum: float | None,
                       num_batches_tracked: Tensor | None = None,
                       backup=None) -> bool | Tensor | None:
        """``batchnorm.stats``' guarded running update fused: var = max(invstd^-2 - eps, 0)
        in float64; if every channel's mean and var is finite, the buffers blend towards
        (mean, var * correction) with weight ``momentum`` (None: 1 / num_batches_tracked
        after the increment) and ``num_batches_tracked`` counts the batch, else nothing is
        written. Returns the verdict (a bool read on the host, or a 0-d bool tensor on the
        device that the host has not read), or None where it does not apply. ``backup``:
        the layer's ``cpu_backup.RunningBackup`` (or None), which a backend may use to reach
        the buffers (the CPU one: its numpy views)."""
