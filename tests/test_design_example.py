"""docs/design.md's worked example is true: a variant that writes only its statistics rule
(``batch_statistics``) gets the formula, the running statistics, eval, the non-finite
guard, the batch-of-one policy and checkpointing from ``_BatchNorm``."""

import pathlib
import re
import warnings

import pytest
import torch
from torch.utils.checkpoint import checkpoint

DESIGN = pathlib.Path(__file__).resolve().parents[1] / "docs" / "design.md"


@pytest.fixture(scope="module")
def Robust():
    text = DESIGN.read_text()
    section = text.split("## Worked example", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {}
    exec(compile(code, str(DESIGN), "exec"), namespace)
    return namespace["RobustBatchNorm2d"]


def _robust_stats(x):
    values = x.transpose(0, 1).flatten(1).double()
    median = values.median(dim=1).values
    mad = (values - median[:, None]).abs().median(dim=1).values
    return median, (1.4826 * mad) ** 2


def test_training_normalises_with_the_variants_statistics_and_updates_once(Robust):
    bn = Robust(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    x = torch.randn(6, 3, 5, 5) * 2 + 1
    x[0, 0, 0, 0] = 1e3  # one outlier: the median ignores it
    y = bn(x)
    median, var = _robust_stats(x)
    view = (1, -1, 1, 1)
    want = (x.double() - median.view(view)) / (var.view(view) + bn.eps).sqrt()
    want = want * bn.weight.double().view(view) + bn.bias.double().view(view)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    m = x.numel() // 3
    torch.testing.assert_close(bn.running_mean.double(), 0.1 * median, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), 0.9 + 0.1 * var * m / (m - 1),
                               rtol=1e-6, atol=1e-6)
    assert int(bn.num_batches_tracked) == 1


def test_it_trains_and_evaluates_with_the_running_statistics(Robust):
    bn = Robust(3)
    x = torch.randn(6, 3, 5, 5, requires_grad=True)
    bn(x).square().sum().backward()
    assert x.grad is not None and bn.weight.grad is not None and torch.isfinite(x.grad).all()
    bn.eval()
    plain = torch.nn.BatchNorm2d(3)
    plain.load_state_dict(bn.state_dict())
    plain.eval()
    xe = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(bn(xe), plain(xe))


def test_a_non_finite_batch_never_reaches_the_buffers(Robust):
    bn = Robust(3)
    bn(torch.randn(6, 3, 5, 5))
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(6, 3, 5, 5)
    x[:, 1] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"channel\(s\) \[1\]"):
        bn(x)
    for key, value in before.items():
        assert torch.equal(bn.state_dict()[key], value), key


def test_bad_input_and_a_batch_of_one_follow_batchnorms_rules(Robust):
    bn = Robust(3)
    with pytest.raises(ValueError, match="expects 3 channels"):
        bn(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(torch.randn(1, 3, 1, 1))
    lenient = Robust(3, single_value="use_running")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = lenient(torch.full((1, 3, 1, 1), 2.0))
    torch.testing.assert_close(y, torch.full((1, 3, 1, 1), 2.0 / (1 + lenient.eps) ** 0.5))
    assert int(lenient.num_batches_tracked) == 0


def test_checkpoint_recomputation_counts_the_batch_once(Robust):
    bn = Robust(3)
    x = torch.randn(6, 3, 5, 5, requires_grad=True)
    checkpoint(bn, x, use_reentrant=False).sum().backward()
    assert int(bn.num_batches_tracked) == 1
