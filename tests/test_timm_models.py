"""Real timm models (timm 1.0.31, random weights, nothing downloads): from_torch converts
every BN layer, the converted model trains (float64: outputs, every gradient, running
statistics) and evaluates like the original to 1e-8 (relative to each tensor's largest
element), keeps the state_dict keys, the very
parameter tensors and train flags; to_torch gives the original classes back; fold leaves
no BN after a convolution and computes what the original computes.

timm imports torchvision, whose PyPI build cannot load its C extension on CPU torch 2.13:
``tests/real_timm.py`` says how the real timm is imported all the same.
"""

import copy

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.layers import is_frozen_batchnorm
from real_timm import import_timm

try:
    timm = import_timm()
except ImportError as exc:  # the test extra pins timm; say so when it is missing
    pytest.skip(f"timm is not installed ({exc}): pip install -e '.[test]'", allow_module_level=True)

TOL = dict(rtol=1e-8, atol=1e-8)


def _same(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    """Equal to 1e-8 relative to the tensor's largest element (gradients of the stem reach
    1e5 in float64 after 50 BN layers; elementwise rtol would ask ~1e-14 of small
    entries, beyond what a different summation order gives)."""
    assert a.shape == b.shape, what
    scale = max(1.0, b.abs().max().item())
    err = (a - b).abs().max().item()
    assert err <= 1e-8 * scale, f"{what}: max difference {err:.3g}, largest element {scale:.3g}"
#: eight families whose models use BN: (name, input size). Each BN is a timm BatchNormAct2d
#: (leaky ReLU, SiLU, ReLU, hard-swish) or a torch.nn BatchNorm2d.
MODELS = [
    ("efficientnet_b0", 32),  # BatchNormAct2d + SiLU, depthwise convolutions
    ("cspdarknet53", 32),  # BatchNormAct2d + leaky ReLU: the memory-saving kind
    ("resnet18", 32),  # torch.nn BatchNorm2d, separate ReLU modules
    ("dla34", 32),  # torch.nn BatchNorm2d, tree aggregation
    ("mobilenetv3_small_050", 32),  # BatchNormAct2d + hard-swish (no kernel) and ReLU
    ("regnetx_002", 32),  # BatchNormAct2d + ReLU, grouped convolutions
    ("densenet121", 32),  # BatchNormAct2d before convolutions (pre-activation)
    ("dpn48b", 32),  # BatchNormAct2d + ReLU, dual-path blocks
]


def _bn_like(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules()
            if batchnorm.is_batchnorm(m) or is_frozen_batchnorm(m)]


def _randomise(model: nn.Module) -> nn.Module:
    """Non-trivial statistics and affine parameters. |gamma| >= 0.5: the memory-saving
    BatchNormAct is exact for |gamma| >= weight_eps (timm zero-initialises some)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, m in _bn_like(model):
            for t, lo, hi in ((m.running_mean, -0.5, 0.5), (m.running_var, 0.5, 2.0),
                              (m.weight, 0.5, 1.5), (m.bias, -0.5, 0.5)):
                if t is not None:
                    t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) * (hi - lo) + lo)
    return model


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return _randomise(timm.create_model(name, pretrained=False, num_classes=5)).double()


def _step(model: nn.Module, x: torch.Tensor, opt: torch.optim.Optimizer) -> torch.Tensor:
    opt.zero_grad()
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    return out, grads


@pytest.mark.parametrize("name,size", MODELS, ids=[m for m, _ in MODELS])
def test_every_bn_converts_and_trains_like_the_original(name, size):
    model = _build(name)
    original = copy.deepcopy(model)
    n_bn = len(_bn_like(model))
    keys, params = list(model.state_dict()), dict(model.named_parameters())
    flags = {n: m.training for n, m in model.named_modules()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # built BEFORE converting
    opt_ref = torch.optim.SGD(original.parameters(), lr=0.1, momentum=0.9)

    converted, report = batchnorm.from_torch(model, report=True)
    assert report.kept == [] and len(report.converted) == n_bn > 0
    left = [n for n, m in _bn_like(converted) if not type(m).__module__.startswith("batchnorm.")]
    assert left == []
    assert list(converted.state_dict()) == keys
    assert all(p is params[n] for n, p in converted.named_parameters())
    assert all(m.training == flags[n] for n, m in converted.named_modules())

    x = torch.randn(4, 3, size, size, dtype=torch.float64)  # 4 values per channel at 1x1
    out_ref, grads_ref = _step(original, x, opt_ref)
    out, grads = _step(converted, x, opt)
    torch.testing.assert_close(out, out_ref, **TOL)
    assert grads.keys() == grads_ref.keys()
    for n in grads:
        _same(grads[n], grads_ref[n], n)
    for (n, a), (_, b) in zip(converted.state_dict().items(), original.state_dict().items()):
        _same(a, b, n)  # running statistics, step counts,
    with torch.no_grad():  # and the parameters the optimizer built before updated
        torch.testing.assert_close(converted.eval()(x), original.eval()(x), **TOL)


@pytest.mark.parametrize("name,size", MODELS, ids=[m for m, _ in MODELS])
def test_fold_leaves_no_bn_after_a_convolution(name, size):
    model = _build(name).eval()
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    for source in (model, batchnorm.from_torch(copy.deepcopy(model))):
        folded, report = batchnorm.fold(source)
        assert len(report.folded) + len(report.kept) == len(_bn_like(source))
        for bn, why in report.kept:  # densenet's pre-activation BN follows concatenations
            assert why.startswith("follows ") and "not a Conv" in why, (bn, why)
        assert len(_bn_like(folded)) == len(report.kept)
        with torch.no_grad():
            torch.testing.assert_close(folded(x), source(x), **TOL)


@pytest.mark.parametrize("name", ["cspdarknet53", "mobilenetv3_small_050"])
def test_checkpoints_load_both_ways_and_to_torch_restores_timm(name):
    model = _build(name)
    checkpoint = copy.deepcopy(model.state_dict())  # what a pretrained timm file holds
    classes = {n: type(m) for n, m in model.named_modules()}
    converted = batchnorm.from_torch(timm.create_model(name, pretrained=False, num_classes=5).double())
    converted.load_state_dict(checkpoint)  # strict
    back = batchnorm.to_torch(converted)
    assert {n: type(m) for n, m in back.named_modules()} == classes
    fresh = timm.create_model(name, pretrained=False, num_classes=5).double()
    fresh.load_state_dict(back.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model.eval()(x), **TOL)
        torch.testing.assert_close(back.eval()(x), model(x), **TOL)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "mobilenetv3_small_050"])
def test_frozen_timm_and_torchvision_layers_convert_and_fold(name):
    frozen = timm.layers.freeze_batch_norm_2d(_build(name)).eval()
    kinds = {type(m).__name__ for _, m in _bn_like(frozen)}
    assert kinds <= {"FrozenBatchNorm2d", "FrozenBatchNormAct2d"} and kinds
    original = copy.deepcopy(frozen)
    keys = list(frozen.state_dict())
    converted, report = batchnorm.from_torch(frozen, report=True)
    assert report.kept == [] and len(report.converted) == len(_bn_like(original))
    assert {to for _, _, to in report.converted} <= {
        "batchnorm.FrozenBatchNorm2d", "batchnorm.FrozenBatchNormThen2d"}
    assert list(converted.state_dict()) == keys
    converted.load_state_dict(original.state_dict())  # torchvision's keys load (strict)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    out, out_ref = converted(x), original(x)
    torch.testing.assert_close(out, out_ref, **TOL)
    (g,) = torch.autograd.grad(out.sum(), x)
    (g_ref,) = torch.autograd.grad(out_ref.sum(), x)
    torch.testing.assert_close(g, g_ref, **TOL)
    folded, report = batchnorm.fold(converted)
    assert report.kept == [] and not _bn_like(folded)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), out_ref, **TOL)
    back = batchnorm.to_torch(converted)
    assert {type(m) for _, m in _bn_like(back)} == {type(m) for _, m in _bn_like(original)}


def test_timm_sync_batchnorm_act_converts_and_trains_like_the_original():
    """timm's convert_sync_batchnorm makes SyncBatchNormAct (and torch.nn SyncBatchNorm);
    outside torch.distributed both compute plain BN, as batchnorm's SyncBatchNorm does."""
    model = timm.layers.convert_sync_batchnorm(_build("mobilenetv3_small_050"))
    kinds = {type(m).__name__ for _, m in _bn_like(model)}
    assert kinds == {"SyncBatchNormAct"}
    original = copy.deepcopy(model)
    converted, report = batchnorm.from_torch(model, report=True)
    assert {to for _, _, to in report.converted} == {"batchnorm.SyncBatchNormThen"}
    opt = torch.optim.SGD(converted.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(original.parameters(), lr=0.1)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out, grads = _step(converted, x, opt)
    out_ref, grads_ref = _step(original, x, opt_ref)
    torch.testing.assert_close(out, out_ref, **TOL)
    for n in grads_ref:
        _same(grads[n], grads_ref[n], n)
    assert {type(m) for _, m in _bn_like(batchnorm.to_torch(converted))} == {
        timm.layers.SyncBatchNormAct}


def test_a_subclass_with_its_own_forward_is_left_and_reported():
    """timm's SplitBatchNorm2d (AugMix's split BN) overrides forward: left, its auxiliary
    BN layers (plain torch.nn) convert."""
    from timm.layers.split_batchnorm import SplitBatchNorm2d

    model = nn.Sequential(nn.Conv2d(3, 4, 3), SplitBatchNorm2d(4, num_splits=2))
    with pytest.warns(UserWarning, match="overrides forward"):
        _, report = batchnorm.from_torch(model, report=True)
    assert [(n, c) for n, c, _ in report.kept] == [("1", "SplitBatchNorm2d")]
    assert [n for n, _, _ in report.converted] == ["1.aux_bn.0"]


def test_torchvision_resnet_merges_bn_and_relu_through_fx():
    """The real torchvision resnet18 calls one ReLU module after bn1 of the stem and of
    every block (merged), and after the residual sum (bn2's output feeds the sum: not)."""
    import torchvision

    torch.manual_seed(0)
    model = _randomise(torchvision.models.resnet18(weights=None, num_classes=5)).double()
    original = copy.deepcopy(model)
    keys = list(model.state_dict())
    converted, report = batchnorm.from_torch(model, activations=True, report=True)
    assert len(report.converted) == 20 and len(report.merged) == 9
    assert ("layer1.0.bn1", "layer1.0.relu (ReLU)") in report.merged
    assert list(converted.state_dict()) == keys
    assert sum(isinstance(m, batchnorm.BatchNormAct2d) for m in converted.modules()) == 9
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    out, grads = _step(converted, x, torch.optim.SGD(converted.parameters(), lr=0.1))
    out_ref, grads_ref = _step(original, x, torch.optim.SGD(original.parameters(), lr=0.1))
    torch.testing.assert_close(out, out_ref, **TOL)
    for n in grads_ref:
        _same(grads[n], grads_ref[n], n)
