"""from_torch / to_torch swap layers in any model, keep names, tensors and state, and a
converted model trains step for step like the original."""

import copy
import functools

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import batchnorm


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.ModuleDict({"a": nn.Sequential(nn.Conv1d(8, 8, 1), nn.BatchNorm1d(8, momentum=None))})
        self.head = nn.Linear(8, 4)
        self.norm3 = nn.BatchNorm3d(2, affine=False)

    def forward(self, x):
        h = self.features(x).mean(-1)
        h = self.blocks["a"](h).mean(-1)
        return self.head(h)


def test_from_torch_swaps_every_batchnorm_and_keeps_the_same_tensors():
    model = Net()
    params_before = {k: v for k, v in model.named_parameters()}
    keys_before = list(model.state_dict())
    batchnorm.from_torch(model)
    assert isinstance(model.features[1], batchnorm.BatchNorm2d)
    assert isinstance(model.blocks["a"][1], batchnorm.BatchNorm1d)
    assert model.blocks["a"][1].momentum is None
    assert isinstance(model.norm3, batchnorm.BatchNorm3d) and not model.norm3.affine
    assert list(model.state_dict()) == keys_before
    for k, v in model.named_parameters():
        assert v is params_before[k]
    batchnorm.to_torch(model)
    assert type(model.features[1]) is nn.BatchNorm2d and type(model.norm3) is nn.BatchNorm3d


def test_a_bare_layer_converts_and_keeps_its_mode():
    bn = nn.BatchNorm1d(4).eval()
    ours = batchnorm.from_torch(bn)
    assert isinstance(ours, batchnorm.BatchNorm1d) and not ours.training


def test_converted_model_trains_step_for_step_like_the_original():
    torch.manual_seed(0)
    original = Net()
    converted = batchnorm.from_torch(copy.deepcopy(original))
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (original, converted)]
    for step in range(5):
        x, t = torch.randn(6, 3, 10, 10), torch.randint(0, 4, (6,))
        losses = []
        for model, opt in zip((original, converted), opts):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), t)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) < 1e-5, f"step {step}: {losses}"
    for (k, a), (_, b) in zip(original.state_dict().items(), converted.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)


# -- recognised as BN by code written for torch.nn --------------------------------------------
TRAINABLE = [
    (batchnorm.BatchNorm1d, nn.BatchNorm1d), (batchnorm.BatchNorm2d, nn.BatchNorm2d),
    (batchnorm.BatchNorm3d, nn.BatchNorm3d),
] + [(cls, {"1d": nn.BatchNorm1d, "2d": nn.BatchNorm2d, "3d": nn.BatchNorm3d}[cls.__name__[-2:]])
     for cls in batchnorm.variants.TRAINABLE]


@pytest.mark.parametrize("ours,theirs", TRAINABLE, ids=[c.__name__ for c, _ in TRAINABLE])
def test_every_trainable_layer_is_an_instance_of_torch_nn_bn(ours, theirs):
    layer = ours(4)
    assert isinstance(layer, theirs) and isinstance(layer, nn.modules.batchnorm._BatchNorm)
    assert list(layer.state_dict()) == list(theirs(4).state_dict())
    x = torch.randn(3, 4, 5) if theirs is nn.BatchNorm1d else torch.randn(
        (3, 4, 5, 5) if theirs is nn.BatchNorm2d else (3, 4, 2, 3, 3))
    with pytest.raises(ValueError, match="expects"):  # our guard, through torch.nn's name too
        layer._check_input_dim(x[:, :2])
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError):
        layer(x[:, :2])  # our forward: bad input leaves the state untouched
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())


def test_a_new_sized_layer_must_name_torch_nn_class():
    """A 1d/2d/3d member of the family that forgets torch.nn's class of its row (and so
    would not be seen as BN by torch.nn code) is refused when it is defined."""
    from batchnorm.core.modules import _BatchNorm

    with pytest.raises(TypeError, match=r"must also subclass torch\.nn\.BatchNorm2d"):
        class Forgot2d(_BatchNorm, dims="2d", example=("16", "8, 16, 32, 32")): ...

    class _Family(_BatchNorm): ...  # its own family: BatchNorm2d stays _BatchNorm's "2d"

    class Named2d(_Family, nn.BatchNorm2d, dims="2d", example=("16", "8, 16, 32, 32")): ...
    assert isinstance(Named2d(3), nn.BatchNorm2d) and _Family.sized("2d") is Named2d
    assert _BatchNorm.sized("2d") is batchnorm.BatchNorm2d


def _loader():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(5, 3, 6, 6, generator=g) * 2 + 1 for _ in range(4)]


def _net(norm):
    return nn.Sequential(nn.Conv2d(3, 4, 3), norm(4), nn.ReLU(), nn.Conv2d(4, 4, 1), norm(4))


@pytest.mark.parametrize("norm", [
    batchnorm.BatchNorm2d, batchnorm.GhostBatchNorm2d,
    functools.partial(batchnorm.BatchRenorm2d, r_max=1.0, d_max=0.0),
], ids=["bn", "ghost", "renorm"])
def test_swa_update_bn_recomputes_our_statistics_like_torch_nn(norm):
    """update_bn resets each _BatchNorm, sets momentum None (cumulative average) and runs
    the data: ours must come out with torch.nn's statistics (one sub-batch / warm-up:
    Ghost and Renorm with r_max=1, d_max=0 are plain BN here)."""
    torch.manual_seed(0)
    theirs = _net(nn.BatchNorm2d)
    ours = from_torch_copy(theirs, norm)
    torch.optim.swa_utils.update_bn(_loader(), theirs)
    torch.optim.swa_utils.update_bn(_loader(), ours)
    for (k, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    assert ours[1].momentum == 0.1  # restored


def from_torch_copy(model, norm):
    """``model`` with each BatchNorm2d replaced by ``norm`` holding a copy of its state."""
    out = copy.deepcopy(model)
    for i, m in enumerate(out):
        if isinstance(m, nn.BatchNorm2d):
            layer = norm(m.num_features)
            layer.load_state_dict(m.state_dict())
            out[i] = layer
    return out


def test_torch_convert_sync_batchnorm_converts_ours():
    """torch's converter sees ours as BN (as it sees timm's); batchnorm.convert_sync_batchnorm
    stays the better route (it keeps batchnorm's layer and guards)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), batchnorm.BatchNorm2d(4), batchnorm.BatchNormAct2d(4))
    weight = model[1].weight
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(synced[1]) is nn.SyncBatchNorm and type(synced[2]) is nn.SyncBatchNorm
    assert synced[1].weight is weight
    ours = batchnorm.convert.convert_sync_batchnorm(
        nn.Sequential(nn.Conv2d(3, 4, 3), batchnorm.BatchNorm2d(4)))
    assert type(ours[1]) is batchnorm.SyncBatchNorm


# -- from_torch: what it converts, what it leaves, and says so --------------------------------
def test_report_lists_every_conversion_and_a_warning_names_what_is_left():
    class Custom(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    class Subclass(nn.BatchNorm1d):  # keeps torch.nn's forward: converts
        pass

    model = nn.Sequential(nn.BatchNorm2d(3), Custom(3), nn.LazyBatchNorm2d(), Subclass(3),
                          nn.SyncBatchNorm(3))
    with pytest.warns(UserWarning, match="left layer") as caught:
        converted, report = batchnorm.from_torch(model, report=True)
    assert [(n, a, b) for n, a, b in report.converted] == [
        ("0", "torch.BatchNorm2d", "batchnorm.BatchNorm2d"),
        ("3", f"{Subclass.__module__.split('.')[0]}.Subclass", "batchnorm.BatchNorm1d"),
        ("4", "torch.SyncBatchNorm", "batchnorm.SyncBatchNorm"),
    ]
    kept = {n: why for n, _, why in report.kept}
    assert set(kept) == {"1", "2"}
    assert "overrides forward" in kept["1"] and "run one forward pass" in kept["2"]
    assert "1 (Custom" in str(caught[0].message) and "2 (LazyBatchNorm2d" in str(caught[0].message)
    assert "kept   1 (Custom)" in str(report)


def test_materialised_lazy_layer_converts():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d())
    model(torch.randn(2, 3, 4, 4))
    assert isinstance(batchnorm.from_torch(model)[1], batchnorm.BatchNorm2d)


def test_to_torch_gives_back_the_very_class_converted():
    class Subclass(nn.BatchNorm2d):
        pass

    model = nn.Sequential(Subclass(3, momentum=0.3), nn.SyncBatchNorm(3), nn.BatchNorm1d(3).eval())
    keys = list(model.state_dict())
    batchnorm.from_torch(model)
    model[0].eps = 1e-3  # hyper-parameters changed after converting are kept
    back = batchnorm.to_torch(model)
    assert [type(m) for m in back] == [Subclass, nn.SyncBatchNorm, nn.BatchNorm1d]
    assert back[0].eps == 1e-3 and back[0].momentum == 0.3 and not back[2].training
    assert list(back.state_dict()) == keys


# -- activations=True: BN + activation merged through torch.fx ---------------------------------
class Functional(nn.Module):
    """BN followed by activation calls of every kind plain torch code uses."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bns = nn.ModuleList(nn.BatchNorm2d(6) for _ in range(7))
        self.act = nn.LeakyReLU(0.2)
        self.shared = nn.BatchNorm2d(6)

    def forward(self, x):
        b = self.bns
        x = torch.relu(b[0](self.conv(x)))
        x = F.leaky_relu(b[1](x), 0.1)
        x = b[2](x).relu()
        x = F.elu(b[3](x), alpha=0.5)
        x = self.act(b[4](x))
        y = b[5](x)
        x = F.relu(y) + y  # BN output used twice: not merged
        x = F.gelu(b[6](x), approximate="tanh")  # no exact kernel: not merged
        return F.relu(self.shared(x)) + self.shared(x)  # BN called twice: not merged


def test_activations_merge_only_where_the_function_is_the_same():
    torch.manual_seed(0)
    model = Functional().double()
    original = copy.deepcopy(model)
    keys = list(model.state_dict())
    converted, report = batchnorm.from_torch(model, activations=True, report=True)
    merged = dict(report.merged)
    assert set(merged) == {"bns.0", "bns.1", "bns.2", "bns.3", "bns.4"}
    assert merged["bns.4"] == "act (LeakyReLU)" and merged["bns.2"] == "Tensor.relu"
    unmerged = dict(report.unmerged)
    assert set(unmerged) == {"bns.5", "shared"}
    assert "also used by" in unmerged["bns.5"] and "more than once" in unmerged["shared"]
    bn1, bn3 = converted.get_submodule("bns.1"), converted.get_submodule("bns.3")
    assert bn1.act == "leaky_relu" and bn1.alpha == 0.1 and bn3.act == "elu" and bn3.alpha == 0.5
    assert list(converted.state_dict()) == keys
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    out, out_ref = converted(x), original(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    for (n, p), (_, q) in zip(converted.named_parameters(), original.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-8, msg=n)
    for (n, a), (_, b) in zip(converted.state_dict().items(), original.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=n)


def test_untraceable_model_converts_and_says_nothing_was_merged():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x):
            return torch.relu(self.bn(x)) if x.sum() > 0 else x

    with pytest.warns(UserWarning, match="cannot trace"):
        model, report = batchnorm.from_torch(Dynamic(), activations=True, report=True)
    assert isinstance(model.bn, batchnorm.BatchNorm1d) and report.merged == []
    assert report.unmerged[0][0] == "<model>"
