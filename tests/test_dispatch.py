"""Backend choice: auto picks the fastest measured backend per call, a forced backend is
used wherever it can run, and every backend agrees with the pure-torch reference."""

import pytest
import torch

import batchnorm
from batchnorm import kernels
from batchnorm.kernels import native_backend, torch_backend


def _name(op, x):
    return kernels.pick(op, x).name


def test_auto_choices_follow_the_measured_crossovers():
    big = torch.randn(8, 64, 32, 32)
    assert _name("forward_train", big) == "cpu"
    assert _name("normalize", big) == "cpu"
    small = torch.randn(4, 8, 5, 5)
    assert _name("forward_train", small) == "native"
    assert _name("normalize", small) == "torch"
    cl = big.contiguous(memory_format=torch.channels_last)
    assert _name("forward_train", cl) == "native"
    assert _name("forward_train", torch.randn(256, 1024)) == "native"
    assert _name("forward_train", big.bfloat16()) == "torch"
    assert _name("forward_train_act", big) == "cpu"
    for op in ("forward_train_act", "forward_eval_act", "backward_act", "backward_act_input"):
        # BN + activation below the crossover, and channels_last: ATen's kernels
        assert _name(op, small) == "native" and _name(op, cl) == "native"
        assert _name(op, small.bfloat16()) == "torch"


def test_forced_backend_runs_wherever_it_can_and_falls_back_otherwise():
    small = torch.randn(4, 8, 5, 5)
    with kernels.use_backend("cpu"):
        assert _name("forward_train", small) == "cpu"
        assert _name("forward_train", small.half()) == "torch"
    with kernels.use_backend("torch"):
        assert _name("forward_train", torch.randn(8, 64, 16, 16)) == "torch"


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        kernels.set_backend("gpu")


@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 7), (3, 4, 5, 6)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_native_backend_matches_the_pure_torch_backend(shape, channels_last):
    x = torch.randn(shape, dtype=torch.float64) * 2 + 3
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(shape[1], dtype=torch.float64) + 0.5, torch.randn(shape[1], dtype=torch.float64)
    dy = torch.randn_like(x)
    for got, want in zip(native_backend.forward_train(x, w, b, 1e-5), torch_backend.forward_train(x, w, b, 1e-5)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    _, mean, invstd = torch_backend.forward_train(x, w, b, 1e-5)
    for got, want in zip(native_backend.backward(dy, x, mean, invstd, w), torch_backend.backward(dy, x, mean, invstd, w)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_module_results_do_not_depend_on_the_backend():
    x = torch.randn(8, 64, 16, 16, dtype=torch.float64)
    outs = []
    for name in ("torch", "cpu", "native", "auto"):
        with kernels.use_backend(name):
            bn = batchnorm.BatchNorm2d(64, dtype=torch.float64)
            xi = x.clone().requires_grad_()
            y = bn(xi)
            y.pow(2).sum().backward()
            outs.append((y, xi.grad, bn.weight.grad, bn.running_var))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


ACTS = [("identity", 0.0), ("relu", 0.0), ("leaky_relu", 0.1), ("leaky_relu", 2.5),
        ("elu", 0.7), ("silu", 0.0), ("gelu", 0.0)]


@pytest.mark.parametrize("act,alpha", ACTS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_native_act_operations_match_the_pure_torch_backend(act, alpha, training, channels_last):
    """The BN + activation operations on ATen's kernels against the pure-torch ones, in
    float64 to 1e-10: forward (batch or given statistics) and both backwards (from the
    output z for invertible activations, from the input x for every one)."""
    from batchnorm.kernels import activations

    x = torch.randn(4, 5, 3, 6, dtype=torch.float64) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.tensor([0.7, -1.3, 1.9, 0.4, -0.2], dtype=torch.float64)
    b = torch.tensor([0.2, -0.4, 0.1, 0.0, 0.3], dtype=torch.float64)
    dz = torch.randn_like(x)
    if training:
        got = native_backend.forward_train_act(x, w, b, 1e-5, act, alpha)
        want = torch_backend.forward_train_act(x, w, b, 1e-5, act, alpha)
        _, mean, invstd = want
    else:
        mean = torch.randn(5, dtype=torch.float64)
        invstd = torch.rand(5, dtype=torch.float64) + 0.5
        got = (native_backend.forward_eval_act(x, mean, invstd, w, b, act, alpha),)
        want = (torch_backend.forward_eval_act(x, mean, invstd, w, b, act, alpha),)
    assert got[0].is_contiguous(memory_format=torch.channels_last) == channels_last
    for g, t in zip(got, want):
        torch.testing.assert_close(g, t, rtol=1e-10, atol=1e-10)
    args = (mean, invstd, w, b, act, alpha, training)
    pairs = [(native_backend.backward_act_input(dz, x, *args),
              torch_backend.backward_act_input(dz, x, *args))]
    if activations.is_invertible(act, alpha):
        z = want[0]
        pairs.append((native_backend.backward_act(dz, z, *args),
                      torch_backend.backward_act(dz, z, *args)))
    for got, want in pairs:
        for g, t in zip(got, want):
            torch.testing.assert_close(g, t, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", ["torch", "cpu", "native"])
def test_saturated_elu_keeps_the_memory_saving_backward_finite(backend):
    # elu's float32 output is exactly -alpha below y ~ -17; its inverse would be -inf
    from batchnorm.kernels import activations

    x = torch.randn(64, 2, 8)
    x[0, 0, 0] = -1e4  # x_hat ~ -60 in channel 0
    w = torch.ones(2)
    with kernels.use_backend(backend):
        z, mean, invstd = kernels.call("forward_train_act", x, w, None, 1e-5, "elu", 1.0)
        assert z[0, 0, 0] == -1.0
        dx, dw, db = kernels.call("backward_act", torch.randn_like(z), z, mean, invstd, w, None, "elu", 1.0, True)
    assert torch.isfinite(dx).all() and torch.isfinite(dw).all()
    assert activations.inverse(torch.tensor([-1.0]), "elu", 1.0).item() > -16


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eval_in_auto_mode_gives_torch_nn_numbers_exactly(dtype):
    """Eval without autograd runs ATen's eval kernel on the running variance: the very
    numbers of torch.nn, not merely close ones."""
    import batchnorm

    ours = batchnorm.BatchNorm2d(6, dtype=dtype)
    ref = torch.nn.BatchNorm2d(6, dtype=dtype)
    with torch.no_grad():
        for m in (ours, ref):
            # values whose rounding differs between formulas: the pure-torch path
            # (invstd then normalize) is not bit-equal to torch.nn on these
            m.running_mean.copy_(torch.linspace(-3.1, 2.7, 6))
            m.running_var.copy_(torch.linspace(0.3, 7.9, 6))
            m.weight.copy_(torch.linspace(0.37, 2.13, 6))
            m.bias.copy_(torch.linspace(-1.3, 1.1, 6))
    ours.eval(), ref.eval()
    x = torch.randn(4, 6, 5, 5, dtype=dtype)
    with torch.no_grad(), kernels.use_backend("auto"):
        assert torch.equal(ours(x), ref(x))
        xc = x.contiguous(memory_format=torch.channels_last)
        assert torch.equal(ours(xc), ref(xc))
    with torch.no_grad(), kernels.use_backend("torch"):  # the twin that is merely close
        assert not torch.equal(ours(x), ref(x))
        torch.testing.assert_close(ours(x), ref(x))


def test_eval_with_buffers_in_another_dtype_computes_in_the_input_dtype():
    import batchnorm

    m = batchnorm.BatchNorm1d(3).eval()  # float32 buffers
    with torch.no_grad():
        m.running_var.fill_(4.0)
    x = torch.randn(5, 3, dtype=torch.float64)
    with torch.no_grad():
        y = m(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, x / (4.0 + 1e-5) ** 0.5, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("saving", [True, False])
def test_leaky_relu_slope_at_zero_is_torchs_on_every_backend(saving):
    """A constant channel with bias 0 puts its whole output at exactly 0, where leaky
    ReLU's slope is a convention: every backend takes torch's (alpha, ATen's
    leaky_relu_backward), so the layer's gradients equal torch.nn's BN + leaky ReLU and
    do not change with the route its size picks."""
    pytest.importorskip("numba")
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    x[:, 1] = 2.0  # channel 1 constant: x_hat = 0, y = bias = 0, z = 0
    dz = torch.linspace(-1, 1, x.numel(), dtype=torch.float64).view_as(x)
    bn = torch.nn.BatchNorm2d(3, dtype=torch.float64)
    xt = x.clone().requires_grad_()
    torch.nn.functional.leaky_relu(bn(xt), 0.1).backward(dz)
    want = (xt.grad, bn.weight.grad, bn.bias.grad)
    for name in ("torch", "cpu", "native"):
        layer = batchnorm.BatchNormAct2d(3, act="leaky_relu", alpha=0.1, memory_saving=saving,
                                         dtype=torch.float64)
        xi = x.clone().requires_grad_()
        with kernels.use_backend(name):
            z = layer(xi)
            assert torch.equal(z[:, 1], torch.zeros_like(z[:, 1]))
            z.backward(dz)
        for got, expected in zip((xi.grad, layer.weight.grad, layer.bias.grad), want):
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
        # slope alpha on channel 1: its bias gradient is 0.1 times the sum of dz there
        torch.testing.assert_close(layer.bias.grad[1], 0.1 * dz[:, 1].sum(), rtol=1e-10,
                                   atol=1e-10)
