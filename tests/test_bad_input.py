"""Bad input: a clear error naming what was expected and what was given, and the
module's parameters and buffers exactly as they were (torch.nn increments
num_batches_tracked before validating; we must not)."""

import warnings

import pytest
import torch

import batchnorm


def _snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _unchanged(m, snap):
    return all(torch.equal(v, snap[k]) for k, v in m.state_dict().items())


BAD = [
    (batchnorm.BatchNorm2d(3), torch.randn(4, 3, 5), ValueError, "expects \\(N, C, H, W\\) input, got a 3-D"),
    (batchnorm.BatchNorm1d(3), torch.randn(4, 3, 5, 5), ValueError, "got a 4-D"),
    (batchnorm.BatchNorm3d(3), torch.randn(4, 3), ValueError, "got a 2-D"),
    (batchnorm.BatchNorm2d(3), torch.randn(4, 5, 2, 2), ValueError, "expects 3 channels.*with 5"),
    (batchnorm.BatchNorm1d(3), torch.randint(0, 5, (4, 3)), TypeError, "floating-point input.*torch.int64"),
    (batchnorm.BatchNorm2d(3), torch.randn(1, 3, 1, 1), ValueError, "more than 1 value per channel"),
]


@pytest.mark.parametrize("module,x,error,message", BAD, ids=[m for *_, m in BAD])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_bad_input_raises_clearly_and_leaves_state_untouched(module, x, error, message, mode):
    module.train(mode == "train")
    module.momentum = None  # the cumulative average reads num_batches_tracked
    snap = _snapshot(module)
    if mode == "eval" and "more than 1" in message:
        module(x)  # in eval, fixed statistics normalise any batch
    else:
        with pytest.raises(error, match=message):
            module(x)
    assert _unchanged(module, snap)


def test_torch_nn_changes_state_on_a_batch_of_one_and_we_do_not():
    theirs, ours = torch.nn.BatchNorm1d(3), batchnorm.BatchNorm1d(3)
    x = torch.randn(1, 3)
    for m in (theirs, ours):
        with pytest.raises(ValueError):
            m(x)
    assert theirs.num_batches_tracked.item() == 1  # the behaviour we fix
    assert ours.num_batches_tracked.item() == 0


def test_single_value_use_running_normalises_with_running_statistics():
    bn = batchnorm.BatchNorm1d(3, single_value="use_running")
    bn(torch.randn(16, 3) * 2 + 1)
    snap = _snapshot(bn)
    x = torch.randn(1, 3)
    y = bn(x)
    assert _unchanged(bn, snap)
    expected = (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(y, expected * bn.weight + bn.bias)


def test_single_value_skip_update_uses_batch_statistics_and_updates_nothing():
    bn = batchnorm.BatchNorm1d(3, single_value="skip_update")
    with torch.no_grad():
        bn.bias.copy_(torch.tensor([1.0, 2.0, 3.0]))
    snap = _snapshot(bn)
    y = bn(torch.randn(1, 3))
    assert _unchanged(bn, snap)
    # x_hat = 0 exactly in theory; kernels that compute x * scale + shift with
    # scale = 1/sqrt(eps) ~ 316 round at ~1e-5
    torch.testing.assert_close(y, bn.bias.detach().view(1, 3), rtol=0, atol=1e-4)


def test_unknown_single_value_policy_is_rejected():
    with pytest.raises(ValueError, match="single_value must be one of"):
        batchnorm.BatchNorm1d(3, single_value="ignore")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_batch_does_not_reach_running_statistics(bad):
    bn = batchnorm.BatchNorm2d(4)
    bn(torch.randn(8, 4, 3, 3))
    snap = _snapshot(bn)
    x = torch.randn(8, 4, 3, 3)
    x[2, 1, 0, 0] = bad
    with pytest.warns(RuntimeWarning, match=r"channel\(s\) \[1\]"):
        y = bn(x)
    assert _unchanged(bn, snap)
    assert torch.isnan(y[:, 1]).all(), "the output follows IEEE arithmetic"
    assert torch.isfinite(y[:, [0, 2, 3]]).all()


def test_finite_batch_after_a_bad_one_updates_again():
    bn = batchnorm.BatchNorm1d(2)
    x = torch.randn(8, 2)
    x[0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bn(x)
    bn(torch.randn(8, 2))
    assert bn.num_batches_tracked.item() == 1
    assert torch.isfinite(bn.running_mean).all() and not torch.equal(bn.running_mean, torch.zeros(2))


def test_functional_integer_input_is_rejected():
    with pytest.raises(TypeError, match="floating-point"):
        batchnorm.batch_norm(torch.ones(4, 3, dtype=torch.int32), None, None, training=True)
