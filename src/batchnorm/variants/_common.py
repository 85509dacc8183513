"""What every trainable variant shares with BatchNorm: which statistics a call uses.

The variants subclass ``batchnorm.modules._BatchNorm`` (same parameters, buffers,
state_dict and input checks) and differ only in how they compute and apply statistics.
``statistics_mode`` is the decision ``_BatchNorm.forward`` makes before it normalises,
factored out so each variant applies the same rules (the batch-of-one policy included).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from ..modules import _BatchNorm

Mode = Literal["running", "batch", "batch_update"]


def statistics_mode(module: _BatchNorm, input: Tensor, count: int | None = None) -> Mode:
    """Check ``input`` (raising before any state changes) and decide the statistics.

    Returns ``"running"`` (normalise with the running estimates), ``"batch"`` (batch
    statistics, no update) or ``"batch_update"`` (batch statistics, update the running
    estimates). ``count`` is the number of values per channel (default: all of them); a
    training batch with ``count <= 1`` follows ``module.single_value``.
    """
    module.check_input(input)
    if not module._uses_batch_stats():
        return "running"
    if count is None:
        count = input.numel() // input.shape[1]
    update = module._updates_running()
    if count > 1:
        return "batch_update" if update else "batch"
    name = type(module).__name__
    if module.single_value == "error":
        raise ValueError(
            f"{name}: expected more than 1 value per channel when training, got input size "
            f"{list(input.shape)}. Pass single_value='use_running' or 'skip_update' to "
            "handle a batch of one."
        )
    if module.single_value == "use_running":
        if module.running_mean is None:
            raise ValueError(
                f"{name}(single_value='use_running') got a batch of one but has no running "
                "statistics (track_running_stats=False)"
            )
        return "running"
    return "batch"


def dims_doc(expected_dims: tuple[int, ...]) -> tuple[str, str]:
    """(what the statistics reduce over, the input shape) for a 1d/2d/3d class."""
    return {
        (2, 3): ("N, and L if present", "(N, C) or (N, C, L)"),
        (4,): ("N, H and W", "(N, C, H, W)"),
        (5,): ("N, D, H and W", "(N, C, D, H, W)"),
    }[expected_dims]


MOMENTUM_DOC = (
    "``momentum`` is PyTorch's convention: the weight of the NEW batch, "
    "``running = (1 - momentum) * running + momentum * batch_statistic`` (Keras/Flax's "
    "0.99 decay is momentum 0.01 here; ``None`` is the cumulative average)."
)


def fill_doc(template: str, name: str, dims: tuple[int, ...], example_c: str,
             example_shape: str, **extra: str) -> str:
    """A 1d/2d/3d class's docstring from its module's template (unused fields are ignored)."""
    reduced, shape_text = dims_doc(dims)
    return template.format(dims=shape_text, shape=shape_text, reduced=reduced, name=name,
                           example_c=example_c, example_shape=example_shape,
                           momentum=MOMENTUM_DOC, **extra)
