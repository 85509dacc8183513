"""The explicit backward: gradcheck and gradgradcheck in float64, the custom Function
really is what runs, and torch.compile works with it."""

import pytest
import torch

import batchnorm
from batchnorm import kernels
from batchnorm.autograd import BatchNormEval, BatchNormTrain
from batchnorm.core.plan import train as train_forward


def _inputs(shape, affine=True):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    c = shape[1]
    w = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_() if affine else None
    b = torch.randn(c, dtype=torch.float64, requires_grad=True) if affine else None
    return x, w, b


@pytest.mark.parametrize("shape", [(5, 3), (3, 2, 4), (2, 3, 3, 2)])
@pytest.mark.parametrize("affine", [True, False])
def test_training_gradcheck_and_gradgradcheck(shape, affine):
    x, w, b = _inputs(shape, affine)
    f = lambda x, w, b: BatchNormTrain.apply(x, w, b, 1e-5)[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("shape", [(5, 3), (2, 3, 3, 2)])
def test_eval_gradcheck_and_gradgradcheck(shape):
    x, w, b = _inputs(shape)
    mean = torch.randn(shape[1], dtype=torch.float64)
    invstd = torch.rand(shape[1], dtype=torch.float64) + 0.5
    f = lambda x, w, b: BatchNormEval.apply(x, mean, invstd, w, b)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize(
    "backend, shape, node",
    [
        ("torch", (4, 3, 2, 2), "BatchNormTrain"),
        ("cpu", (4, 3, 2, 2), "BatchNormTrain"),
        ("auto", (8, 64, 32, 32), "BatchNormTrain"),  # large NCHW: the fused CPU kernels
        ("native", (4, 3, 2, 2), "NativeBatchNormBackward"),  # ATen's kernels: its autograd
        ("auto", (4, 3, 2, 2), "NativeBatchNormBackward"),
    ],
)
def test_module_backward_node_follows_the_backend(backend, shape, node):
    """Our explicit backward runs wherever our kernels do; where the dispatcher picks
    ATen's kernels, ATen's autograd records them (same kernels, no Python Function)."""
    bn = batchnorm.BatchNorm2d(shape[1])
    with kernels.use_backend(backend):
        y = bn(torch.randn(shape, requires_grad=True))
    assert node in type(y.grad_fn).__name__


def test_native_path_takes_vectors_of_another_dtype_and_vmap_stays_per_model():
    """ATen wants weight in x's dtype: a float32 weight on float64 input is cast (its
    gradient flows back through the cast, as in the cpu backend); under torch.func.vmap
    (through BatchNormTrain's vmap rule) each model keeps its own statistics."""
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    w = torch.rand(3) + 0.5
    grads = []
    for backend in ("native", "cpu"):
        with kernels.use_backend(backend):
            xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
            y, _, _ = train_forward(xi, wi, None, 1e-5)
            y.pow(3).sum().backward()
            assert y.dtype == torch.float64 and wi.grad.dtype == torch.float32
            grads.append((y, xi.grad, wi.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    xs = torch.randn(2, 4, 3, 5)
    ys = torch.func.vmap(lambda t: train_forward(t, None, None, 1e-5)[0])(xs)
    for i in range(2):
        torch.testing.assert_close(ys[i], torch.nn.functional.batch_norm(xs[i], None, None, training=True))


def test_gradient_penalty_matches_torch():
    # d/dx of ||d loss/dx||^2 needs the second derivative through the batch statistics
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    out = []
    for bn in (batchnorm.BatchNorm1d(3, dtype=torch.float64), torch.nn.BatchNorm1d(3, dtype=torch.float64)):
        xi = x.clone().requires_grad_()
        (g,) = torch.autograd.grad((bn(xi) ** 3).sum(), xi, create_graph=True)
        (gg,) = torch.autograd.grad(g.pow(2).sum(), xi)
        out.append(gg)
    torch.testing.assert_close(out[0], out[1], rtol=1e-9, atol=1e-9)


def test_bias_false_matches_torch():
    ours, theirs = batchnorm.BatchNorm2d(3, bias=False), torch.nn.BatchNorm2d(3, bias=False)
    x = torch.randn(4, 3, 5, 5)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours(x1).pow(2).sum().backward()
    theirs(x2).pow(2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), batchnorm.BatchNorm2d(4), torch.nn.ReLU())
    eager = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), batchnorm.BatchNorm2d(4), torch.nn.ReLU())
    eager.load_state_dict(model.state_dict())
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3, 8, 8)
    for mode in ("train", "eval"):
        model.train(mode == "train")
        eager.train(mode == "train")
        y1, y2 = compiled(x), eager(x)
        torch.testing.assert_close(y1, y2)
        y1.sum().backward()
        y2.sum().backward()
        torch.testing.assert_close(model[0].weight.grad, eager[0].weight.grad)
    torch.testing.assert_close(model[1].running_mean, eager[1].running_mean)
    assert model[1].num_batches_tracked.item() == 1


def test_torch_compile_default_inductor_backend_trains():
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), batchnorm.BatchNorm1d(6))
    reference = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6))
    reference.load_state_dict(model.state_dict())
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(8, 5)
    y1, y2 = compiled(x), reference(x)
    torch.testing.assert_close(y1, y2)
    y1.square().sum().backward()
    y2.square().sum().backward()
    torch.testing.assert_close(model[0].weight.grad, reference[0].weight.grad)
    torch.testing.assert_close(model[1].running_var, reference[1].running_var)


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "silu"])
def test_torch_compile_bn_act_matches_eager(act):
    """BatchNormAct traces into one graph (ATen's BN and the activation's op, see
    batchnorm.core.traced) and gives eager's numbers: eager runs batchnorm's kernels, compiled
    runs ATen's (torch.nn's numbers), so sums over the batch (the conv weight's gradient)
    differ in their last bits."""
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), batchnorm.BatchNormAct2d(4, act=act))
    eager = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), batchnorm.BatchNormAct2d(4, act=act))
    eager.load_state_dict(model.state_dict())
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3, 8, 8)
    y1, y2 = compiled(x), eager(x)
    torch.testing.assert_close(y1, y2)
    y1.square().sum().backward()
    y2.square().sum().backward()
    torch.testing.assert_close(model[0].weight.grad, eager[0].weight.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(model[1].weight.grad, eager[1].weight.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(model[1].running_var, eager[1].running_var)
