"""GhostBatchNorm1d/2d/3d: per-sub-batch BN written out in float64 (outputs and each
gradient), the documented running-statistic rule (merged moments = the whole batch's,
one update per call), uneven batches, BN exactly when one sub-batch covers the batch,
eval as BN, gradcheck, and state untouched by bad input."""

import pytest
import torch

import batchnorm
from batchnorm.variants.ghost import sub_batches
from conftest import TOL

F64 = TOL[torch.float64]


def ghost_definition(x, weight, bias, eps, sizes):
    """Plain BN formula on each slice of ``sizes`` samples, float64, autograd."""
    dims = [0, *range(2, x.dim())]
    view = (1, -1) + (1,) * (x.dim() - 2)
    out = []
    for chunk in torch.split(x, sizes):
        mean = chunk.mean(dims, keepdim=True)
        var = ((chunk - mean) ** 2).mean(dims, keepdim=True)
        out.append((chunk - mean) / torch.sqrt(var + eps) * weight.view(view) + bias.view(view))
    return torch.cat(out)


CASES = [
    (batchnorm.GhostBatchNorm1d, (12, 3), 4, [4, 4, 4]),
    (batchnorm.GhostBatchNorm1d, (10, 3), 4, [4, 4, 2]),  # last sub-batch smaller
    (batchnorm.GhostBatchNorm1d, (9, 3), 4, [4, 5]),  # a remainder of one joins the previous
    (batchnorm.GhostBatchNorm1d, (9, 3, 2), 4, [4, 4, 1]),  # one sample, but 2 values
    (batchnorm.GhostBatchNorm2d, (7, 2, 3, 3), 3, [3, 3, 1]),
    (batchnorm.GhostBatchNorm3d, (5, 2, 2, 2, 3), 2, [2, 2, 1]),
]


@pytest.mark.parametrize("cls,shape,vbs,sizes", CASES, ids=[f"{c.__name__}-{s}-{v}" for c, s, v, _ in CASES])
def test_matches_per_sub_batch_definition_and_documented_running_rule(cls, shape, vbs, sizes):
    c = shape[1]
    bn = cls(c, momentum=0.25, virtual_batch_size=vbs, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    assert [len(s) for s in sub_batches(torch.empty(shape), vbs)] == sizes
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    dims = [0, *range(2, len(shape))]
    for _ in range(3):
        x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        w_ref = bn.weight.detach().clone().requires_grad_()
        b_ref = bn.bias.detach().clone().requires_grad_()
        y, y_ref = bn(x), ghost_definition(x_ref, w_ref, b_ref, bn.eps, sizes)
        torch.testing.assert_close(y, y_ref, **F64)
        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g)
        torch.testing.assert_close(x.grad, x_ref.grad, **F64)
        torch.testing.assert_close(bn.weight.grad, w_ref.grad, **F64)
        torch.testing.assert_close(bn.bias.grad, b_ref.grad, **F64)
        bn.weight.grad = bn.bias.grad = None
        # documented rule: one update with the whole batch's mean and unbiased variance
        rm = 0.75 * rm + 0.25 * x.detach().mean(dims)
        rv = 0.75 * rv + 0.25 * x.detach().var(dims, correction=1)
        torch.testing.assert_close(bn.running_mean, rm, **F64)
        torch.testing.assert_close(bn.running_var, rv, **F64)
    assert bn.num_batches_tracked.item() == 3


@pytest.mark.parametrize("vbs", [8, 100])
def test_equals_batchnorm_when_the_virtual_size_covers_the_batch(vbs):
    ghost, plain = batchnorm.GhostBatchNorm2d(3, virtual_batch_size=vbs), batchnorm.BatchNorm2d(3)
    theirs = torch.nn.BatchNorm2d(3)
    for _ in range(2):
        x = torch.randn(8, 3, 4, 4) * 2 + 1
        xs = [x.clone().requires_grad_() for _ in range(3)]
        ys = [m(xi) for m, xi in zip((ghost, plain, theirs), xs)]
        for y in ys:
            y.backward(torch.ones_like(y) * torch.arange(4.0))
        assert torch.equal(ys[0], ys[1]) and torch.equal(xs[0].grad, xs[1].grad)
        torch.testing.assert_close(ys[0], ys[2], **TOL[torch.float32])
        torch.testing.assert_close(xs[0].grad, xs[2].grad, **TOL[torch.float32])
    assert torch.equal(ghost.running_var, plain.running_var)
    torch.testing.assert_close(ghost.running_var, theirs.running_var, **TOL[torch.float32])


def test_sub_batches_normalise_differently_from_the_whole_batch():
    ghost, plain = batchnorm.GhostBatchNorm1d(2, virtual_batch_size=2), batchnorm.BatchNorm1d(2)
    x = torch.randn(8, 2) + torch.arange(8.0).unsqueeze(1)  # sub-batches with distinct means
    assert (ghost(x) - plain(x)).abs().max() > 0.5
    torch.testing.assert_close(ghost.running_mean, plain.running_mean)  # same rule
    torch.testing.assert_close(ghost.running_var, plain.running_var)


def test_eval_is_batchnorm_and_without_running_stats_sub_batches_are_used():
    ghost, plain = batchnorm.GhostBatchNorm1d(3, virtual_batch_size=4), batchnorm.BatchNorm1d(3)
    for _ in range(2):
        x = torch.randn(16, 3)
        ghost(x), plain(x)
    ghost.eval(), plain.eval()
    torch.testing.assert_close(ghost.running_var, plain.running_var, **TOL[torch.float32])
    plain.load_state_dict(ghost.state_dict())  # same statistics: eval is exactly BN's
    x = torch.randn(16, 3)
    assert torch.equal(ghost(x), plain(x))
    free = batchnorm.GhostBatchNorm1d(3, virtual_batch_size=4, track_running_stats=False).eval()
    ref = ghost_definition(x.double(), torch.ones(3).double(), torch.zeros(3).double(), 1e-5, [4] * 4)
    torch.testing.assert_close(free(x), ref.float(), **TOL[torch.float32])


def test_gradcheck_float64():
    bn = batchnorm.GhostBatchNorm1d(3, virtual_batch_size=3, dtype=torch.float64)
    x = torch.randn(7, 3, 2, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    call = lambda x, w, b: torch.func.functional_call(bn, {"weight": w, "bias": b}, (x,))  # noqa: E731
    assert torch.autograd.gradcheck(call, (x, w, b))


def test_bad_arguments_and_bad_input_leave_state_untouched():
    for bad in (0, -2, 2.5):
        with pytest.raises(ValueError, match="virtual_batch_size must be an integer >= 1"):
            batchnorm.GhostBatchNorm1d(3, virtual_batch_size=bad)
    single = batchnorm.GhostBatchNorm1d(3, virtual_batch_size=1)
    snap = {k: v.clone() for k, v in single.state_dict().items()}
    with pytest.raises(ValueError, match="sub-batches of one value per channel"):
        single(torch.randn(4, 3))
    assert all(torch.equal(v, snap[k]) for k, v in single.state_dict().items())
    single(torch.randn(4, 3, 2))  # one sample, two values: fine
    bn = batchnorm.GhostBatchNorm2d(3, virtual_batch_size=2)
    bn(torch.randn(4, 3, 2, 2))
    snap = {k: v.clone() for k, v in bn.state_dict().items()}
    for x, err in [
        (torch.randn(4, 3, 5), ValueError),
        (torch.randn(4, 5, 2, 2), ValueError),
        (torch.randint(0, 3, (4, 3, 2, 2)), TypeError),
        (torch.randn(1, 3, 1, 1), ValueError),
    ]:
        with pytest.raises(err):
            bn(x)
        assert all(torch.equal(v, snap[k]) for k, v in bn.state_dict().items())
