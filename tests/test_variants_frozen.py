"""FrozenBatchNorm1d/2d/3d equal eval-mode BN whatever their train flag, load and give
BN state_dicts, pass gradients to the input only; ``batchnorm.convert.freeze`` /
``unfreeze`` swap them in and out of a model."""

import copy

import pytest
import torch
from torch import nn

import batchnorm
from conftest import TOL

CASES = [(batchnorm.FrozenBatchNorm1d, nn.BatchNorm1d, (6, 3)),
         (batchnorm.FrozenBatchNorm1d, nn.BatchNorm1d, (4, 3, 5)),
         (batchnorm.FrozenBatchNorm2d, nn.BatchNorm2d, (4, 3, 5, 2)),
         (batchnorm.FrozenBatchNorm3d, nn.BatchNorm3d, (2, 3, 2, 3, 2))]


def _trained(torch_cls, c, **kw):
    bn = torch_cls(c, **kw)
    with torch.no_grad():
        if bn.affine:
            bn.weight.uniform_(-1.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 3)
        bn.num_batches_tracked.fill_(7)
    return bn


@pytest.mark.parametrize("cls,torch_cls,shape", CASES, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("flag", ["train", "eval"])
def test_equals_eval_batchnorm_whatever_the_train_flag(cls, torch_cls, shape, flag):
    bn = _trained(torch_cls, shape[1], dtype=torch.float64).eval()
    frozen = cls(shape[1], dtype=torch.float64)
    frozen.load_state_dict(bn.state_dict())
    frozen.train(flag == "train")
    snap = {k: v.clone() for k, v in frozen.state_dict().items()}
    x = torch.randn(shape, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = frozen(x1), bn(x2)
    torch.testing.assert_close(y1, y2, **TOL[torch.float64])
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, **TOL[torch.float64])
    assert all(torch.equal(v, snap[k]) for k, v in frozen.state_dict().items())
    assert list(frozen.parameters()) == []
    assert torch.autograd.gradcheck(frozen, (x[:3].clone().requires_grad_(),))


def test_state_dicts_interchange_with_batchnorm_including_affine_free():
    bn = _trained(nn.BatchNorm2d, 3)
    frozen = batchnorm.FrozenBatchNorm2d(3)
    frozen.load_state_dict(bn.state_dict())
    back = nn.BatchNorm2d(3)
    back.load_state_dict(frozen.state_dict())
    for k, v in bn.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    plain = _trained(nn.BatchNorm1d, 3, affine=False).eval()
    frozen1 = batchnorm.FrozenBatchNorm1d(3)
    frozen1.load_state_dict(plain.state_dict())
    assert torch.equal(frozen1.weight, torch.ones(3)) and torch.equal(frozen1.bias, torch.zeros(3))
    x = torch.randn(5, 3)
    torch.testing.assert_close(frozen1(x), plain(x))


def test_scale_shift_are_the_folded_affine_map():
    bn = _trained(nn.BatchNorm1d, 4, dtype=torch.float64).eval()
    frozen = batchnorm.FrozenBatchNorm1d.from_batchnorm(bn)
    scale, shift = frozen.scale_shift()
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(x * scale + shift, bn(x), **TOL[torch.float64])


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                  batchnorm.BatchNormAct2d(4, act="leaky_relu", alpha=0.2))
        self.renorm = batchnorm.BatchRenorm1d(4)
        self.ghost = batchnorm.GhostBatchNorm1d(4, virtual_batch_size=2)
        self.free = nn.BatchNorm1d(4, track_running_stats=False)

    def forward(self, x):
        h = self.body(x).mean((2, 3))
        return self.free(self.ghost(self.renorm(h)))


def test_freeze_equals_the_eval_model_and_unfreeze_gives_trainable_batchnorm():
    torch.manual_seed(1)
    model = Net()
    for _ in range(3):
        model(torch.randn(6, 3, 6, 6))
    reference = copy.deepcopy(model).eval()
    frozen = batchnorm.convert.freeze(copy.deepcopy(model))  # still in train mode
    assert isinstance(frozen.body[1], batchnorm.FrozenBatchNorm2d)
    assert isinstance(frozen.body[3], batchnorm.FrozenBatchNorm2d) and frozen.body[3].act == "leaky_relu"
    assert isinstance(frozen.renorm, batchnorm.FrozenBatchNorm1d)
    assert isinstance(frozen.free, nn.BatchNorm1d)  # no running statistics: left alone
    reference.free.train()  # the unfrozen layer keeps using batch statistics
    x = torch.randn(5, 3, 6, 6)
    torch.testing.assert_close(frozen(x), reference(x), **TOL[torch.float32])
    params = {id(p) for p in frozen.parameters()}
    assert params == {id(p) for m in (frozen.body[0], frozen.free) for p in m.parameters()}
    thawed = batchnorm.unfreeze(frozen)
    assert type(thawed.body[1]) is batchnorm.BatchNorm2d
    assert type(thawed.body[3]) is batchnorm.BatchNormAct2d and thawed.body[3].alpha == 0.2
    assert thawed.body[1].weight.requires_grad and thawed.training
    thawed.eval()
    torch.testing.assert_close(thawed(x), reference(x), **TOL[torch.float32])
    assert thawed.body[1].num_batches_tracked.item() == 3


def test_freezing_a_bare_layer_returns_the_frozen_layer():
    bn = _trained(nn.BatchNorm3d, 2)
    frozen = batchnorm.freeze(bn)
    assert isinstance(frozen, batchnorm.FrozenBatchNorm3d)
    assert batchnorm.convert.freeze is batchnorm.freeze and batchnorm.convert.unfreeze is batchnorm.unfreeze


def test_bad_input_raises_clearly():
    frozen = batchnorm.FrozenBatchNorm2d(3)
    for x, err, msg in [(torch.randn(4, 3, 5), ValueError, "expects \\(N, C, H, W\\) input, got a 3-D"),
                        (torch.randn(4, 5, 2, 2), ValueError, "expects 3 channels"),
                        (torch.randint(0, 3, (4, 3, 2, 2)), TypeError, "floating-point")]:
        with pytest.raises(err, match=msg):
            frozen(x)
    with pytest.raises(ValueError, match="cannot freeze"):
        batchnorm.FrozenBatchNorm1d.from_batchnorm(nn.BatchNorm1d(3, track_running_stats=False))
