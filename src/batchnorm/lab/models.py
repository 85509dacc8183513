"""Models for the lab: plain torch.nn MLPs and small conv nets whose normalisation is a parameter.

A norm is named by a *kind* looked up in ``NORMS``: "none", "ours" (this package's
``BatchNorm1d``), "torch" (``torch.nn.BatchNorm1d``), "renorm" (``BatchRenorm1d``), "ghost"
(``GhostBatchNorm1d``), "group" (``torch.nn.GroupNorm``, 10 groups unless ``groups=`` says),
"layer" (``torch.nn.LayerNorm``) and "noisy" (BN with Santurkar et al.'s random shift and
scale, ``lab.noisy``). More kinds are one ``@register_norm("name")`` function each.
Its *placement* is "before" the activation (Linear -> norm -> activation, the paper's
choice; the Linear bias is dropped because the norm's beta replaces it) or "after" it
(Linear -> activation -> norm). An optional dropout ends each hidden block.

The conv net (``convnet``) is the same idea on images: blocks Conv2d 3x3 -> norm ->
activation (the first with stride 1, the others stride 2), global average pooling, a
Linear head; its norms come from ``NORMS_2D`` ("none", "ours" = ``batchnorm.BatchNorm2d``,
"torch", "noisy"). It takes the flat rows of a ``Dataset`` and views them as images.

The Linear (Conv2d) weights depend only on the seed and the widths, never on the norm kind
or the placement: two arms built with the same seed start from the same weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

import batchnorm

from .noisy import NoisyBatchNorm

NormFactory = Callable[..., nn.Module]
NORMS: dict[str, NormFactory] = {}
NORMS_2D: dict[str, NormFactory] = {}  # the norms of the conv net, over (N, C, H, W)
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
}
PLACEMENTS = ("before", "after")
# torch's default Linear init; He (normal, fan-in, ReLU gain, zero bias); "saturating":
# N(0, (SATURATING_GAIN / sqrt(fan_in))^2), zero bias, large enough to saturate sigmoids
INITS = ("torch", "kaiming", "saturating")
SATURATING_GAIN = 6.0


def register_norm(kind: str, images: bool = False) -> Callable[[NormFactory], NormFactory]:
    """Decorator: register ``factory(num_features, **options) -> nn.Module`` as ``kind``
    (in ``NORMS_2D`` with ``images``: a norm over (N, C, H, W))."""

    def add(factory: NormFactory) -> NormFactory:
        (NORMS_2D if images else NORMS)[kind] = factory
        return factory

    return add


@register_norm("none")
@register_norm("none", images=True)
def _no_norm(num_features: int) -> nn.Module:
    return nn.Identity()


# the layers whose constructor is already ``(num_features, **options)``
NORMS.update(ours=batchnorm.BatchNorm1d, torch=nn.BatchNorm1d, renorm=batchnorm.BatchRenorm1d,
             ghost=batchnorm.GhostBatchNorm1d, layer=nn.LayerNorm)
NORMS_2D.update(ours=batchnorm.BatchNorm2d, torch=nn.BatchNorm2d)


@register_norm("group")
def _group_norm(num_features: int, groups: int = 10, **options: object) -> nn.Module:
    return nn.GroupNorm(int(groups), num_features, **options)


@register_norm("noisy")
def _noisy_batchnorm(num_features: int, **options: object) -> nn.Module:
    return NoisyBatchNorm(num_features, **options)


@register_norm("noisy", images=True)
def _noisy_batchnorm_2d(num_features: int, **options: object) -> nn.Module:
    return NoisyBatchNorm(num_features, images=True, **options)


def make_norm(kind: str, num_features: int, images: bool = False, **options: object) -> nn.Module:
    """The norm layer ``kind`` for ``num_features`` channels (see ``NORMS``, ``NORMS_2D`` with ``images``)."""
    table = NORMS_2D if images else NORMS
    if kind not in table:
        raise ValueError(f"unknown norm kind {kind!r}{' for images' if images else ''}: expected one of {sorted(table)}")
    return table[kind](num_features, **options)


class Block(nn.Module):
    """One hidden layer: Linear, then norm and activation in the order ``placement`` says."""

    def __init__(self, linear: nn.Linear, norm: nn.Module, activation: nn.Module, placement: str,
                 dropout: float = 0.0):
        super().__init__()
        self.linear, self.norm, self.activation = linear, norm, activation
        self.placement = placement
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def preactivation(self, x: Tensor) -> Tensor:
        """The activation's input."""
        z = self.linear(x)
        return self.norm(z) if self.placement == "before" else z

    def finish(self, z: Tensor) -> Tensor:
        """The block's output from the activation's input ``z``."""
        a = self.activation(z)
        return self.dropout(self.norm(a) if self.placement == "after" else a)

    def forward(self, x: Tensor) -> Tensor:
        return self.finish(self.preactivation(x))


class MLP(nn.Module):
    """Hidden ``Block``s, then a Linear head that gives the logits."""

    def __init__(self, blocks: list[Block], head: nn.Linear):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def preactivations(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The logits and the input of every hidden activation, first layer first."""
        zs = []
        for block in self.blocks:
            z = block.preactivation(x)
            zs.append(z)
            x = block.finish(z)
        return self.head(x), zs


def mlp(
    in_features: int,
    widths: tuple[int, ...],
    n_classes: int,
    *,
    activation: str = "relu",
    norm: str = "none",
    placement: str = "before",
    seed: int = 0,
    init: str = "torch",
    norm_options: dict[str, object] | None = None,
    dropout: float = 0.0,
) -> MLP:
    """An MLP ``in_features -> widths... -> n_classes`` with ``norm`` on every hidden layer.

    The weights are drawn under ``seed`` (the global random state is left untouched):
    ``init="torch"`` keeps torch's default Linear initialisation, ``"kaiming"`` redraws the
    hidden weights from N(0, 2 / fan_in) with zero biases (He et al. 2015, for ReLU),
    ``"saturating"`` from N(0, SATURATING_GAIN^2 / fan_in) with zero biases. With
    a norm placed before the activation the hidden Linear layers have no bias.
    ``dropout`` (a probability) ends every hidden block.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}: expected one of {sorted(ACTIVATIONS)}")
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}: expected one of {PLACEMENTS}")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}: expected one of {INITS}")
    options = norm_options or {}
    sizes = (in_features, *widths)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        linears = [nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])]
        head = nn.Linear(sizes[-1], n_classes)
        _initialise(linears, init)
    blocks = []
    for linear in linears:
        width = linear.out_features
        if norm != "none" and placement == "before":
            linear.register_parameter("bias", None)
        blocks.append(Block(linear, make_norm(norm, width, **options), ACTIVATIONS[activation](), placement, dropout))
    return MLP(blocks, head)


def _initialise(layers: list[nn.Module], init: str) -> None:
    """Redraw the weights of ``layers`` (Linear or Conv2d) for ``init`` (see ``mlp``), under the current seed."""
    for layer in layers:
        if init == "kaiming":
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        elif init == "saturating":
            fan_in = layer.weight[0].numel()
            nn.init.normal_(layer.weight, 0.0, SATURATING_GAIN / fan_in ** 0.5)
        else:
            continue
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


class ConvNet(MLP):
    """Conv ``Block``s on images, global average pooling, a Linear head; takes flat rows."""

    def __init__(self, blocks: list[Block], head: nn.Linear, image_shape: tuple[int, ...]):
        super().__init__(blocks, head)
        self.image_shape = tuple(image_shape)

    def forward(self, x: Tensor) -> Tensor:
        return self.preactivations(x)[0]

    def preactivations(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The logits and the input of every activation (N, C, H, W), first layer first."""
        x = x.reshape(len(x), *self.image_shape)
        zs = []
        for block in self.blocks:
            z = block.preactivation(x)
            zs.append(z)
            x = block.finish(z)
        return self.head(x.mean(dim=(2, 3))), zs


def convnet(
    image_shape: tuple[int, ...],
    channels: tuple[int, ...],
    n_classes: int,
    *,
    activation: str = "relu",
    norm: str = "none",
    seed: int = 0,
    init: str = "kaiming",
    norm_options: dict[str, object] | None = None,
) -> ConvNet:
    """A conv net for images of ``image_shape`` (C, H, W): one block Conv2d 3x3 (stride 1 for the
    first block, 2 for the others) -> norm (``NORMS_2D``) -> activation per entry of
    ``channels``, global average pooling, Linear to ``n_classes``. Weights from ``seed``
    (``init`` as in ``mlp``); with a norm the convolutions have no bias."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}: expected one of {sorted(ACTIVATIONS)}")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}: expected one of {INITS}")
    if len(image_shape) != 3:
        raise ValueError(f"image_shape {image_shape}: expected (channels, height, width)")
    sizes = (image_shape[0], *channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        convs = [nn.Conv2d(a, b, 3, stride=1 if i == 0 else 2, padding=1)
                 for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))]
        head = nn.Linear(sizes[-1], n_classes)
        _initialise(convs, init)
    blocks = []
    for conv in convs:
        if norm != "none":
            conv.register_parameter("bias", None)
        blocks.append(Block(conv, make_norm(norm, conv.out_channels, images=True, **(norm_options or {})),
                            ACTIVATIONS[activation](), "before"))
    return ConvNet(blocks, head, image_shape)
