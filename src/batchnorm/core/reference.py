"""Batch Normalization in NumPy float64, written from the formula: the twin every fast path
is tested against.

Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing
Internal Covariate Shift" (2015), Algorithm 1 and Section 3. For an input ``x`` of shape
``(N, C, *)`` the statistics are taken per channel ``c`` over every other axis, that is
over ``m = N * prod(*)`` values::

    mean_c   = (1/m) sum_i x_i                       (sums over the m values of channel c)
    var_c    = (1/m) sum_i (x_i - mean_c)^2          (biased: this is what normalises)
    invstd_c = 1 / sqrt(var_c + eps)
    x_hat_i  = (x_i - mean_c) * invstd_c
    y_i      = gamma_c * x_hat_i + beta_c

In evaluation the stored running statistics replace the batch ones. The running variance
is stored *unbiased*, ``var_c * m / (m - 1)`` (PyTorch's convention, see
:func:`update_running`).

Nothing here imports torch: the module is the plain formula, readable in one sitting.
The backward exists twice, :func:`backward_staged` (the chain rule one named stage at a
time) and :func:`backward` (the closed form it collapses to), so that each can check the
other. ``channel_axis`` (default 1) picks the channel axis; ``-1`` takes channels-last
arrays ``(N, *, C)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

Array = NDArray[np.float64]


@dataclass(frozen=True)
class Cache:
    """What the training forward keeps for the backward.

    Attributes:
        x_hat: the normalised input, same shape as ``x``.
        mean: per-channel batch mean, shape ``(C,)``.
        var: per-channel biased batch variance, shape ``(C,)``.
        invstd: ``1 / sqrt(var + eps)``, shape ``(C,)``.
        gamma: the scale, shape ``(C,)``, or ``None`` when the forward had no scale.
        m: number of values per channel, ``x.size // C``.
        channel_axis: the channel axis of ``x_hat`` (non-negative).
    """

    x_hat: Array
    mean: Array
    var: Array
    invstd: Array
    gamma: Array | None
    m: int
    channel_axis: int


@dataclass(frozen=True)
class Stages:
    """Every intermediate gradient of :func:`backward_stages`, named after the forward
    quantity it is the gradient of (``d<name> = dL/d<name>``).

    ``dvar`` is the gradient through ``invstd`` only (``var`` as a leaf of ``x_hat``);
    ``dmean`` is the total gradient of the mean, through both ``x_hat`` and ``var``.
    """

    dbeta: Array
    dgamma: Array
    dx_hat: Array
    dvar: Array
    dmean: Array
    dx: Array


def _channel_axis(ndim: int, channel_axis: int) -> int:
    """``channel_axis`` as a non-negative index into an array of ``ndim`` axes."""
    if ndim < 2:
        raise ValueError(
            f"expected an input with at least 2 axes (N, C, *), got {ndim} axis(es); "
            "add a batch axis, e.g. x[None]"
        )
    if not -ndim <= channel_axis < ndim:
        raise ValueError(
            f"channel_axis={channel_axis} is out of range for an input with {ndim} axes; "
            f"expected an integer in [{-ndim}, {ndim - 1}]"
        )
    return channel_axis % ndim


def _reduce_axes(ndim: int, axis: int) -> tuple[int, ...]:
    """Every axis except the channel axis: the statistics are taken over these."""
    return tuple(a for a in range(ndim) if a != axis)


def _per_channel(v: Array, ndim: int, axis: int) -> Array:
    """A ``(C,)`` vector reshaped to broadcast against an array of ``ndim`` axes."""
    shape = [1] * ndim
    shape[axis] = v.shape[0]
    return v.reshape(shape)


def _vector(v: ArrayLike | None, name: str, channels: int) -> Array | None:
    """``v`` as a float64 vector of length ``channels`` (``None`` passes through)."""
    if v is None:
        return None
    out = np.asarray(v, dtype=np.float64)
    if out.shape != (channels,):
        raise ValueError(
            f"expected {name} of shape ({channels},) (one value per channel), "
            f"got shape {out.shape}"
        )
    return out


def batch_stats(x: ArrayLike, channel_axis: int = 1) -> tuple[Array, Array]:
    """Per-channel mean and biased variance of ``x`` in float64.

    Two passes: first ``mean = sum(x) / m``, then ``var = sum((x - mean)^2) / m``. The
    centred second pass avoids the cancellation of ``E[x^2] - E[x]^2`` when the mean is
    large compared with the spread.

    Args:
        x: input of shape ``(N, C, *)`` (channels at ``channel_axis``).
        channel_axis: the channel axis, default 1; ``-1`` for channels-last.

    Returns:
        ``(mean, var)``, each of shape ``(C,)``.
    """
    x = np.asarray(x, dtype=np.float64)
    axis = _channel_axis(x.ndim, channel_axis)
    if x.size == 0:
        raise ValueError(f"expected at least one value per channel, got shape {x.shape}")
    axes = _reduce_axes(x.ndim, axis)
    mean = x.mean(axis=axes)
    centred = x - _per_channel(mean, x.ndim, axis)
    var = (centred * centred).mean(axis=axes)
    return mean, var


def _invstd(var: Array, eps: float) -> Array:
    """``1 / sqrt(var + eps)``, refusing a division by zero instead of returning inf/NaN."""
    if not 0 <= eps < np.inf:  # NaN or inf would give NaN or 0 for every channel
        raise ValueError(f"expected a finite eps >= 0, got eps={eps}")
    zero = np.flatnonzero(var + eps == 0)
    if zero.size:
        raise ValueError(
            f"channel(s) {zero.tolist()} have zero variance and eps=0, so normalising "
            "divides by zero; use eps > 0"
        )
    return 1.0 / np.sqrt(var + eps)


def _affine(x_hat: Array, gamma: Array | None, beta: Array | None, axis: int) -> Array:
    """``y = gamma * x_hat + beta`` with missing ``gamma``/``beta`` read as 1 and 0."""
    y = x_hat
    if gamma is not None:
        y = y * _per_channel(gamma, y.ndim, axis)
    if beta is not None:
        y = y + _per_channel(beta, y.ndim, axis)
    return y


def forward(
    x: ArrayLike,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    eps: float = 1e-5,
    channel_axis: int = 1,
) -> tuple[Array, Cache]:
    """Training forward: normalise with the batch's own statistics, then scale and shift.

    ``y = gamma * (x - mean) / sqrt(var + eps) + beta`` with ``mean`` and the biased
    ``var`` from :func:`batch_stats`.

    Args:
        x: input of shape ``(N, C, *)`` (channels at ``channel_axis``).
        gamma: scale of shape ``(C,)``, or ``None`` for no scale (gamma = 1).
        beta: shift of shape ``(C,)``, or ``None`` for no shift (beta = 0).
        eps: added to the variance, default ``1e-5``. ``eps=0`` is allowed (the paper's
            exact invariances hold only then) but a channel with zero variance is an error.
        channel_axis: the channel axis, default 1; ``-1`` for channels-last.

    Returns:
        ``(y, cache)``: ``y`` has the shape of ``x``; ``cache`` feeds the backward.

    Example:
        >>> x = np.arange(8.0).reshape(2, 2, 2)
        >>> y, cache = forward(x, eps=0.0)
        >>> np.allclose(y.mean(axis=(0, 2)), 0), np.allclose(y.var(axis=(0, 2)), 1)
        (True, True)
    """
    x = np.asarray(x, dtype=np.float64)
    mean, var = batch_stats(x, channel_axis)
    axis = _channel_axis(x.ndim, channel_axis)
    channels = x.shape[axis]
    gamma = _vector(gamma, "gamma", channels)
    beta = _vector(beta, "beta", channels)
    invstd = _invstd(var, eps)
    x_hat = (x - _per_channel(mean, x.ndim, axis)) * _per_channel(invstd, x.ndim, axis)
    y = _affine(x_hat, gamma, beta, axis)
    cache = Cache(x_hat, mean, var, invstd, gamma, x.size // channels, axis)
    return y, cache


def forward_eval(
    x: ArrayLike,
    running_mean: ArrayLike,
    running_var: ArrayLike,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    eps: float = 1e-5,
    channel_axis: int = 1,
) -> Array:
    """Evaluation forward: the stored statistics replace the batch's.

    ``y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta``, an affine map
    per channel that does not depend on the rest of the batch.

    Args:
        x: input of shape ``(N, C, *)`` (channels at ``channel_axis``).
        running_mean: stored mean, shape ``(C,)``.
        running_var: stored (unbiased) variance, shape ``(C,)``.
        gamma, beta, eps, channel_axis: as in :func:`forward`.

    Returns:
        ``y``, the shape of ``x``.
    """
    x = np.asarray(x, dtype=np.float64)
    axis = _channel_axis(x.ndim, channel_axis)
    channels = x.shape[axis]
    mean = _vector(running_mean, "running_mean", channels)
    var = _vector(running_var, "running_var", channels)
    gamma = _vector(gamma, "gamma", channels)
    beta = _vector(beta, "beta", channels)
    invstd = _invstd(var, eps)
    x_hat = (x - _per_channel(mean, x.ndim, axis)) * _per_channel(invstd, x.ndim, axis)
    return _affine(x_hat, gamma, beta, axis)


def _backward_setup(dy: ArrayLike, cache: Cache):
    """(dy checked, m, the reduced axes, a function shaping a per-channel vector to
    broadcast against dy) for both backwards."""
    dy = _check_dy(dy, cache)
    ndim, axis = dy.ndim, cache.channel_axis

    def per_channel(v: Array) -> Array:
        return _per_channel(v, ndim, axis)

    return dy, cache.m, _reduce_axes(ndim, axis), per_channel


def _check_dy(dy: ArrayLike, cache: Cache) -> Array:
    dy = np.asarray(dy, dtype=np.float64)
    if dy.shape != cache.x_hat.shape:
        raise ValueError(
            f"expected dy of the output's shape {cache.x_hat.shape}, got shape {dy.shape}"
        )
    return dy


def backward_stages(dy: ArrayLike, cache: Cache) -> Stages:
    """The backward by the chain rule, one named stage at a time (Karpathy, makemore
    part 4), walking the forward graph from ``y`` back to ``x``.

    Write ``S`` for the sum over the ``m`` values of a channel and ``xmu = x - mean``. The
    forward graph, per channel::

        mean   = S(x) / m
        xmu    = x - mean
        var    = S(xmu^2) / m
        invstd = (var + eps)^(-1/2)
        x_hat  = xmu * invstd
        y      = gamma * x_hat + beta

    Backward, each stage the gradient of the loss ``L`` with respect to one quantity:

    1. ``beta`` and ``gamma`` are shared by the m values, so their gradients sum:
       ``dbeta = S(dy)``, ``dgamma = S(dy * x_hat)``.
    2. ``x_hat``: ``dx_hat = dy * gamma``.
    3. ``var`` enters ``x_hat`` only through ``invstd``, and
       ``d invstd / d var = -1/2 (var + eps)^(-3/2) = -1/2 invstd^3``, so
       ``dvar = S(dx_hat * xmu) * (-1/2) * invstd^3``.
    4. ``mean`` enters through ``xmu`` directly in ``x_hat`` (``d x_hat/d mean = -invstd``)
       and through ``var`` (``d var / d mean = -2 S(xmu) / m``), so
       ``dmean = -invstd * S(dx_hat) + dvar * (-2 S(xmu) / m)``. The second term is zero
       in exact arithmetic (``S(xmu) = 0``); it is kept because it is what the chain rule
       gives, and :func:`backward` drops it.
    5. ``x`` reaches the loss by three paths, through ``x_hat`` (holding mean and var
       fixed), through ``var`` (``d var / d x_i = 2 xmu_i / m``) and through ``mean``
       (``d mean / d x_i = 1/m``)::

           dx = dx_hat * invstd + dvar * 2 * xmu / m + dmean / m

    ``xmu`` is recovered from the cache as ``x_hat / invstd``. With no ``gamma`` the
    forward reads it as 1; ``dgamma`` and ``dbeta`` are then the gradients a scale of 1
    and a shift of 0 would get.

    Args:
        dy: gradient of the loss with respect to ``y``, the shape of ``y``.
        cache: from :func:`forward`.

    Returns:
        :class:`Stages`, every gradient named.
    """
    dy, m, axes, per_channel = _backward_setup(dy, cache)

    x_hat = cache.x_hat
    invstd = cache.invstd
    xmu = x_hat / per_channel(invstd)
    gamma = np.ones_like(invstd) if cache.gamma is None else cache.gamma
    # 1. y = gamma * x_hat + beta
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * x_hat).sum(axis=axes)
    # 2. x_hat as a function of y
    dx_hat = dy * per_channel(gamma)
    # 3. x_hat = xmu * invstd, invstd = (var + eps)^(-1/2)
    dvar = (dx_hat * xmu).sum(axis=axes) * -0.5 * invstd**3
    # 4. mean through xmu in x_hat, and through var = S((x - mean)^2) / m
    dmean = -invstd * dx_hat.sum(axis=axes) + dvar * (-2.0 * xmu.sum(axis=axes) / m)
    # 5. x through x_hat, var and mean
    dx = (
        dx_hat * per_channel(invstd)
        + per_channel(dvar) * 2.0 * xmu / m
        + per_channel(dmean) / m
    )
    return Stages(dbeta, dgamma, dx_hat, dvar, dmean, dx)


def backward_staged(dy: ArrayLike, cache: Cache) -> tuple[Array, Array, Array]:
    """The staged backward (:func:`backward_stages`) reduced to ``(dx, dgamma, dbeta)``."""
    stages = backward_stages(dy, cache)
    return stages.dx, stages.dgamma, stages.dbeta


def backward(dy: ArrayLike, cache: Cache) -> tuple[Array, Array, Array]:
    """The backward in closed form: the stages of :func:`backward_stages` collapsed.

    Substitute stages 2-4 into stage 5, using ``xmu = x_hat / invstd`` and
    ``S(xmu) = 0``::

        dvar * 2 xmu / m = -invstd^3 S(dx_hat xmu) xmu / m = -invstd x_hat S(dx_hat x_hat) / m
        dmean / m        = -invstd S(dx_hat) / m

    so, with ``dx_hat = gamma * dy`` and ``gamma`` constant over the channel::

        dx = (gamma * invstd / m) * (m * dy - S(dy) - x_hat * S(dy * x_hat))

    Only two reductions per channel, ``S(dy)`` and ``S(dy * x_hat)``, the same two that
    give ``dbeta`` and ``dgamma``.

    Args:
        dy: gradient of the loss with respect to ``y``, the shape of ``y``.
        cache: from :func:`forward`.

    Returns:
        ``(dx, dgamma, dbeta)``; with no ``gamma`` in the forward, ``dgamma`` and
        ``dbeta`` are those a scale of 1 and a shift of 0 would get.
    """
    dy, m, axes, per_channel = _backward_setup(dy, cache)

    x_hat = cache.x_hat
    gamma = np.ones_like(cache.invstd) if cache.gamma is None else cache.gamma
    sum_dy = dy.sum(axis=axes)  # = dbeta
    sum_dy_xhat = (dy * x_hat).sum(axis=axes)  # = dgamma
    dx = per_channel(gamma * cache.invstd / m) * (
        m * dy  # through x_hat directly, mean and var held fixed
        - per_channel(sum_dy)  # through the mean: every x_i moves it by 1/m
        - x_hat * per_channel(sum_dy_xhat)  # through the variance: x_i moves it by 2 xmu_i / m
    )
    return dx, sum_dy_xhat, sum_dy


def update_running(
    running_mean: ArrayLike,
    running_var: ArrayLike,
    mean: ArrayLike,
    var: ArrayLike,
    m: int,
    momentum: float | None = 0.1,
    num_batches_tracked: int | None = None,
) -> tuple[Array, Array]:
    """The running statistics after one training batch, in PyTorch's convention.

    ``momentum`` is the weight of the *new* batch (the opposite of an EMA's decay)::

        new_mean = (1 - momentum) * running_mean + momentum * mean
        new_var  = (1 - momentum) * running_var  + momentum * var * m / (m - 1)

    The stored variance is the unbiased one, ``var * m / (m - 1)`` (Bessel's correction),
    because it estimates the population variance used in evaluation, while the batch is
    normalised with the biased ``var``.

    With ``momentum=None`` the running statistics are the cumulative (equal-weight) average
    of all batches seen: the same formula with ``momentum = 1 / num_batches_tracked``, that
    is ``new = old + (stat - old) / num_batches_tracked``.

    Args:
        running_mean, running_var: the stored statistics, shape ``(C,)``.
        mean, var: this batch's mean and *biased* variance (:func:`batch_stats`).
        m: number of values per channel in the batch; must be at least 2.
        momentum: weight of the new batch in ``[0, 1]``, default 0.1; ``None`` for the
            cumulative average.
        num_batches_tracked: with ``momentum=None``, the number of batches seen
            *including* this one (PyTorch's buffer after its increment); ignored otherwise.

    Returns:
        ``(new_mean, new_var)``, each of shape ``(C,)``.
    """
    if m < 2:
        raise ValueError(
            f"expected more than 1 value per channel (m >= 2) for the unbiased variance, "
            f"got m={m}"
        )
    if momentum is None:
        if num_batches_tracked is None or num_batches_tracked < 1:
            raise ValueError(
                "momentum=None (cumulative average) needs num_batches_tracked >= 1, the "
                f"number of batches seen including this one; got {num_batches_tracked}"
            )
        momentum = 1.0 / num_batches_tracked
    elif not 0.0 <= momentum <= 1.0:
        raise ValueError(f"expected momentum in [0, 1] or None, got {momentum}")
    running_mean = np.asarray(running_mean, dtype=np.float64)
    if running_mean.ndim != 1:
        raise ValueError(
            f"expected running_mean of shape (C,), got shape {running_mean.shape}"
        )
    channels = running_mean.shape[0]
    running_var = _vector(running_var, "running_var", channels)
    mean = _vector(mean, "mean", channels)
    var = _vector(var, "var", channels)
    unbiased = var * m / (m - 1)
    new_mean = (1.0 - momentum) * running_mean + momentum * mean
    new_var = (1.0 - momentum) * running_var + momentum * unbiased
    return new_mean, new_var
