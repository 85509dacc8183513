"""Running-statistics guards: once per step under activation checkpointing, exact over
micro-batches under accumulation, never non-finite; for torch.nn's layers and ours."""

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import batchnorm

TOL = dict(rtol=1e-5, atol=1e-6)
BN2D = {"torch": nn.BatchNorm2d, "ours": batchnorm.BatchNorm2d}
BN1D = {"torch": nn.BatchNorm1d, "ours": batchnorm.BatchNorm1d}


def _net(impl, tail):
    layers = [nn.Conv2d(3, 4, 3), BN2D[impl](4)]
    return nn.Sequential(*layers) if tail else nn.Sequential(*layers, nn.ReLU())


def _train(model, xs, reentrant=None):
    for x in xs:
        x = x.clone().requires_grad_()
        y = model(x) if reentrant is None else checkpoint(model, x, use_reentrant=reentrant)
        y.square().sum().backward()


@pytest.mark.parametrize("impl", ["torch", "ours"])
@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("tail", [True, False], ids=["bn-last", "bn-inside"])
def test_checkpointing_updates_statistics_once_per_step(impl, reentrant, tail):
    xs = [torch.randn(4, 3, 6, 6) for _ in range(3)]
    plain, ckpt = _net(impl, tail), _net(impl, tail)
    ckpt.load_state_dict(plain.state_dict())
    handle = batchnorm.guard(ckpt)  # hooks on torch.nn's layers, nothing for ours
    assert handle.layers == (["1"] if impl == "torch" else [])
    _train(plain, xs)
    _train(ckpt, xs, reentrant)
    bn_plain, bn_ckpt = plain[1], ckpt[1]
    assert bn_ckpt.num_batches_tracked.item() == bn_plain.num_batches_tracked.item() == 3
    torch.testing.assert_close(bn_ckpt.running_mean, bn_plain.running_mean, **TOL)
    torch.testing.assert_close(bn_ckpt.running_var, bn_plain.running_var, **TOL)
    torch.testing.assert_close(ckpt[0].weight.grad, plain[0].weight.grad, **TOL)
    assert bn_ckpt.track_running_stats  # the flag flipped during recomputation is back


def test_unguarded_torch_bn_counts_twice_under_checkpointing():
    """The problem the guard solves (so the test above can fail)."""
    model = _net("torch", tail=False)
    _train(model, [torch.randn(4, 3, 6, 6)], reentrant=True)
    assert model[1].num_batches_tracked.item() == 2


@pytest.mark.parametrize("momentum", [0.1, None])
def test_guard_keeps_non_finite_statistics_out_of_torch_bn(momentum):
    bn = nn.BatchNorm1d(3, momentum=momentum)
    handle = batchnorm.guard(bn)
    bn(torch.randn(5, 3))
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(5, 3)
    x[2, 1] = float("inf")
    with pytest.warns(RuntimeWarning, match="NOT updated"):
        bn(x)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    handle.remove()
    bn(x)  # unguarded again: torch.nn lets the overflow in
    assert not torch.isfinite(bn.running_var).all()


def _concat_twin(impl, momentum, xs):
    twin = BN1D[impl](4, momentum=momentum)
    twin(torch.cat(xs))
    return twin


@pytest.mark.parametrize("impl", ["torch", "ours"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_accumulation_equals_one_update_on_the_concatenated_batch(impl, momentum):
    model = nn.Sequential(BN1D[impl](4, momentum=momentum), nn.Linear(4, 2))
    xs = [torch.randn(n, 4) * 2 + 1 for n in (3, 5, 2)]  # unequal micro-batches
    with batchnorm.accumulate(model):
        for x in xs:
            model(x).square().sum().backward()
        assert model[0].num_batches_tracked.item() == 0
    twin = _concat_twin(impl, momentum, xs)
    assert model[0].num_batches_tracked.item() == 1 and model[0].track_running_stats
    torch.testing.assert_close(model[0].running_mean, twin.running_mean, **TOL)
    torch.testing.assert_close(model[0].running_var, twin.running_var, **TOL)


def test_without_accumulation_statistics_follow_micro_batches():
    """The difference accumulate makes (so the test above can fail)."""
    bn = nn.BatchNorm1d(4)
    xs = [torch.randn(n, 4) * 2 + 1 for n in (3, 5, 2)]
    for x in xs:
        bn(x)
    assert bn.num_batches_tracked.item() == 3
    assert not torch.allclose(bn.running_mean, _concat_twin("torch", 0.1, xs).running_mean)


@pytest.mark.parametrize("impl", ["torch", "ours"])
def test_accumulation_with_checkpointing_counts_each_micro_batch_once(impl):
    model = nn.Sequential(BN2D[impl](3), nn.Conv2d(3, 2, 1))
    batchnorm.guard(model)
    xs = [torch.randn(2, 3, 4, 4) for _ in range(3)]
    with batchnorm.accumulate(model):
        _train(model, xs, reentrant=False)
    twin = BN2D[impl](3)
    twin(torch.cat(xs))
    assert model[0].num_batches_tracked.item() == 1
    torch.testing.assert_close(model[0].running_var, twin.running_var, **TOL)


def test_accumulation_ignores_eval_forwards_and_discards_on_error():
    model = nn.Sequential(nn.BatchNorm1d(4), batchnorm.BatchNorm1d(4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"):
        with batchnorm.accumulate(model):
            model(torch.randn(6, 4))
            raise RuntimeError("boom")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(m.track_running_stats for m in model)
    model.eval()
    with batchnorm.accumulate(model):
        model(torch.randn(6, 4))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_accumulation_skips_a_step_with_non_finite_statistics():
    bn = nn.BatchNorm1d(2)
    x = torch.randn(4, 2)
    x[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="NOT updated"):
        with batchnorm.accumulate(bn):
            bn(torch.randn(4, 2))
            bn(x)
    assert bn.num_batches_tracked.item() == 0 and torch.isfinite(bn.running_mean).all()


@pytest.mark.parametrize("impl", ["torch", "ours"])
def test_layer_in_two_checkpointed_segments_counts_each_call_once(impl):
    bn, conv = BN2D[impl](3), nn.Conv2d(3, 3, 1)
    twin_bn, twin_conv = BN2D[impl](3), nn.Conv2d(3, 3, 1)
    twin_conv.load_state_dict(conv.state_dict())
    batchnorm.guard(bn)

    def segment(x, bn, conv):
        return torch.relu(conv(bn(x)))

    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    y = checkpoint(segment, checkpoint(segment, x, bn, conv, use_reentrant=False), bn, conv,
                   use_reentrant=False)
    y.square().sum().backward()
    segment(segment(x, twin_bn, twin_conv), twin_bn, twin_conv).square().sum().backward()
    assert bn.num_batches_tracked.item() == twin_bn.num_batches_tracked.item() == 2
    torch.testing.assert_close(bn.running_var, twin_bn.running_var, **TOL)
