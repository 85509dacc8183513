"""BatchRenorm1d/2d/3d: its definition written out in float64 (outputs, each gradient,
running statistics over several steps), BN exactly when r_max=1 and d_max=0, the warm-up
schedule, gradcheck, and state untouched by bad input."""

import pytest
import torch

import batchnorm
from conftest import TOL

CASES = [
    (batchnorm.BatchRenorm1d, torch.nn.BatchNorm1d, (16, 4)),
    (batchnorm.BatchRenorm1d, torch.nn.BatchNorm1d, (6, 4, 5)),
    (batchnorm.BatchRenorm2d, torch.nn.BatchNorm2d, (4, 3, 5, 6)),
    (batchnorm.BatchRenorm3d, torch.nn.BatchNorm3d, (2, 3, 3, 4, 2)),
]


def renorm_definition(x, weight, bias, running_mean, running_var, eps, r_max, d_max):
    """Ioffe 2017, Algorithm 1, in float64 with autograd (r and d stop-gradient)."""
    dims = [0, *range(2, x.dim())]
    view = (1, -1) + (1,) * (x.dim() - 2)
    mu_b = x.mean(dims)
    sigma_b = torch.sqrt(((x - mu_b.view(view)) ** 2).mean(dims) + eps)
    sigma = torch.sqrt(running_var + eps)
    r = (sigma_b / sigma).clamp(1 / r_max, r_max).detach()
    d = ((mu_b - running_mean) / sigma).clamp(-d_max, d_max).detach()
    x_hat = (x - mu_b.view(view)) / sigma_b.view(view) * r.view(view) + d.view(view)
    return x_hat * weight.view(view) + bias.view(view)


@pytest.mark.parametrize("cls,_torch_cls,shape", CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_matches_its_definition_in_float64_over_steps(cls, _torch_cls, shape):
    c = shape[1]
    bn = cls(c, momentum=0.3, r_max=1.5, d_max=0.5, warmup_steps=4, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.3, 3)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    for step in range(6):
        x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.7).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        w_ref = bn.weight.detach().clone().requires_grad_()
        b_ref = bn.bias.detach().clone().requires_grad_()
        t = min(1.0, step / 4)
        y_ref = renorm_definition(x_ref, w_ref, b_ref, rm, rv, bn.eps, 1 + 0.5 * t, 0.5 * t)
        y = bn(x)
        torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g)
        torch.testing.assert_close(x.grad, x_ref.grad, **TOL[torch.float64])
        torch.testing.assert_close(bn.weight.grad, w_ref.grad, **TOL[torch.float64])
        torch.testing.assert_close(bn.bias.grad, b_ref.grad, **TOL[torch.float64])
        bn.weight.grad = bn.bias.grad = None
        # running statistics: BN's rule (batch mean, unbiased variance)
        dims = [0, *range(2, x.dim())]
        rm = 0.7 * rm + 0.3 * x.detach().mean(dims)
        rv = 0.7 * rv + 0.3 * x.detach().var(dims, correction=1)
        torch.testing.assert_close(bn.running_mean, rm, **TOL[torch.float64])
        torch.testing.assert_close(bn.running_var, rv, **TOL[torch.float64])
        assert bn.num_batches_tracked.item() == step + 1


def test_the_correction_is_active_when_clipping_bites():
    bn = batchnorm.BatchRenorm1d(3, r_max=2.0, d_max=1.0, warmup_steps=0, dtype=torch.float64)
    x = torch.randn(32, 3, dtype=torch.float64) * 10 + 5  # far from running (0, 1)
    plain = batchnorm.BatchNorm1d(3, dtype=torch.float64)
    y, y_bn = bn(x), plain(x)
    assert (y - y_bn).abs().max() > 0.5
    ref = renorm_definition(x, torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64),
                            torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64),
                            1e-5, 2.0, 1.0)
    torch.testing.assert_close(y, ref, **TOL[torch.float64])


@pytest.mark.parametrize("cls,torch_cls,shape", CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_equals_batchnorm_exactly_when_r_max_1_d_max_0(cls, torch_cls, shape):
    renorm = cls(shape[1], r_max=1.0, d_max=0.0, warmup_steps=0)
    ours = {1: batchnorm.BatchNorm1d, 2: batchnorm.BatchNorm2d, 3: batchnorm.BatchNorm3d}[
        int(cls.__name__[-2])
    ](shape[1])
    theirs = torch_cls(shape[1])
    with torch.no_grad():
        for m in (renorm, ours, theirs):
            m.weight.copy_(torch.linspace(0.5, 1.5, shape[1]))
            m.bias.copy_(torch.linspace(-1, 1, shape[1]))
    for _ in range(3):
        x = torch.randn(shape) * 3 + 1
        xs = [x.clone().requires_grad_() for _ in range(3)]
        ys = [m(xi) for m, xi in zip((renorm, ours, theirs), xs)]
        g = torch.randn_like(ys[0])
        for y in ys:
            y.backward(g)
        assert torch.equal(ys[0], ys[1]) and torch.equal(xs[0].grad, xs[1].grad)
        assert torch.equal(renorm.weight.grad, ours.weight.grad)
        torch.testing.assert_close(ys[0], ys[2], **TOL[torch.float32])
        torch.testing.assert_close(xs[0].grad, xs[2].grad, **TOL[torch.float32])
    assert torch.equal(renorm.running_mean, ours.running_mean)
    assert torch.equal(renorm.running_var, ours.running_var)
    torch.testing.assert_close(renorm.running_var, theirs.running_var, **TOL[torch.float32])


def test_warm_up_relaxes_limits_linearly_and_starts_as_batchnorm():
    bn = batchnorm.BatchRenorm1d(2, r_max=3.0, d_max=5.0, warmup_steps=10)
    assert bn.limits() == (1.0, 0.0)
    bn.num_batches_tracked.fill_(5)
    assert bn.limits() == pytest.approx((2.0, 2.5))
    bn.num_batches_tracked.fill_(50)
    assert bn.limits() == (3.0, 5.0)
    fresh, plain = batchnorm.BatchRenorm1d(2, warmup_steps=10), batchnorm.BatchNorm1d(2)
    x = torch.randn(8, 2) * 4 + 3
    assert torch.equal(fresh(x), plain(x))  # step 0: limits (1, 0)


def test_eval_is_batchnorm_with_running_statistics():
    bn, plain = batchnorm.BatchRenorm2d(3, warmup_steps=0), batchnorm.BatchNorm2d(3)
    for _ in range(3):
        x = torch.randn(4, 3, 5, 5) + 2
        bn(x)
        plain(x)
    bn.eval(), plain.eval()
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(bn(x), plain(x), **TOL[torch.float32])


def test_gradcheck_float64_where_r_and_d_are_clipped():
    # r and d carry no gradient by definition; finite differences agree with that only
    # where both are clipped (locally constant): running statistics far from the batch's.
    bn = batchnorm.BatchRenorm1d(3, momentum=0.0, r_max=1.3, d_max=0.4, warmup_steps=0,
                                 dtype=torch.float64)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([5.0, -5.0, 5.0]))
        bn.running_var.copy_(torch.tensor([0.01, 100.0, 0.01]))
    x = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True) + 0.5
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    call = lambda x, w, b: torch.func.functional_call(bn, {"weight": w, "bias": b}, (x,))  # noqa: E731
    assert torch.autograd.gradcheck(call, (x, w, b))


def test_bad_arguments_and_bad_input_leave_state_untouched():
    with pytest.raises(ValueError, match="r_max must be >= 1"):
        batchnorm.BatchRenorm1d(3, r_max=0.5)
    with pytest.raises(ValueError, match="d_max must be >= 0"):
        batchnorm.BatchRenorm1d(3, d_max=-1)
    with pytest.raises(ValueError, match="track_running_stats must be True"):
        batchnorm.BatchRenorm1d(3, track_running_stats=False)
    bn = batchnorm.BatchRenorm2d(3)
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


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_checkpoint_recomputation_reuses_the_original_factors(backend):
    """Under activation checkpointing the recomputed forward runs after the buffers were
    updated; it must reuse the r and d of the original forward, also when the layer saw
    two inputs before one backward (shared weights), so gradients equal the unchecked
    layer's."""
    from torch.utils.checkpoint import checkpoint

    from batchnorm import kernels

    if backend == "cpu":
        pytest.importorskip("numba")
    plain = batchnorm.BatchRenorm2d(3, warmup_steps=0, r_max=1.5, d_max=0.5)
    ckpt = batchnorm.BatchRenorm2d(3, warmup_steps=0, r_max=1.5, d_max=0.5)
    with kernels.use_backend(backend):
        for step in range(3):
            a, b = torch.randn(4, 3, 6, 6) * (step + 2) + step, torch.randn(4, 3, 6, 6) - 1
            xs = [[t.clone().requires_grad_() for t in (a, b)] for _ in range(2)]
            (plain(xs[0][0]) * plain(xs[0][1])).sum().backward()
            y = checkpoint(ckpt, xs[1][0], use_reentrant=False)
            z = checkpoint(ckpt, xs[1][1], use_reentrant=False)
            (y * z).sum().backward()
            for ours, ref in zip(xs[1], xs[0]):
                torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-6, atol=1e-6)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(ckpt.state_dict()[key], value, rtol=0, atol=0)
