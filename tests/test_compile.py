"""torch.compile sees through every layer kind (batchnorm.core.traced): one graph of ATen ops
(fullgraph=True), eager's numbers, Inductor's fusion of BN with its neighbours as for
torch.nn, and batchnorm's guarantees kept (non-finite batches never reach the buffers; bad
input raises with the state untouched). And torch.library.opcheck on every custom op."""

import math
import re

import pytest
import torch

import batchnorm
from batchnorm import ops

C = 4


# kind -> (layer factory, whether forward takes a mask)
KINDS = {
    "plain": (lambda: batchnorm.BatchNorm2d(C), False),
    "plain_cumulative": (lambda: batchnorm.BatchNorm2d(C, momentum=None), False),
    "renorm": (lambda: batchnorm.BatchRenorm2d(C, warmup_steps=1), False),
    "ghost": (lambda: batchnorm.GhostBatchNorm2d(C, virtual_batch_size=3), False),
    "masked": (lambda: batchnorm.MaskedBatchNorm2d(C), True),
    "act_relu": (lambda: batchnorm.BatchNormAct2d(C, act="relu"), False),
    "act_leaky": (lambda: batchnorm.BatchNormAct2d(C, act="leaky_relu"), False),
    "frozen": (lambda: batchnorm.FrozenBatchNorm2d(C, act="relu"), False),
    "sync": (lambda: batchnorm.SyncBatchNorm(C), False),
}


class Net(torch.nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, C, 3, padding=1)
        self.norm = KINDS[kind][0]()
        self.masked = KINDS[kind][1]

    def forward(self, x, mask=None):
        z = self.conv(x)
        return self.norm(z, mask) if self.masked else self.norm(z)


def _pair(kind):
    torch.manual_seed(0)
    a, b = Net(kind), Net(kind)
    b.load_state_dict(a.state_dict())
    return a, b


def _args(kind, n=6, scale=1.0):
    x = torch.randn(n, 3, 5, 5) * scale
    return (x, torch.tensor([1.0, 0.0, 1.0, 0.5, 1.0, 2.0])[:n]) if KINDS[kind][1] else (x,)


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_fullgraph_holds_only_aten_ops_and_matches_eager(kind):
    """Two training steps then eval, compiled (aot_eager: AOTAutograd's forward and
    backward graphs, run by ATen) against eager: outputs, gradients, running buffers."""
    torch._dynamo.reset()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm.code)
        return torch._dynamo.backends.common.aot_autograd(fw_compiler=lambda g, _: g)(
            gm, example_inputs
        )

    model, eager = _pair(kind)
    compiled = torch.compile(model, fullgraph=True, backend=record)
    for step, mode in enumerate(("train", "train", "eval")):
        model.train(mode == "train")
        eager.train(mode == "train")
        args = _args(kind, scale=step + 1.0)
        y1, y2 = compiled(*args), eager(*args)
        torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
        y1.square().sum().backward()
        y2.square().sum().backward()
        torch.testing.assert_close(model.conv.weight.grad, eager.conv.weight.grad,
                                   rtol=1e-4, atol=1e-4)
        for name, buf in eager.named_buffers():
            torch.testing.assert_close(model.get_buffer(name), buf, msg=f"{name} after {mode}")
    assert graphs and not any("batchnorm" in code for code in graphs)
    assert any("batch_norm" in code for code in graphs)


@pytest.mark.parametrize("kind", ["plain", "renorm", "masked", "act_leaky", "ghost"])
def test_compiled_non_finite_batch_leaves_the_buffers(kind):
    torch._dynamo.reset()
    model = Net(kind).train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(*_args(kind))
    before = {name: buf.clone() for name, buf in model.named_buffers()}
    assert before["norm.num_batches_tracked"].item() == 1
    for bad in (float("nan"), float("inf")):
        args = _args(kind)
        args[0][1, 0, 2, 2] = bad
        compiled(*args)
        for name, buf in model.named_buffers():
            assert torch.equal(buf, before[name]), f"{bad} changed {name}"


def test_compiled_bad_input_raises_with_the_state_untouched():
    """Shape and dtype errors are raised while tracing: batchnorm's own exception (Dynamo
    runs the call eagerly), or with fullgraph=True Dynamo's Unsupported quoting it. Value
    errors of a mask are raised by the compiled program itself."""
    torch._dynamo.reset()
    model = Net("masked").train()
    compiled = torch.compile(model.norm, backend="aot_eager")
    before = {name: buf.clone() for name, buf in model.norm.named_buffers()}
    with pytest.raises(ValueError, match="expects 4 channels"):
        compiled(torch.randn(6, 5, 5, 5))
    with pytest.raises(TypeError, match="floating-point"):
        compiled(torch.ones(6, C, 5, 5, dtype=torch.int64))
    strict = torch.compile(model.norm, fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="expects 4 channels"):
        strict(torch.randn(6, 5, 5, 5))
    compiled = strict
    x = torch.randn(6, C, 5, 5)
    with pytest.raises(RuntimeError, match="finite and >= 0"):
        compiled(x, torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0, 1.0]))
    with pytest.raises(RuntimeError, match="more than 1"):
        compiled(x, torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 0.0]) * torch.zeros(6))
    for name, buf in model.norm.named_buffers():
        assert torch.equal(buf, before[name]), name


def _inductor_code(model, x):
    """Inductor's generated code for one training step (forward and backward)."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)

    def step():
        compiled(x).square().sum().backward()

    _, code = run_and_get_code(step)
    return "\n".join(code)


def test_inductor_fuses_as_for_torch_nn():
    """Inductor compiles conv -> BN -> relu -> + residual with batchnorm's layer as with
    torch.nn's: no opaque call (the same external calls: the convolutions), BN fused with
    the relu, at most one more kernel per BN layer (the guard's reduction over the
    channels may get its own), the same buffers as compiled torch.nn, and the guard."""

    def net(norm):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(C, C, 3, padding=1), norm(C), torch.nn.ReLU())

    class Residual(torch.nn.Module):
        def __init__(self, norm):
            super().__init__()
            self.body = net(norm)

        def forward(self, x):
            return self.body(x) + x

    x = torch.randn(4, C, 6, 6)
    ours, theirs = Residual(batchnorm.BatchNorm2d), Residual(torch.nn.BatchNorm2d)
    code_ours = _inductor_code(ours, x)
    code_theirs = _inductor_code(theirs, x)
    assert "batchnorm" not in code_ours
    assert code_ours.count("extern_kernels.") == code_theirs.count("extern_kernels.")
    fused = re.findall(r"(?:cpp|triton)_\w*fused\w*", code_ours)
    assert any("native_batch_norm" in k and "relu" in k for k in fused), fused
    kernels = lambda code: len(set(re.findall(r"(?:cpp|triton)_\w*fused\w*", code)))  # noqa: E731
    assert kernels(code_ours) <= kernels(code_theirs) + 1, (kernels(code_ours), kernels(code_theirs))
    for name, buf in theirs.named_buffers():
        torch.testing.assert_close(ours.get_buffer(name), buf, msg=name)
    # the guard in Inductor's code: a NaN batch leaves the buffers
    compiled = torch.compile(ours, fullgraph=True)
    before = {name: buf.clone() for name, buf in ours.named_buffers()}
    bad = x.clone()
    bad[0, 0, 0, 0] = math.nan
    compiled(bad)
    for name, buf in ours.named_buffers():
        assert torch.equal(buf, before[name]), name


# -- the custom ops -------------------------------------------------------------------------
def _op_samples():
    """One call of every custom op in batchnorm.ops, on tensors large enough for the fused
    CPU kernels where they apply."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5)
    dy = torch.randn_like(x)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    mean, invstd = x.mean((0, 2, 3)), torch.rand(3) + 0.5
    sums = (torch.randn(3), torch.randn(3))
    z = torch.nn.functional.leaky_relu(x, 0.1)
    return {
        ops._batch_stats_op: [(x,)],
        ops._forward_train_op: [(x, w, b, 1e-5), (x, None, None, 1e-3)],
        ops._normalize_op: [(x, mean, invstd, w, b), (x, mean, invstd, None, None)],
        ops._backward_op: [(dy, x, mean, invstd, w), (dy, x, mean, invstd, None)],
        ops._backward_reduce_op: [(dy, x, mean, invstd)],
        ops._backward_elemt_op: [(dy, x, mean, invstd, w, *sums, 100.0)],
        ops._forward_train_act_op: [(x, w, b, 1e-5, "relu", 0.0),
                                    (x, w, b, 1e-5, "silu", 0.0)],
        ops._forward_eval_act_op: [(x, mean, invstd, w, b, "leaky_relu", 0.1)],
        ops._backward_act_op: [(dy, z, mean, invstd, w, b, "leaky_relu", 0.1, True),
                               (dy, z, mean, invstd, w, b, "leaky_relu", 0.1, False)],
        ops._backward_act_input_op: [(dy, x, mean, invstd, w, b, "relu", 0.0, True),
                                     (dy, x, mean, invstd, w, b, "gelu", 0.0, False)],
    }


def test_every_custom_op_has_a_sample():
    registered = {v for v in vars(ops).values()
                  if isinstance(v, torch._library.custom_ops.CustomOpDef)}
    assert registered == set(_op_samples())


@pytest.mark.parametrize("op", list(_op_samples()), ids=lambda op: op._name)
def test_opcheck(op):
    for args in _op_samples()[op]:
        torch.library.opcheck(op, args)


def test_dispatch_modes_take_the_traced_route():
    """make_fx (a dispatch mode, without torch.compile) records ATen's BN, and fake tensors
    run through every kind."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    layer = batchnorm.BatchNormAct2d(C, act="silu").train()
    graph = make_fx(lambda x: layer(x))(torch.randn(6, C, 5, 5))
    targets = {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
    assert "aten._native_batch_norm_legit_functional.default" in targets
    assert not any("batchnorm" in t for t in targets)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        for kind in KINDS:
            net = Net(kind)
            y = net(*(mode.from_tensor(a) for a in _args(kind)))
            assert y.shape == (6, C, 5, 5)


def test_the_plan_sends_tracers_to_aten_and_torch_func_to_the_functions():
    """One decision (core/plan.py): under a tracer (fake tensors) the "traced" route is
    plan.TRACED, whose kernels are core/traced.py's ATen ops; under a torch.func transform
    the same route keeps the autograd Functions (their vmap rules) over the custom ops,
    and vmap still gives a loop's numbers."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from batchnorm.core import plan, traced
    from batchnorm.core.autograd import BatchNormEval, BatchNormTrain

    x = torch.randn(6, C, 5, 5)
    w, b = torch.rand(C) + 0.5, torch.randn(C)
    rm, rv = torch.randn(C), torch.rand(C) + 0.5
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = mode.from_tensor(x)
        assert plan.train_plan(fake, w, b, rm, rv) is plan.TRACED
        assert plan.eval_plan(fake, rm, rv, w, b) is plan.TRACED
    assert plan.TRACED.route == "traced" and plan.TRACED.kernels is traced
    assert plan.train_plan(x, w, b).route != "traced"  # eager: a kernel's route

    seen = []

    def one(xi):
        seen.append((plan.train_plan(xi, w, b, rm, rv), plan.eval_plan(xi, rm, rv, w, b)))
        return batchnorm.batch_norm_stateless(xi, rm, rv, w, b, training=True)

    xs = torch.stack([x, 3 * x + 1])
    y, new_mean, new_var = torch.func.vmap(one)(xs)
    train, evaluate = seen[0]
    assert train.route == evaluate.route == "traced"
    assert train.kernels is None and train.function == BatchNormTrain.apply
    assert evaluate.kernels is None and evaluate.function == BatchNormEval.apply
    for i in range(2):
        y_i, mean_i, var_i = batchnorm.batch_norm_stateless(xs[i], rm, rv, w, b, training=True)
        torch.testing.assert_close(y[i], y_i)
        torch.testing.assert_close(new_mean[i], mean_i)
        torch.testing.assert_close(new_var[i], var_i)
