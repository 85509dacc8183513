"""timm's and torchvision's BN layers one by one (the real classes, float64): what
from_torch makes of each, and fold with timm's BatchNormAct2d (activation and dropout
stay). Imports: tests/real_timm.py."""

import copy

import pytest
import torch
from torch import nn

import batchnorm
from real_timm import import_timm

try:
    timm = import_timm()
except ImportError as exc:
    pytest.skip(f"timm is not installed ({exc}): pip install -e '.[test]'", allow_module_level=True)

from timm.layers import BatchNormAct2d  # noqa: E402
from torchvision.ops.misc import FrozenBatchNorm2d as TvFrozen  # noqa: E402

TOL = dict(rtol=1e-10, atol=1e-10)


def _randomise(m: nn.Module) -> nn.Module:
    with torch.no_grad():
        m.running_mean.uniform_(-1, 1)
        m.running_var.uniform_(0.5, 2)
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-1, 1)
    return m


ACTS = [  # (act_layer, drop_layer, what from_torch makes)
    (nn.LeakyReLU, None, "BatchNormAct2d"),
    (nn.ELU, None, "BatchNormAct2d"),
    (nn.ReLU, None, "BatchNormAct2d"),
    (nn.SiLU, None, "BatchNormAct2d"),
    (nn.GELU, None, "BatchNormAct2d"),
    (nn.Identity, None, "BatchNormAct2d"),
    (nn.Hardswish, None, "BatchNormThen2d"),  # no kernel: timm's module kept
    (nn.PReLU, None, "BatchNormThen2d"),  # a parameter of its own: key act.weight kept
    (nn.LeakyReLU, nn.Dropout, "BatchNormThen2d"),  # dropout between BN and activation
]


@pytest.mark.parametrize("act,drop,into", ACTS, ids=[f"{a.__name__}-{d and d.__name__}" for a, d, _ in ACTS])
def test_batchnormact2d_converts_to_the_same_function(act, drop, into):
    layer = _randomise(BatchNormAct2d(6, act_layer=act, drop_layer=drop)).double()
    original = copy.deepcopy(layer)
    keys = list(layer.state_dict())
    ours = batchnorm.from_torch(layer)
    assert type(ours).__name__ == into and list(ours.state_dict()) == keys
    if into == "BatchNormAct2d":
        assert ours.saves_output() == (act in (nn.LeakyReLU, nn.ELU, nn.Identity))
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)
    out = ours(x)
    torch.manual_seed(1)  # the same dropout mask
    out_ref = original(x)
    torch.testing.assert_close(out, out_ref, **TOL)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, ours.weight, ours.bias], g)
    grads_ref = torch.autograd.grad(out_ref, [x, original.weight, original.bias], g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(ours.running_var, original.running_var, **TOL)
    back = batchnorm.to_torch(ours)
    assert type(back) is BatchNormAct2d and type(back.act) is act


def test_torchvision_frozen_converts_and_its_checkpoints_load_both_ways():
    frozen = _randomise(TvFrozen(5)).double()
    ours = batchnorm.from_torch(copy.deepcopy(frozen))
    assert isinstance(ours, batchnorm.FrozenBatchNorm2d)
    assert list(ours.state_dict()) == list(frozen.state_dict())  # no num_batches_tracked
    bn_checkpoint = nn.BatchNorm2d(5).double().state_dict()  # has num_batches_tracked
    ours.load_state_dict(bn_checkpoint)  # dropped, as torchvision's layer drops it
    frozen.load_state_dict(bn_checkpoint)
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(ours(x), frozen(x), **TOL)
    assert type(batchnorm.to_torch(ours)) is TvFrozen


@pytest.mark.parametrize("drop", [None, nn.Dropout])
def test_fold_folds_timm_bn_act_and_keeps_activation_and_dropout(drop):
    class Block(nn.Module):  # not a Sequential: the fx pass
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, groups=3)
            self.bn = BatchNormAct2d(6, act_layer=nn.SiLU, drop_layer=drop)

        def forward(self, x):
            return self.bn(self.conv(x)) * 2

    for model in (Block(), nn.Sequential(nn.Conv2d(3, 6, 3, groups=3),
                                         BatchNormAct2d(6, act_layer=nn.SiLU, drop_layer=drop))):
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                _randomise(m)
        model = model.double().eval()
        folded, report = batchnorm.fold(model)
        assert len(report.folded) == 1 and report.kept == []
        after = folded.get_submodule(report.folded[0][0])
        if drop is None:
            assert type(after) is nn.SiLU
        else:
            assert [type(m) for m in after] == [nn.Dropout, nn.SiLU]
        x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
        torch.testing.assert_close(folded(x), model(x), **TOL)


def test_memory_saving_false_is_exact_for_zero_gamma_and_in_place_safe():
    """The two cautions of the memory-saving layer, and the way out: with gamma = 0 it
    computes with the 1e-5 floor, and an in-place op on its output makes autograd raise;
    memory_saving=False is exact and in-place safe."""
    layer = BatchNormAct2d(4, act_layer=nn.LeakyReLU).double()
    with torch.no_grad():
        layer.weight.zero_()
    x = torch.randn(4, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    saving = batchnorm.from_torch(copy.deepcopy(layer))
    exact = batchnorm.from_torch(copy.deepcopy(layer), memory_saving=False)
    assert saving.saves_output() and not exact.saves_output()
    diff = (saving(x) - layer(x)).abs().max().item()
    assert 0 < diff <= 1e-5 * 35**0.5  # weight_eps * max |x_hat| (sqrt(m - 1), m = 36 values)
    torch.testing.assert_close(exact(x), copy.deepcopy(layer)(x), **TOL)
    with pytest.raises(RuntimeError, match="inplace"):
        saving(x).add_(1).sum().backward()
    out = exact(x)
    out.add_(1).sum().backward()  # in place after the exact layer: fine
    assert x.grad is not None
