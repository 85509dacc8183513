"""recalibrate (PreciseBN): the running statistics become the exact population statistics
of each layer's training-mode input over the data, pooled across batches (and ranks)."""

import pytest
import torch
from torch import nn

import batchnorm

TOL = dict(rtol=1e-5, atol=1e-6)


def _batches(k=5, n=8, shape=(3, 4, 4), scale=2.0, shift=1.0, sizes=None):
    sizes = sizes or [n] * k
    return [torch.randn(s, *shape) * scale + shift for s in sizes]


def _channel_stats(xs):
    """Per-channel mean and unbiased variance of the batches concatenated (float64)."""
    x = torch.cat(xs).double().transpose(0, 1).flatten(1)
    return x.mean(1), x.var(1, unbiased=True)


@pytest.mark.parametrize("bn_cls", [nn.BatchNorm2d, batchnorm.BatchNorm2d])
def test_mean_equals_cumulative_average_and_var_is_exactly_pooled(bn_cls):
    xs = _batches()
    model = nn.Sequential(bn_cls(3), nn.ReLU())
    batchnorm.recalibrate(model, xs, progress=False)
    # twin 1: torch.nn with momentum=None over the same batches (cumulative average)
    cumulative = nn.BatchNorm2d(3, momentum=None)
    for x in xs:
        cumulative(x)
    torch.testing.assert_close(model[0].running_mean, cumulative.running_mean, **TOL)
    # twin 2: the statistics of all data at once
    mean, var = _channel_stats(xs)
    torch.testing.assert_close(model[0].running_mean, mean.float(), **TOL)
    torch.testing.assert_close(model[0].running_var, var.float(), **TOL)
    # ...which momentum=None does not give: it averages per-batch unbiased variances
    assert not torch.allclose(cumulative.running_var, var.float(), rtol=1e-3)
    assert model[0].num_batches_tracked.item() == len(xs) and not model.training


def test_equal_batches_match_the_issue_formula():
    xs = _batches(k=6, n=5, shape=(4,))
    model = nn.BatchNorm1d(4)
    batchnorm.recalibrate(model, xs, progress=False)
    mu = torch.stack([x.double().mean(0) for x in xs])
    var_b = torch.stack([x.double().var(0, unbiased=False) for x in xs])
    pop_var = (mu.pow(2) + var_b).mean(0) - mu.mean(0).pow(2)  # E[mu^2 + var] - E[mu]^2
    n = 6 * 5
    torch.testing.assert_close(model.running_mean, mu.mean(0).float(), **TOL)
    torch.testing.assert_close(model.running_var, (pop_var * n / (n - 1)).float(), **TOL)


def test_unequal_batches_weigh_every_value_equally():
    xs = _batches(sizes=[2, 9, 5], shape=(4, 3))
    model = nn.Sequential(batchnorm.BatchNorm1d(4))
    batchnorm.recalibrate(model, [(x, torch.zeros(len(x))) for x in xs], progress=False)
    mean, var = _channel_stats(xs)
    torch.testing.assert_close(model[0].running_mean, mean.float(), **TOL)
    torch.testing.assert_close(model[0].running_var, var.float(), **TOL)


def test_deeper_layers_see_their_training_mode_inputs():
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(),
                          nn.Conv2d(5, 4, 1), batchnorm.BatchNorm2d(4))
    xs = _batches(k=4)
    # twin: the input of the second BN in a plain training-mode forward of each batch
    # (training mode: the first BN normalises with batch statistics, its buffers unused)
    twin = nn.Sequential(*model[:4]).train()
    with torch.no_grad():
        seen = [twin(x) for x in xs]
    batchnorm.recalibrate(model, xs, progress=False)
    mean, var = _channel_stats(seen)
    torch.testing.assert_close(model[4].running_mean, mean.float(), **TOL)
    torch.testing.assert_close(model[4].running_var, var.float(), **TOL)


def test_num_samples_uses_whole_batches_until_enough():
    xs = _batches(k=5, n=8)
    model = nn.BatchNorm2d(3)
    batchnorm.recalibrate(model, iter(xs), num_samples=10, progress=False)
    mean, var = _channel_stats(xs[:2])
    assert model.num_batches_tracked.item() == 2
    torch.testing.assert_close(model.running_var, var.float(), **TOL)


def test_bad_data_leaves_state_untouched():
    model = nn.Sequential(nn.BatchNorm2d(3), batchnorm.BatchNorm2d(3)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def failing():
        yield torch.randn(4, 3, 2, 2)
        raise RuntimeError("loader broke")

    with pytest.raises(RuntimeError, match="loader broke"):
        batchnorm.recalibrate(model, failing(), progress=False)
    with pytest.raises(ValueError, match="no batches"):
        batchnorm.recalibrate(model, [], progress=False)
    with pytest.raises(TypeError, match="tensors or"):
        batchnorm.recalibrate(model, [{"x": 1}], progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.training and all(m.track_running_stats for m in model)
    with pytest.raises(ValueError, match="no batch-norm layer"):
        batchnorm.recalibrate(nn.Linear(2, 2), [torch.randn(3, 2)], progress=False)


def test_non_finite_statistics_never_reach_the_buffers():
    model = nn.BatchNorm1d(3)
    before = model.running_mean.clone()
    xs = [torch.randn(4, 3), torch.full((4, 3), float("nan"))]
    with pytest.warns(RuntimeWarning, match="unchanged"):
        batchnorm.recalibrate(model, xs, progress=False)
    assert torch.equal(model.running_mean, before)


def test_progress_line(capsys):
    batchnorm.recalibrate(nn.BatchNorm1d(2), [torch.randn(4, 2)] * 3, progress=True)
    assert "recalibrate: 3/3 batches, 12 samples" in capsys.readouterr().err


# -- across ranks ----------------------------------------------------------------------
def test_across_ranks_pools_every_layer_with_all_reduce_moments(monkeypatch):
    """The wiring: with torch.distributed initialised, every layer's pooled moments go
    through ``all_reduce_moments`` (tested for real, over gloo, in test_distributed.py).
    The stand-in merges in what "the other rank" holds (its data's moments), so the first
    layer's statistics must equal those of both ranks' data concatenated."""
    from batchnorm import distributed, stats

    here = [torch.randn(6, 4) for _ in range(2)]
    there = [torch.randn(s, 4) for s in (3, 7, 5)]
    calls = []

    def fake_all_reduce(m, group=None):
        other = stats.merge_all(stats.moments(x) for x in there)
        calls.append(group)
        return stats.merge(m, stats.Moments(*(t.double() for t in other)))

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed, "all_reduce_moments", fake_all_reduce)
    model = nn.Sequential(nn.BatchNorm1d(4), batchnorm.BatchNorm1d(4, affine=False))
    batchnorm.recalibrate(model, here, progress=False)
    mean, var = _channel_stats(here + there)
    assert len(calls) == 2  # once per layer, same order on every rank
    torch.testing.assert_close(model[0].running_mean, mean.float(), **TOL)
    torch.testing.assert_close(model[0].running_var, var.float(), **TOL)
