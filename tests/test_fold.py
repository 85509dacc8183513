"""fold: the folded model computes what the original computes in eval mode (float32,
1e-5), BN layers that cannot be folded stay and are reported, the original is untouched."""

import pytest
import torch
from torch import fx, nn

import batchnorm
from batchnorm.fold import FoldReport

TOL = dict(rtol=1e-5, atol=1e-5)


def _randomise(model: nn.Module) -> nn.Module:
    """Non-trivial statistics and affine parameters, then eval mode."""
    with torch.no_grad():
        for m in model.modules():
            if batchnorm.is_batchnorm(m) or isinstance(m, batchnorm.variants.FROZEN):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.3, 3)
                if m.weight is not None:
                    m.weight.uniform_(-1.5, 1.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.uniform_(-1, 1)
    return model.eval()


def _norms(model):
    return [m for m in model.modules() if batchnorm.is_batchnorm(m)]


LAYERS = [  # (layer, BN class, input shape)
    (lambda: nn.Linear(6, 5), "1d", (7, 6)),
    (lambda: nn.Linear(6, 5, bias=False), "1d", (7, 6)),
    (lambda: nn.Conv1d(4, 6, 3), "1d", (3, 4, 9)),
    (lambda: nn.Conv2d(4, 6, 3, groups=2, bias=False), "2d", (3, 4, 8, 7)),
    (lambda: nn.Conv3d(2, 4, 2), "3d", (2, 2, 4, 5, 4)),
    (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2), "1d", (3, 4, 5)),
    (lambda: nn.ConvTranspose2d(4, 6, 3, groups=2), "2d", (3, 4, 5, 6)),
    (lambda: nn.ConvTranspose3d(2, 4, 2, bias=False), "3d", (2, 2, 3, 4, 3)),
]
BNS = {
    ("torch", "1d"): nn.BatchNorm1d, ("torch", "2d"): nn.BatchNorm2d, ("torch", "3d"): nn.BatchNorm3d,
    ("ours", "1d"): batchnorm.BatchNorm1d, ("ours", "2d"): batchnorm.BatchNorm2d,
    ("ours", "3d"): batchnorm.BatchNorm3d,
}


@pytest.mark.parametrize("make_layer,dims,shape", LAYERS, ids=[
    "linear", "linear-nobias", "conv1d", "conv2d-groups-nobias", "conv3d", "convT1d-stride",
    "convT2d-groups", "convT3d-nobias"])
@pytest.mark.parametrize("impl", ["torch", "ours"])
@pytest.mark.parametrize("affine", [True, False])
def test_sequential_fold_is_exact(make_layer, dims, shape, impl, affine):
    layer = make_layer()
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    model = _randomise(nn.Sequential(layer, BNS[impl, dims](out, affine=affine), nn.ReLU()))
    x = torch.randn(shape) * 2 + 0.5
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded, report = batchnorm.fold(model)
    torch.testing.assert_close(folded(x), model(x), **TOL)
    assert type(folded) is nn.Sequential and not _norms(folded)
    assert report.folded == [("1", "0")] and report.kept == []
    for k, v in model.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k])


class Block(nn.Module):
    """Residual block with torch.nn and our BN, a branch and a projection shortcut."""

    def __init__(self, c_in, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = batchnorm.BatchNorm2d(c)
        self.proj = nn.Sequential(nn.Conv2d(c_in, c, 1, bias=False), batchnorm.BatchNorm2d(c))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.proj(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = batchnorm.BatchNorm2d(8)
        self.blocks = nn.Sequential(Block(8, 8), Block(8, 12))
        self.head = nn.Linear(12, 5)
        self.head_bn = nn.BatchNorm1d(5)

    def forward(self, x):
        x = self.blocks(torch.relu(self.bn(self.stem(x))))
        return self.head_bn(self.head(x.mean((2, 3))))


def test_fx_fold_of_residual_model_is_exact():
    model = _randomise(Net())
    x = torch.randn(4, 3, 10, 10)
    folded, report = batchnorm.fold(model)
    assert isinstance(folded, fx.GraphModule)
    assert not _norms(folded) and report.kept == []
    assert ("blocks.0.bn2", "blocks.0.conv2") in report.folded
    assert ("blocks.1.proj.1", "blocks.1.proj.0") in report.folded
    assert len(report.folded) == 8  # stem, 3 per block, head
    torch.testing.assert_close(folded(x), model(x), **TOL)


class Shared(nn.Module):
    """conv's output feeds a BN and a residual; a BN after a ReLU; a conv called twice."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.after_relu = batchnorm.BatchNorm2d(4)
        self.twice = nn.Conv2d(4, 4, 1)
        self.bn_twice = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        z = self.after_relu(torch.relu(self.bn(y) + y))
        return self.bn_twice(self.twice(z)) + self.twice(x)


def test_unfoldable_bn_stays_and_is_reported():
    model = _randomise(Shared())
    x = torch.randn(2, 4, 6, 6)
    with pytest.warns(UserWarning, match="fold kept BN"):
        folded, report = batchnorm.fold(model)
    kept = dict(report.kept)
    assert set(kept) == {"bn", "after_relu", "bn_twice"} and report.folded == []
    assert "also used elsewhere" in kept["bn"]
    assert "follows relu" in kept["after_relu"].lower()
    assert "called more than once" in kept["bn_twice"]
    torch.testing.assert_close(folded(x), model(x), **TOL)
    assert "kept   bn:" in str(report)


def test_training_mode_and_statless_bn_are_kept():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4),
                          nn.Conv2d(4, 4, 1), batchnorm.BatchNorm2d(4, track_running_stats=False))
    model.eval()
    model[1].train()
    with pytest.warns(UserWarning):
        folded, report = batchnorm.fold(model)
    kept = dict(report.kept)
    assert "training mode" in kept["1"] and "no running statistics" in kept["3"]
    assert type(folded) is nn.Sequential  # nothing could fold: no tracing, same classes


class Dynamic(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.features(x)
        return self.bn(y) if y.sum() > 0 else -y


def test_untraceable_model_folds_its_sequentials_and_reports_the_rest():
    model = _randomise(Dynamic())
    x = torch.randn(2, 3, 6, 6)
    with pytest.warns(UserWarning, match="cannot trace"):
        folded, report = batchnorm.fold(model)
    assert report.folded == [("features.1", "features.0")]
    assert [k for k, _ in report.kept] == ["bn"]
    assert isinstance(folded.features[1], nn.Identity) and type(folded) is Dynamic
    torch.testing.assert_close(folded(x), model(x), **TOL)


def test_frozen_bn_folds_and_bn_with_activation_keeps_its_activation():
    model = _randomise(nn.Sequential(
        nn.Conv2d(3, 4, 3), batchnorm.FrozenBatchNorm2d(4),
        nn.Conv2d(4, 4, 1), batchnorm.BatchNormAct2d(4, act="leaky_relu", alpha=0.2),
        nn.Conv2d(4, 4, 1), batchnorm.FrozenBatchNorm2d(4, act="elu"),
    ))
    x = torch.randn(2, 3, 6, 6)
    folded, report = batchnorm.fold(model)
    assert report.folded == [("1", "0"), ("3", "2"), ("5", "4")] and report.kept == []
    assert [type(m) for m in folded] == [nn.Conv2d, nn.Identity, nn.Conv2d, nn.LeakyReLU,
                                         nn.Conv2d, nn.ELU]
    assert folded[3].negative_slope == 0.2
    torch.testing.assert_close(folded(x), model(x), **TOL)


class TwoHeads(nn.Module):
    """One convolution feeding two BN layers; a BN + activation after a convolution in
    a traced graph; grouped and transposed convolutions; Linear + BatchNorm1d."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(4), batchnorm.BatchNorm2d(4)
        self.grouped = nn.Conv2d(4, 8, 3, groups=4, padding=1, bias=False)
        self.bn_act = batchnorm.BatchNormAct2d(8, act="silu")
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2, groups=2)
        self.bn_up = batchnorm.BatchNormAct2d(6, act="identity")
        self.fc = nn.Linear(6, 5)
        self.bn_fc = nn.BatchNorm1d(5)

    def forward(self, x):
        y = self.conv(x)
        y = self.bn_a(y) + self.bn_b(y)
        y = self.bn_up(self.up(self.bn_act(self.grouped(y))))
        return self.bn_fc(self.fc(y.mean((2, 3))))


def test_conv_feeding_two_bn_is_kept_and_the_rest_folds():
    model = _randomise(TwoHeads())
    x = torch.randn(3, 3, 6, 6)
    with pytest.warns(UserWarning, match="also used elsewhere"):
        folded, report = batchnorm.fold(model)
    kept = dict(report.kept)
    assert set(kept) == {"bn_a", "bn_b"} and all("also used elsewhere" in w for w in kept.values())
    assert dict(report.folded) == {"bn_act": "grouped", "bn_up": "up", "bn_fc": "fc"}
    assert isinstance(folded.bn_act, nn.SiLU)  # the activation stays in the BN's place
    torch.testing.assert_close(folded(x), model(x), **TOL)


def test_report_is_readable():
    report = FoldReport(folded=[("bn", "conv")], kept=[("bn2", "follows ReLU")])
    assert str(report).splitlines() == [
        "folded 1 BN layer(s), kept 1", "  folded bn into conv", "  kept   bn2: follows ReLU"]
