"""BatchNormAct1d/2d/3d: outputs, each gradient and the running statistics equal separate
torch.nn BN + activation, in both backward modes (keep the output / keep the input);
gamma near zero gives finite gradients equal to those of BN with the documented
effective weight; the memory-saving path keeps only the output; gradcheck (and
gradgradcheck where available); bad input and bad arguments."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import batchnorm
from batchnorm import kernels
from batchnorm.kernels import activations
from conftest import TOL

TORCH_ACT = {
    "identity": lambda y, a: y,
    "relu": lambda y, a: F.relu(y),
    "leaky_relu": lambda y, a: F.leaky_relu(y, a),
    "elu": lambda y, a: F.elu(y, a),
    "silu": lambda y, a: F.silu(y),
    "gelu": lambda y, a: F.gelu(y),
}
ACTS = [("identity", None), ("relu", None), ("leaky_relu", 0.1), ("leaky_relu", 3.0),
        ("elu", 1.0), ("elu", 0.5), ("silu", None), ("gelu", None), ("leaky_relu", 0.0)]
SHAPES = [(batchnorm.BatchNormAct1d, torch.nn.BatchNorm1d, (8, 3)),
          (batchnorm.BatchNormAct1d, torch.nn.BatchNorm1d, (4, 3, 5)),
          (batchnorm.BatchNormAct2d, torch.nn.BatchNorm2d, (3, 3, 4, 5)),
          (batchnorm.BatchNormAct3d, torch.nn.BatchNorm3d, (2, 3, 2, 3, 4))]


def _pair(cls, torch_cls, c, act, alpha, memory_saving, dtype):
    ours = cls(c, momentum=0.2, act=act, alpha=alpha, memory_saving=memory_saving, dtype=dtype)
    theirs = torch_cls(c, momentum=0.2, dtype=dtype)
    with torch.no_grad():
        theirs.weight.copy_(torch.tensor([0.7, -1.3, 1.9])[:c])  # a negative gamma too
        theirs.bias.copy_(torch.tensor([0.2, -0.4, 0.1])[:c])
        theirs.running_mean.uniform_(-1, 1)
        theirs.running_var.uniform_(0.5, 2)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


# every activation x backward mode x train/eval x dtype; the shapes (1d/2d/3d) rotate
CONFIGS = [
    (act, saving, mode, dtype, SHAPES[i % len(SHAPES)])
    for i, (act, saving, mode, dtype) in enumerate(itertools.product(
        ACTS, [True, False], ["train", "eval"], [torch.float64, torch.float32]))
]


@pytest.mark.parametrize(
    "act,memory_saving,mode,dtype,case", CONFIGS,
    ids=[f"{a[0]}{a[1] or ''}-{'out' if s else 'in'}-{m}-{str(d)[6:]}-rank{len(c[2])}"
         for a, s, m, d, c in CONFIGS],
)
def test_equals_separate_batchnorm_and_activation(act, memory_saving, mode, dtype, case):
    (name, alpha), (cls, torch_cls, shape) = act, case
    ours, theirs = _pair(cls, torch_cls, shape[1], name, alpha, memory_saving, dtype)
    a = ours.alpha
    ours.train(mode == "train"), theirs.train(mode == "train")
    tol = TOL[dtype]
    for _ in range(2):
        x = torch.randn(shape, dtype=dtype) * 2 + 0.5
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        z1, z2 = ours(x1), TORCH_ACT[name](theirs(x2), a)
        torch.testing.assert_close(z1, z2, **tol)
        _same_gradients(ours, theirs, z1, z2, x1, x2, tol, tol)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, **tol)
    torch.testing.assert_close(ours.running_var, theirs.running_var, **tol)


@pytest.mark.parametrize("act,alpha", [("leaky_relu", 0.01), ("elu", 1.0), ("identity", None)])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gamma_near_zero_gives_finite_gradients_of_the_effective_weight(act, alpha, mode):
    dtype = torch.float64
    layer = batchnorm.BatchNormAct2d(4, act=act, alpha=alpha, weight_eps=1e-4, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.0, 3e-5, -2e-6, 0.8], dtype=dtype))
        layer.bias.copy_(torch.tensor([0.5, -0.3, 0.0, 0.1], dtype=dtype))
    layer.train(mode == "train")
    w_eff = layer.effective_weight()
    assert torch.equal(w_eff, torch.tensor([1e-4, 1e-4, -1e-4, 0.8], dtype=dtype))
    ref = torch.nn.BatchNorm2d(4, dtype=dtype).train(mode == "train")
    with torch.no_grad():
        ref.weight.copy_(w_eff)
        ref.bias.copy_(layer.bias)
    x = torch.randn(4, 4, 3, 3, dtype=dtype) * 2 + 1
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    z1, z2 = layer(x1), TORCH_ACT[act](ref(x2), layer.alpha)
    torch.testing.assert_close(z1, z2, rtol=1e-9, atol=1e-9)
    g = torch.randn_like(z1)
    z1.backward(g)
    z2.backward(g)
    for ours, theirs in [(x1.grad, x2.grad), (layer.weight.grad, ref.weight.grad), (layer.bias.grad, ref.bias.grad)]:
        assert torch.isfinite(ours).all()
        # x_hat is recovered as (y - beta) / gamma_eff: float64 keeps ~1e-16 / 1e-4 relative
        torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-7)


def test_effective_weight_keeps_the_weight_and_floors_its_magnitude():
    """sign(w) * max(|w|, weight_eps) with sign(0) = +1 (-0.0 too); NaN stays NaN; in the
    weight's dtype, without gradient."""
    from batchnorm.variants._act_autograd import effective_weight

    for dtype in (torch.float32, torch.float64):
        w = torch.tensor([0.0, -0.0, 3e-6, -3e-6, 1e-4, -1e-4, 0.7, -2.5, float("inf"),
                          float("nan")], dtype=dtype, requires_grad=True)
        got = effective_weight(w, 1e-4)
        want = torch.tensor([1e-4, 1e-4, 1e-4, -1e-4, 1e-4, -1e-4, 0.7, -2.5, float("inf"),
                             float("nan")], dtype=dtype)
        assert got.dtype == dtype and not got.requires_grad
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(w.detach()[6:9], got[6:9])  # |w| >= weight_eps: w itself


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_effective_weight_is_the_weight_itself_exactly_when_no_magnitude_is_floored(dtype):
    """Where every |w| >= weight_eps (compared in w's dtype, as clamp does) the effective
    weight is the weight's own storage (no ATen op per call); one value below the floor,
    and it is the where-form: equal values either way, NaN and inf included."""
    from batchnorm.variants._act_autograd import effective_weight

    eps = 1e-5
    floor = torch.tensor(eps, dtype=dtype)  # eps rounded to the dtype: the boundary
    base = torch.tensor([0.3, -1.7, float("inf"), float("nan"), 2.0], dtype=dtype)
    cases = {
        "all above": (base, True),
        "at the floor": (torch.cat([base, floor.view(1), -floor.view(1)]), True),
        "just below": (torch.cat([base, torch.nextafter(floor, torch.zeros(())).view(1)]),
                       False),
        "zero": (torch.cat([base, torch.zeros(1, dtype=dtype)]), False),
    }
    for name, (values, kept) in cases.items():
        w = values.clone().requires_grad_()
        got = effective_weight(w, eps)
        d = w.detach()
        want = torch.where(d >= 0, d.clamp(min=eps), d.clamp(max=-eps))
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=name)
        assert (got.data_ptr() == w.data_ptr()) is kept, name


def test_zero_gamma_in_float32_stays_finite_and_learns():
    layer = batchnorm.BatchNormAct2d(2, act="leaky_relu")
    with torch.no_grad():
        layer.weight.zero_()
    x = torch.randn(4, 2, 5, 5)
    layer(x.requires_grad_()).pow(2).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.weight.grad).all()
    assert layer.weight.grad.abs().sum() > 0  # straight-through: a zero gamma still moves


def _saved_storages(fn):
    """Storages (data_ptr -> bytes) of the tensors autograd saves while ``fn`` runs."""
    seen = {}

    def pack(t):
        if t.numel() > 64:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return seen, out


@pytest.mark.parametrize("act,saves", [("leaky_relu", "output"), ("elu", "output"),
                                       ("identity", "output"), ("relu", "input"), ("silu", "input")])
def test_what_the_backward_keeps(act, saves):
    layer = batchnorm.BatchNormAct2d(8, act=act)
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    seen, z = _saved_storages(lambda: layer(x))
    kept = z if saves == "output" else x
    assert list(seen) == [kept.untyped_storage().data_ptr()]
    assert layer.saves_output() == (saves == "output")


def test_gradcheck_both_modes_and_gradgradcheck_input_saving():
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([0.8, -1.2], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.1, 0.3], dtype=torch.float64, requires_grad=True)
    for act, saving, mode in itertools.product(["leaky_relu", "elu", "gelu", "silu"], [True, False],
                                               ["train", "eval"]):
        layer = batchnorm.BatchNormAct1d(2, momentum=0.0, act=act, memory_saving=saving,
                                         dtype=torch.float64).train(mode == "train")
        call = lambda x, w, b: torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))  # noqa: E731,B023
        assert torch.autograd.gradcheck(call, (x, w, b)), (act, saving, mode)
        if not layer.saves_output():
            assert torch.autograd.gradgradcheck(call, (x, w, b)), (act, mode)


def test_double_backward_in_memory_saving_mode_raises_clearly():
    layer = batchnorm.BatchNormAct1d(2, act="leaky_relu")
    x = torch.randn(6, 2, requires_grad=True)
    with pytest.raises(RuntimeError, match="memory_saving=False"):
        torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)


def test_half_precision_input_matches_torch_nn():
    ours, theirs = _pair(batchnorm.BatchNormAct2d, torch.nn.BatchNorm2d, 3, "leaky_relu", 0.1, True, torch.float32)
    x = (torch.randn(4, 3, 5, 5) * 2).to(torch.bfloat16)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    z1, z2 = ours(x1), F.leaky_relu(theirs(x2), 0.1)
    assert z1.dtype == torch.bfloat16
    torch.testing.assert_close(z1, z2, **TOL[torch.bfloat16])
    z1.float().sum().backward()
    z2.float().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=5e-2, atol=5e-2)


def test_bad_arguments_and_bad_input_leave_state_untouched():
    with pytest.raises(ValueError, match="unknown activation"):
        batchnorm.BatchNormAct2d(3, act="tanh")
    with pytest.raises(ValueError, match="elu needs alpha > 0"):
        batchnorm.BatchNormAct2d(3, act="elu", alpha=0.0)
    with pytest.raises(ValueError, match="weight_eps must be > 0"):
        batchnorm.BatchNormAct2d(3, weight_eps=0.0)
    assert not activations.is_invertible("leaky_relu", 0.0)
    bn = batchnorm.BatchNormAct2d(3, act="leaky_relu")
    bn(torch.randn(4, 3, 2, 2))
    snap = {k: v.clone() for k, v in bn.state_dict().items()}
    for x, err in [(torch.randn(4, 3, 5), ValueError), (torch.randn(4, 5, 2, 2), ValueError),
                   (torch.randint(0, 3, (4, 3, 2, 2)), TypeError), (torch.randn(1, 3, 1, 1), ValueError)]:
        with pytest.raises(err):
            bn(x)
        assert all(torch.equal(v, snap[k]) for k, v in bn.state_dict().items())


@pytest.mark.parametrize("act", ["leaky_relu", "gelu"])
def test_channels_last_keeps_its_layout_and_values(act):
    ours, theirs = _pair(batchnorm.BatchNormAct2d, torch.nn.BatchNorm2d, 3, act, None, True, torch.float32)
    x = (torch.randn(4, 3, 5, 6) * 2).contiguous(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    z1, z2 = ours(x1), TORCH_ACT[act](theirs(x2), ours.alpha)
    assert z1.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(z1, z2, **TOL[torch.float32])
    g = torch.randn_like(z1)
    z1.backward(g)
    z2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, **TOL[torch.float32])
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, **TOL[torch.float32])


def test_network_saves_at_most_055x_of_torch_nn_activation_bytes():
    """conv -> BatchNormAct(leaky_relu) blocks against conv -> BatchNorm2d -> LeakyReLU:
    unique saved storages, parameters excluded (benchmarks/bn_act_memory.py at scale)."""
    def stack(ours):
        layers = []
        for _ in range(4):
            layers.append(torch.nn.Conv2d(4, 4, 3, padding=1, bias=False))
            layers += ([batchnorm.BatchNormAct2d(4, act="leaky_relu")] if ours
                       else [torch.nn.BatchNorm2d(4), torch.nn.LeakyReLU(0.01)])
        return torch.nn.Sequential(*layers)

    x = torch.randn(2, 4, 8, 8)

    def saved(model):
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x).sum().backward()
        return sum(seen.values())

    ours, theirs = saved(stack(True)), saved(stack(False))
    one = x.numel() * x.element_size()
    assert theirs >= 12 * one  # 3 activation tensors per block
    assert ours / theirs <= 0.55


# either side of the fused CPU kernels' crossover (cpu.backend.PREFER_MIN_ACT = 100,000
# elements): 73,728 elements run ATen's kernels (native), 100,352 the fused numba ones
CROSSOVER = [((2, 64, 24, 24), "native"), ((2, 64, 28, 28), "cpu")]


@pytest.mark.parametrize("shape,backend", CROSSOVER, ids=["below", "above"])
@pytest.mark.parametrize("act,alpha", [("leaky_relu", 0.01), ("elu", 1.0), ("silu", None)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_both_sides_of_the_cpu_crossover_equal_torch_nn(shape, backend, act, alpha, dtype):
    """On both sides of the crossover: the route taken, two training steps (output, every
    gradient, running statistics), eval with and without autograd, against torch.nn's BN
    followed by the activation at TOL (float64 1e-10, float32 1e-5; float32 weight and
    bias gradients, sums over 1,152 values per channel, at 1e-4); the backward keeps only
    z (invertible activations) or only x (silu) on both sides."""
    pytest.importorskip("numba")
    from batchnorm.kernels.cpu.backend import PREFER_MIN_ACT

    c = shape[1]
    assert (torch.Size(shape).numel() >= PREFER_MIN_ACT) == (backend == "cpu")
    ours = batchnorm.BatchNormAct2d(c, momentum=0.2, act=act, alpha=alpha, dtype=dtype)
    theirs = torch.nn.BatchNorm2d(c, momentum=0.2, dtype=dtype)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5).mul_(torch.where(torch.arange(c) % 3 == 0, -1.0, 1.0))
        theirs.bias.uniform_(-0.5, 0.5)
    ours.load_state_dict(theirs.state_dict())
    a, tol = ours.alpha, TOL[dtype]
    sums = tol if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for mode in ("train", "train", "eval"):
        ours.train(mode == "train"), theirs.train(mode == "train")
        x = torch.randn(shape, dtype=dtype) * 2 + 0.5
        assert kernels.pick("forward_train_act" if mode == "train" else "forward_eval_act", x).name == backend
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        seen, z1 = _saved_storages(lambda: ours(x1))  # noqa: B023
        z2 = TORCH_ACT[act](theirs(x2), a)
        kept = z1 if ours.saves_output() else x1
        assert list(seen) == [kept.untyped_storage().data_ptr()]
        torch.testing.assert_close(z1, z2, **tol)
        _same_gradients(ours, theirs, z1, z2, x1, x2, tol, sums)
        torch.testing.assert_close(ours.running_mean, theirs.running_mean, **tol)
        torch.testing.assert_close(ours.running_var, theirs.running_var, **tol)
        if backend == "native":  # ATen's kernel blends the batch in, as torch.nn's does
            assert torch.equal(ours.running_mean, theirs.running_mean)
            assert torch.equal(ours.running_var, theirs.running_var)
        assert ours.num_batches_tracked == theirs.num_batches_tracked
    with torch.no_grad():  # no backward: BN's own plan and the activation in place
        for mode in ("eval", "train"):
            ours.train(mode == "train"), theirs.train(mode == "train")
            x = torch.randn(shape, dtype=dtype) * 2 + 0.5
            torch.testing.assert_close(ours(x), TORCH_ACT[act](theirs(x), a), **tol)
    torch.testing.assert_close(ours.running_var, theirs.running_var, **tol)


@pytest.mark.parametrize("shape,backend", CROSSOVER, ids=["below", "above"])
@pytest.mark.parametrize("act", ["leaky_relu", "relu"])
def test_non_finite_batch_leaves_the_running_statistics_on_both_sides(shape, backend, act):
    """The guard around the running update holds where ATen's kernel blends the batch in
    (below the crossover) and where the layer updates after the fused kernels: a batch
    with a NaN leaves the buffers and num_batches_tracked as they were, with a warning;
    momentum=None (cumulative average) then counts like torch.nn's."""
    pytest.importorskip("numba")
    ours = batchnorm.BatchNormAct2d(shape[1], act=act, momentum=None)
    theirs = torch.nn.BatchNorm2d(shape[1], momentum=None)
    for _ in range(2):
        x = torch.randn(shape) + 1
        ours(x.clone().requires_grad_()), theirs(x)
    snap = {k: v.clone() for k, v in ours.state_dict().items()}
    bad = torch.randn(shape)
    bad[0, 3, 0, 0] = float("nan")
    assert kernels.pick("forward_train_act", bad).name == backend
    with pytest.warns(RuntimeWarning, match="not finite"):
        ours(bad.requires_grad_())
    assert all(torch.equal(v, snap[k]) for k, v in ours.state_dict().items())
    x = torch.randn(shape) + 1
    ours(x.clone().requires_grad_()), theirs(x)
    assert ours.num_batches_tracked == theirs.num_batches_tracked == 3
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, **TOL[torch.float32])
    torch.testing.assert_close(ours.running_var, theirs.running_var, **TOL[torch.float32])


def test_weight_changed_in_place_before_the_backward_is_refused_as_by_torch_nn():
    """The memory-saving path saves the weight's own storage as its effective weight (every
    |w| >= weight_eps): an optimizer step between forward and backward is refused by
    autograd's version check, as for torch.nn's BN (which saves its weight), never run
    silently with other values."""
    x = torch.randn(4, 3, 5, 5)
    for layer in (batchnorm.BatchNormAct2d(3, act="leaky_relu"),
                  torch.nn.BatchNorm2d(3)):
        z = layer(x.clone().requires_grad_())
        with torch.no_grad():
            layer.weight.mul_(2.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            z.sum().backward()


def _same_gradients(ours, theirs, z1, z2, x1, x2, tol, sums):
    """Backward of one upstream gradient through both layers: equal input gradients
    (``tol``) and parameter gradients (``sums``), then the parameter gradients cleared."""
    g = torch.randn_like(z1)
    z1.backward(g)
    z2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, **tol)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, **sums)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, **sums)
    for m in (ours, theirs):
        m.weight.grad = m.bias.grad = None
