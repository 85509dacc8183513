"""The functional API: statistics apart from normalising, torch.nn.functional semantics,
precision for large means, and the stateless form under torch.func transforms."""

import pytest
import torch

import batchnorm
import batchnorm.functional as BF
from batchnorm import reference
from conftest import TOL


def test_batch_stats_and_normalize_compose_to_batch_norm():
    x = torch.randn(6, 4, 5, dtype=torch.float64)
    w, b = torch.rand(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    mean, var = BF.batch_stats(x)
    y = BF.normalize(x, mean, var, w, b, eps=1e-5)
    expected = torch.nn.functional.batch_norm(x, None, None, w, b, training=True, eps=1e-5)
    torch.testing.assert_close(y, expected, **TOL[torch.float64])


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("momentum", [0.1, 0.0, 1.0])
def test_batch_norm_has_torch_functional_semantics(training, momentum):
    x = torch.randn(7, 3, 4, dtype=torch.float64)
    w, b = torch.rand(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    rm1, rv1 = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    rm2, rv2 = rm1.clone(), rv1.clone()
    y1 = batchnorm.batch_norm(x, rm1, rv1, w, b, training=training, momentum=momentum)
    y2 = torch.nn.functional.batch_norm(x, rm2, rv2, w, b, training=training, momentum=momentum)
    torch.testing.assert_close(y1, y2, **TOL[torch.float64])
    torch.testing.assert_close(rm1, rm2, **TOL[torch.float64])
    torch.testing.assert_close(rv1, rv2, **TOL[torch.float64])


def test_eval_without_running_statistics_is_a_clear_error():
    with pytest.raises(ValueError, match="running_mean"):
        batchnorm.batch_norm(torch.randn(4, 3), None, None, training=False)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_float32_channel_with_mean_1e4_matches_float64_reference(backend):
    # naive E[x^2] - E[x]^2 in float32 loses every digit of a unit variance at mean 1e4
    g = torch.Generator().manual_seed(1)
    x64 = torch.randn(64, 2, 32, 32, dtype=torch.float64, generator=g) + 1e4
    x32 = x64.float()
    ref_mean, ref_var = reference.batch_stats(x32.double().numpy())
    with batchnorm.kernels.use_backend(backend):
        mean, var = batchnorm.stats.moments(x32).mean, batchnorm.stats.moments(x32).var
        y = batchnorm.BatchNorm2d(2)(x32)
    torch.testing.assert_close(mean.double(), torch.from_numpy(ref_mean), rtol=1e-7, atol=0)
    torch.testing.assert_close(var.double(), torch.from_numpy(ref_var), rtol=1e-4, atol=0)
    naive = (x32 * x32).mean((0, 2, 3)) - x32.mean((0, 2, 3)) ** 2
    assert (naive.double() - torch.from_numpy(ref_var)).abs().max() > 0.1, "the case is hard"
    y_ref = (x32.double() - torch.from_numpy(ref_mean).view(1, 2, 1, 1)) / torch.sqrt(
        torch.from_numpy(ref_var).view(1, 2, 1, 1) + 1e-5
    )
    torch.testing.assert_close(y.double(), y_ref, rtol=0, atol=2e-3)


def test_stateless_form_mutates_nothing_and_matches_stateful():
    x = torch.randn(8, 3, 4)
    rm, rv = torch.zeros(3), torch.ones(3)
    y, new_rm, new_rv = batchnorm.batch_norm_stateless(x, rm, rv, training=True, momentum=0.3)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    rm2, rv2 = rm.clone(), rv.clone()
    y2 = batchnorm.batch_norm(x, rm2, rv2, training=True, momentum=0.3)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(new_rm, rm2)
    torch.testing.assert_close(new_rv, rv2)


def test_stateless_form_guards_non_finite_statistics():
    x = torch.randn(8, 3)
    x[0, 1] = float("nan")
    rm, rv = torch.zeros(3), torch.ones(3)
    _, new_rm, new_rv = batchnorm.batch_norm_stateless(x, rm, rv, training=True)
    assert torch.equal(new_rm, rm) and torch.equal(new_rv, rv)


def test_vmap_over_a_batch_of_models_equals_a_loop():
    models, n, c = 5, 16, 4
    x = torch.randn(models, n, c, 6)
    w, b = torch.rand(models, c) + 0.5, torch.randn(models, c)
    rm, rv = torch.randn(models, c), torch.rand(models, c) + 0.5

    def one(x, w, b, rm, rv):
        return batchnorm.batch_norm_stateless(x, rm, rv, w, b, training=True, momentum=0.2)

    y, new_rm, new_rv = torch.func.vmap(one)(x, w, b, rm, rv)
    for i in range(models):
        yi, rmi, rvi = one(x[i], w[i], b[i], rm[i], rv[i])
        torch.testing.assert_close(y[i], yi)
        torch.testing.assert_close(new_rm[i], rmi)
        torch.testing.assert_close(new_rv[i], rvi)


def test_vmap_of_grad_over_models_equals_torch_autograd():
    models = 3
    x = torch.randn(models, 10, 4, dtype=torch.float64)
    w = torch.rand(models, 4, dtype=torch.float64) + 0.5
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)

    def loss(w, x):
        y, _, _ = batchnorm.batch_norm_stateless(x, rm, rv, w, None, training=True)
        return (y.sin() * torch.arange(4, dtype=y.dtype)).sum()

    grads = torch.func.vmap(torch.func.grad(loss))(w, x)
    for i in range(models):
        wi = w[i].clone().requires_grad_()
        y = torch.nn.functional.batch_norm(x[i], None, None, wi, None, training=True)
        (g,) = torch.autograd.grad((y.sin() * torch.arange(4, dtype=y.dtype)).sum(), wi)
        torch.testing.assert_close(grads[i], g, **TOL[torch.float64])


def test_vmap_in_eval_mode():
    x = torch.randn(4, 8, 3)
    rm, rv = torch.randn(4, 3), torch.rand(4, 3) + 0.5
    y, _, _ = torch.func.vmap(lambda x, m, v: batchnorm.batch_norm_stateless(x, m, v))(x, rm, rv)
    for i in range(4):
        torch.testing.assert_close(y[i], torch.nn.functional.batch_norm(x[i], rm[i], rv[i]))
