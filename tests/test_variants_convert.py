"""to_torch / from_torch understand the variants: each becomes the closest torch.nn
module(s) with the same tensors and eval behaviour (batchnorm.variants.export), and the
result converts back with from_torch."""

import torch
from torch import nn

import batchnorm
from batchnorm import variants


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.renorm = batchnorm.BatchRenorm2d(3)
        self.ghost = batchnorm.GhostBatchNorm2d(3, virtual_batch_size=2)
        self.masked = batchnorm.MaskedBatchNorm2d(3)
        self.act = batchnorm.BatchNormAct2d(3, act="elu", alpha=0.5)
        self.frozen = batchnorm.FrozenBatchNorm2d(3)
        self.plain = batchnorm.BatchNorm2d(3)

    def forward(self, x):
        for m in (self.renorm, self.ghost, self.masked, self.act, self.frozen, self.plain):
            x = m(x)
        return x


def test_to_torch_keeps_tensors_and_eval_outputs():
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.frozen.running_var.uniform_(0.5, 2)
        model.frozen.weight.uniform_(0.5, 2)
    for _ in range(3):
        model(torch.randn(4, 3, 5, 5))
    model.eval()
    x = torch.randn(4, 3, 5, 5)
    expected = model(x)
    renorm_weight = model.renorm.weight
    assert all(variants.is_variant(m) for m in list(model.children())[:5])
    assert not variants.is_variant(model.plain)
    batchnorm.to_torch(model)
    for name in ("renorm", "ghost", "masked", "frozen", "plain"):
        assert type(getattr(model, name)) is nn.BatchNorm2d, name
    assert isinstance(model.act, nn.Sequential) and isinstance(model.act[1], nn.ELU)
    assert model.act[1].alpha == 0.5
    assert model.renorm.weight is renorm_weight
    assert not model.frozen.training and not model.frozen.weight.requires_grad
    torch.testing.assert_close(model(x), expected)
    batchnorm.from_torch(model)
    assert type(model.renorm) is batchnorm.BatchNorm2d
    torch.testing.assert_close(model(x), expected)


def test_a_training_variant_keeps_its_train_flag_and_parameters():
    bn = batchnorm.GhostBatchNorm1d(4, virtual_batch_size=2, momentum=0.3)
    out = batchnorm.to_torch(bn)
    assert type(out) is nn.BatchNorm1d and out.training and out.momentum == 0.3
    assert out.weight is bn.weight and out.running_var is bn.running_var


def test_variant_tuples_partition_the_classes():
    assert set(variants.ALL) == set(variants.TRAINABLE) | set(variants.FROZEN)
    assert all(issubclass(c, batchnorm.modules._BatchNorm) for c in variants.TRAINABLE)
    assert not any(issubclass(c, batchnorm.modules._BatchNorm) for c in variants.FROZEN)
