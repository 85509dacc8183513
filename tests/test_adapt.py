"""adapt: AdaBN re-estimates statistics on target data (little change on source-like data),
TENT lowers the prediction entropy by training only BN affine parameters, and restore()
gives the source state back bit for bit."""

import pytest
import torch
from torch import nn

import batchnorm

BN = {"torch": (nn.BatchNorm2d, nn.BatchNorm1d), "ours": (batchnorm.BatchNorm2d, batchnorm.BatchNorm1d)}


def _classifier(impl="torch"):
    bn2d, bn1d = BN[impl]
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), bn2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), bn2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6), bn1d(6), nn.Linear(6, 4),
    )


def _source(k=6, n=16, scale=1.0, shift=0.0):
    return [torch.randn(n, 3, 8, 8) * scale + shift for _ in range(k)]


def _trained(impl="torch"):
    """A model whose statistics are the source population's (as after training)."""
    return batchnorm.recalibrate(_classifier(impl), _source(), progress=False)


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(m.training, getattr(m, "track_running_stats", None)) for m in model.modules()],
            [(p, p.requires_grad) for p in model.parameters()])


def _assert_same_state(model, snap):
    state, flags, params = snap
    assert model.state_dict().keys() == state.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert [(m.training, getattr(m, "track_running_stats", None)) for m in model.modules()] == flags
    assert [(p, p.requires_grad) for p in model.parameters()] == params  # same Parameter objects


def _bns(model):
    return [m for m in model.modules() if batchnorm.is_batchnorm(m)]


def _changes(model, data):
    """Per BN layer: (largest mean shift in running std, largest |log variance ratio|,
    and the 5-standard-error bounds on both for an unchanged population with n values)."""
    before = [(m.running_mean.clone(), m.running_var.clone()) for m in _bns(model)]
    batchnorm.adapt(model, data, "adabn", progress=False)
    out = []
    for (mean, var), m in zip(before, _bns(model)):
        spatial = 64 if m.num_features == 8 else 1  # conv BNs (8 channels) see 8x8 maps
        n = m.num_batches_tracked.item() * data[0].shape[0] * spatial
        shift = ((m.running_mean - mean).abs() / var.sqrt()).max().item()
        ratio = (m.running_var / var).log().abs().max().item()
        out.append((shift, ratio, 5 * (2 / n) ** 0.5, 5 * (4 / (n - 1)) ** 0.5))
    return out


@pytest.mark.parametrize("impl", ["torch", "ours"])
def test_adabn_on_source_like_data_changes_little(impl):
    model = _trained(impl)
    x = torch.randn(32, 3, 8, 8)
    with torch.no_grad():
        before = model.eval()(x)
    for shift, ratio, shift_bound, ratio_bound in _changes(model, _source(k=8, n=32)):
        assert shift < shift_bound and ratio < ratio_bound  # sampling noise only
    with torch.no_grad():
        assert (model(x) - before).abs().max() < 0.1 * before.abs().max()
    # ...while shifted data moves the statistics far beyond that noise
    moved = _changes(_trained(impl), _source(k=8, n=32, scale=3.0, shift=2.0))
    assert any(shift > 4 * bound for shift, _, bound, _ in moved)


def test_adabn_takes_the_target_statistics():
    model = _trained()
    target = _source(scale=3.0, shift=2.0)
    result = batchnorm.adapt(model, target, "adabn", progress=False)
    # the first BN sees conv(x): its statistics are those of the target data through conv1
    with torch.no_grad():
        z = model[0](torch.cat(target)).transpose(0, 1).flatten(1).double()
    torch.testing.assert_close(model[1].running_mean, z.mean(1).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model[1].running_var, z.var(1).float(), rtol=1e-5, atol=1e-5)
    assert result.method == "adabn" and result.entropy == []


@pytest.mark.parametrize("impl", ["torch", "ours"])
def test_tent_lowers_entropy_and_trains_only_bn_affine(impl):
    model = _trained(impl)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    x = torch.randn(32, 3, 8, 8) * 2 + 1  # shifted target batch, adapted on repeatedly
    result = batchnorm.adapt(model, [x] * 15, "tent", progress=False)
    assert len(result.entropy) == 15 and result.entropy[-1] < result.entropy[0] - 1e-3
    bn_params = {f"{n}.{k}" for n, m in model.named_modules() if batchnorm.is_batchnorm(m)
                 for k in ("weight", "bias")}
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]) != (n in bn_params), n  # BN affine moved, nothing else
        assert p.requires_grad == flags[n] and p.grad is None
    # afterwards: eval mode, BN normalising with batch statistics (TENT's inference)
    assert not model.training
    assert all(m.running_mean is None for m in model.modules() if batchnorm.is_batchnorm(m))
    with torch.no_grad():
        assert model(x).shape == (32, 4)


@pytest.mark.parametrize("method", ["adabn", "tent"])
def test_restore_gives_back_the_source_state_bit_exactly(method):
    model = _trained()
    model[4].weight.grad = torch.ones(8)  # a gradient the user had is kept too
    x = torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        before = model.eval()(x)
    model.train()
    snap = _snapshot(model)
    result = batchnorm.adapt(model, _source(k=3, shift=1.0), method, keep_source=True,
                             progress=False)
    assert not torch.equal(model.state_dict()["1.weight" if method == "tent" else "1.running_mean"],
                           snap[0]["1.weight" if method == "tent" else "1.running_mean"])
    assert result.restore() is model
    _assert_same_state(model, snap)
    assert torch.equal(model[4].weight.grad, torch.ones(8))
    with torch.no_grad():
        assert torch.equal(model.eval()(x), before)


def test_restore_needs_keep_source_and_bad_arguments_raise():
    model = _trained()
    result = batchnorm.adapt(model, _source(k=1), "adabn", progress=False)
    with pytest.raises(RuntimeError, match="keep_source=True"):
        result.restore()
    with pytest.raises(ValueError, match="method must be one of"):
        batchnorm.adapt(model, _source(k=1), "bn-adapt")
    no_affine = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2, affine=False))
    with pytest.raises(ValueError, match="no BN layer, or all with affine=False"):
        batchnorm.adapt(no_affine, _source(k=1), "tent", progress=False)
