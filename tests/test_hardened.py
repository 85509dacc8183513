"""Issue 20's first items: every parameter and buffer is checked before any kernel runs
(shape (C,), device, floating point) on every route and layer kind, with the state
untouched and torch.nn's wording; eps (> 0 in training, >= 0 in eval, finite) and momentum
are validated at construction and at call; an empty training batch gives an empty output with gradients and changes nothing."""

import re
import warnings

import pytest
import torch
from torch.func import functional_call

import batchnorm
from batchnorm import kernels

LAYERS = {
    "bn": lambda: batchnorm.BatchNorm2d(3),
    "renorm": lambda: batchnorm.BatchRenorm2d(3),
    "ghost": lambda: batchnorm.GhostBatchNorm2d(3, virtual_batch_size=2),
    "masked": lambda: batchnorm.MaskedBatchNorm2d(3),
    "act": lambda: batchnorm.BatchNormAct2d(3),
    "act-input": lambda: batchnorm.BatchNormAct2d(3, act="relu", memory_saving=False),
    "sync": lambda: batchnorm.SyncBatchNorm(3),
}
#: Shapes that take each route in auto mode: ATen's kernels (small), the fused numba ones
#: (from ``cpu.backend.PREFER_MIN`` elements; ``test_each_shape_takes_its_route``).
SHAPES = {"native": (4, 3, 5, 5), "cpu": (4, 3, 160, 160)}


@pytest.mark.parametrize("route", SHAPES)
def test_each_shape_takes_its_route(route):
    """The crossovers move when they are measured again: the tests named after a route
    must still run on it."""
    from batchnorm.core import plan

    x = torch.randn(SHAPES[route], requires_grad=True)
    assert plan.train_plan(x, None, None).route == route


def _snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _unchanged(m, snap):
    return all(torch.equal(v, snap[k]) for k, v in m.state_dict().items())


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
@pytest.mark.parametrize("route", SHAPES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_a_short_vector_is_refused_before_any_kernel_reads_it(kind, name, route, training):
    m = LAYERS[kind]().train(training)
    short = torch.ones(2) if "var" in name or name == "weight" else torch.zeros(2)
    if name in ("weight", "bias"):
        setattr(m, name, torch.nn.Parameter(short))
    else:
        setattr(m, name, short)
    snap = _snapshot(m)
    with pytest.raises(ValueError, match=f"{name} should contain 3 elements not 2"):
        m(torch.randn(SHAPES[route]))
    assert _unchanged(m, snap)


def test_functional_call_with_a_short_buffer_is_refused_with_the_state_untouched():
    m = batchnorm.BatchNorm2d(3)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    state["running_mean"] = torch.zeros(2)
    with pytest.raises(ValueError, match="running_mean should contain 3 elements not 2"):
        functional_call(m, state, (torch.randn(4, 3, 5, 5),))
    assert torch.equal(state["running_var"], torch.ones(3))
    assert int(state["num_batches_tracked"]) == 0


@pytest.mark.parametrize("backend", ["auto", "cpu", "native", "torch"])
def test_every_backend_is_behind_the_check(backend):
    m = batchnorm.BatchNorm2d(3)
    m.running_var = torch.ones(5)
    snap = _snapshot(m)
    with kernels.use_backend(backend), pytest.raises(ValueError, match="should contain 3"):
        m(torch.randn(8, 3, 64, 64))
    assert _unchanged(m, snap)


def test_a_vector_on_another_device_or_of_an_integer_type_is_refused():
    m = batchnorm.BatchNorm2d(3)
    m.weight = torch.nn.Parameter(torch.ones(3, device="meta"))
    snap = {k: v.clone() for k, v in m.state_dict().items() if k != "weight"}
    with pytest.raises(ValueError, match="weight is on meta but the input is on cpu"):
        m(torch.randn(4, 3, 5, 5))
    assert all(torch.equal(m.state_dict()[k], v) for k, v in snap.items())
    m = batchnorm.BatchNorm2d(3)
    m.running_mean = torch.zeros(3, dtype=torch.long)
    with pytest.raises(TypeError, match="running_mean must be floating point"):
        m(torch.randn(4, 3, 5, 5))
    assert int(m.num_batches_tracked) == 0


def test_the_functional_forms_check_their_vectors_and_options():
    x = torch.randn(4, 3, 5)
    with pytest.raises(ValueError, match="running_var should contain 3 elements not 4"):
        batchnorm.batch_norm(x, torch.zeros(3), torch.ones(4), training=True)
    with pytest.raises(ValueError, match="weight should contain 3 elements not 2"):
        batchnorm.batch_norm_stateless(x, torch.zeros(3), torch.ones(3), torch.ones(2))
    with pytest.raises(ValueError, match="eps must be positive during training"):
        batchnorm.batch_norm(x, None, None, training=True, eps=-1.0)
    with pytest.raises(ValueError, match="momentum must be between 0 and 1"):
        batchnorm.batch_norm(x, torch.zeros(3), torch.ones(3), training=True, momentum=-0.1)
    rm = torch.zeros(3)
    with pytest.raises(ValueError, match="bias should contain 3 elements not 1"):
        batchnorm.batch_norm(x, rm, torch.ones(3), bias=torch.zeros(1), training=True,
                             mask=torch.ones(4, 5, dtype=torch.bool))
    assert torch.equal(rm, torch.zeros(3))


# -- eps: > 0 in training, >= 0 in eval, as torch.nn; finite everywhere (stricter) --------
def _torch_error(call) -> str:
    """torch.nn's message for ``call`` without its op name ("batch_norm eps must ..." ->
    "eps must ..."): what ours must say too."""
    with pytest.raises(ValueError) as e:
        call()
    return str(e.value).split(" ", 1)[1]


EPS_LAYERS = {
    **LAYERS,
    "bn1d": lambda: batchnorm.BatchNorm1d(3),
    "bn3d": lambda: batchnorm.BatchNorm3d(3),
    "renorm-warm": lambda: batchnorm.BatchRenorm2d(3, warmup_steps=0),
    "no-running": lambda: batchnorm.BatchNorm2d(3, track_running_stats=False),
}
EPS_INPUTS = {"bn1d": (4, 3), "bn3d": (4, 3, 2, 2, 2)}


def _eps_input(kind, route="native", n=None):
    shape = EPS_INPUTS.get(kind, SHAPES[route])
    return torch.randn((shape[0] if n is None else n, *shape[1:]))


def _forward(m, kind, x):
    if kind == "masked":  # with a mask: the masked route
        return m(x, torch.arange(x.shape[0]) % 4 != 2)
    return m(x)


@pytest.mark.parametrize("kind", EPS_LAYERS)
@pytest.mark.parametrize("eps", [0.0, -0.0, -1e-5])
@pytest.mark.parametrize("route", SHAPES)
def test_eps_not_positive_in_training_is_refused_as_torch_nn_does(kind, eps, route):
    """torch.nn: "eps must be positive during training, but got 0.0"; ours says the same,
    on every layer kind and route, for the full batch and an empty one, with the state
    untouched. eps = 0 is accepted at construction (as torch.nn); eps < 0 is refused
    there (torch.nn accepts it until a call), so it is set afterwards."""
    x = _eps_input(kind, route)
    expected = _torch_error(lambda: torch.nn.BatchNorm2d(3, eps=eps)(torch.randn(4, 3, 2, 2)))
    m = EPS_LAYERS[kind]()
    m.eps = eps
    m.weight.grad = None
    snap = _snapshot(m)
    for batch in (x, x[:0]):
        with pytest.raises(ValueError, match=re.escape(expected)) as e:
            _forward(m, kind, batch.requires_grad_())
        assert str(e.value).startswith(type(m).__name__) and "Set a small positive eps" in str(e.value)
        assert _unchanged(m, snap) and m.weight.grad is None
    if kind in ("no-running",):  # eval without running statistics uses the batch's: refused
        with pytest.raises(ValueError, match=re.escape(expected)):
            m.eval()(x)
        torch_m = torch.nn.BatchNorm2d(3, eps=eps, track_running_stats=False).eval()
        assert _torch_error(lambda: torch_m(x)) == expected


@pytest.mark.parametrize("kind", [k for k in EPS_LAYERS if k != "no-running"] + ["frozen"])
def test_eps_zero_in_eval_is_torch_nn_result(kind):
    """eps = 0 normalises with the running statistics in eval exactly as torch.nn does
    (constructed with eps = 0: allowed, as in torch.nn)."""
    x = _eps_input(kind)
    m = batchnorm.FrozenBatchNorm2d(3) if kind == "frozen" else EPS_LAYERS[kind]()
    m.eps = 0.0
    twin = {"bn1d": torch.nn.BatchNorm1d, "bn3d": torch.nn.BatchNorm3d}.get(
        kind, torch.nn.BatchNorm2d)(3, eps=0.0)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.rand(3, generator=g) + 0.5 for k in
             ("weight", "bias", "running_mean", "running_var")}
    for module in (m, twin):
        module.load_state_dict({**module.state_dict(), **state})
        module.eval()
    expected = torch.relu(twin(x)) if kind.startswith("act") else twin(x)  # act: relu
    torch.testing.assert_close(_forward(m, kind, x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("eps", [-1e-5, -10.0])
def test_eps_negative_in_eval_is_refused_as_torch_nn_does(eps):
    """torch.nn, eval: "eps must be non-negative, but got -10.0"; ours: the same words, for
    the layers and the frozen one (whose construction refuses it, so it is set after)."""
    x = torch.randn(4, 3, 5, 5)
    twin = torch.nn.BatchNorm2d(3, eps=eps).eval()
    expected = _torch_error(lambda: twin(x))
    for m in (batchnorm.BatchNorm2d(3), batchnorm.FrozenBatchNorm2d(3),
              batchnorm.BatchRenorm2d(3), batchnorm.SyncBatchNorm(3)):
        m.eps = eps
        m.eval()
        snap = _snapshot(m)
        with pytest.raises(ValueError, match=re.escape(expected)):
            m(x)
        assert _unchanged(m, snap)


@pytest.mark.parametrize("bad", [-1e-5, -10.0, float("nan"), float("inf")])
def test_a_negative_or_non_finite_eps_is_refused_at_construction(bad):
    """Stricter than torch.nn, which builds the layer (and then gives NaN or zeros for
    NaN / inf, or raises at the first call for eps < 0)."""
    torch.nn.BatchNorm2d(3, eps=bad)
    word = "non-negative" if bad == bad and bad < 0 else "a finite number"
    makers = (lambda e: batchnorm.BatchNorm1d(3, eps=e),
              lambda e: batchnorm.FrozenBatchNorm1d(3, eps=e),
                 lambda e: batchnorm.GhostBatchNorm1d(3, eps=e),
                 lambda e: batchnorm.SyncBatchNorm(3, eps=e),
                 lambda e: batchnorm.BatchNormAct2d(3, eps=e))
    for make in makers:
        with pytest.raises(ValueError, match=f"eps must be {word}, but got {bad}"):
            make(bad)
        assert make(0.0).eps == 0.0  # eps = 0 is built, as in torch.nn (refused in training)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "1e-5", None])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_a_non_finite_or_non_number_eps_is_refused_at_call(bad, training):
    m = batchnorm.BatchNorm1d(3).train(training)
    m.eps = bad
    snap = _snapshot(m)
    error, word = (ValueError, "a finite number") if isinstance(bad, float) else (
        TypeError, "a number")
    with pytest.raises(error, match=f"BatchNorm1d: eps must be {word}, but got"):
        m(torch.randn(8, 3))
    assert _unchanged(m, snap)


FUNCTIONAL = {
    "batch_norm": lambda x, rm, rv, training, eps: batchnorm.batch_norm(
        x, rm, rv, training=training, eps=eps),
    "batch_norm_stateless": lambda x, rm, rv, training, eps: batchnorm.batch_norm_stateless(
        x, rm, rv, training=training, eps=eps)[0],
    "masked": lambda x, rm, rv, training, eps: batchnorm.batch_norm(
        x, rm, rv, training=training, eps=eps, mask=torch.ones(x.shape[0], dtype=torch.bool)),
    "no_running": lambda x, rm, rv, training, eps: batchnorm.batch_norm(
        x, None, None, training=True, eps=eps),
}


@pytest.mark.parametrize("form", FUNCTIONAL)
@pytest.mark.parametrize("eps", [0.0, -1e-5])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_the_functional_forms_check_eps_as_torch_nn_functional_does(form, eps, training):
    """torch.nn.functional.batch_norm's rule and words: eps > 0 in training, >= 0 in eval;
    eval with eps = 0 gives its result. The running buffers are untouched on an error."""
    x = torch.randn(6, 3, 5)
    rm, rv = torch.rand(3), torch.rand(3) + 0.5
    training = training or form == "no_running"

    def torch_call():
        if form == "no_running":
            return torch.nn.functional.batch_norm(x, None, None, training=True, eps=eps)
        return torch.nn.functional.batch_norm(x, rm.clone(), rv.clone(), training=training,
                                              eps=eps)
    if eps == 0.0 and not training:
        torch.testing.assert_close(FUNCTIONAL[form](x, rm, rv, training, eps), torch_call())
        return
    expected = _torch_error(torch_call)
    before = rm.clone(), rv.clone()
    for batch in (x, x[:0]):
        with pytest.raises(ValueError, match=re.escape(expected)):
            FUNCTIONAL[form](batch, rm, rv, training, eps)
        assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_momentum_must_be_between_0_and_1_or_none(bad):
    with pytest.raises(ValueError, match="momentum must be between 0 and 1"):
        batchnorm.BatchNorm1d(3, momentum=bad)
    for good in (0.0, 1.0, None):
        batchnorm.BatchNorm1d(3, momentum=good)(torch.randn(8, 3))
    m = batchnorm.BatchNorm1d(3)
    m.momentum = bad
    snap = _snapshot(m)
    with pytest.raises(ValueError, match="momentum must be between 0 and 1"):
        m(torch.randn(8, 3))
    assert _unchanged(m, snap)


@pytest.mark.parametrize("kind", [*LAYERS, "frozen"])
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4)], ids=["N=0", "H=0"])
def test_an_empty_training_batch_is_an_empty_output_with_gradients(kind, shape):
    m = batchnorm.FrozenBatchNorm2d(3) if kind == "frozen" else LAYERS[kind]()
    m(torch.randn(4, 3, 4, 4))
    snap = _snapshot(m)
    x = torch.randn(shape, requires_grad=True)
    y = m(x)
    assert y.shape == shape and y.requires_grad
    y.sum().backward()
    assert x.grad.shape == shape
    if kind != "frozen":
        torch.testing.assert_close(m.weight.grad, torch.zeros(3))
    assert _unchanged(m, snap)
    torch_y = torch.nn.BatchNorm2d(3)(torch.randn(shape))
    assert torch_y.shape == y.shape  # torch.nn gives the same empty output


def test_an_empty_batch_in_the_functional_forms_is_an_empty_output():
    x = torch.randn(0, 3, 5)
    rm, rv = torch.zeros(3), torch.ones(3)
    assert batchnorm.batch_norm(x, rm, rv, training=True).shape == (0, 3, 5)
    y, new_rm, new_rv = batchnorm.batch_norm_stateless(x, rm, rv, training=True)
    assert y.shape == (0, 3, 5) and torch.equal(new_rm, rm) and torch.equal(new_rv, rv)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


# -- non-finite running statistics warn on load and in eval, naming the channels ---------
RUNNING_LAYERS = {**LAYERS, "frozen": lambda: batchnorm.FrozenBatchNorm2d(3)}


def _bad_state(m, name):
    sd = m.state_dict()
    if name == "running_var":
        sd[name] = torch.tensor([1.0, -1.0, float("nan")])
    else:
        sd[name] = torch.tensor([0.0, float("inf"), 0.0])
    return sd, ([1, 2] if name == "running_var" else [1])


@pytest.mark.parametrize("kind", RUNNING_LAYERS)
@pytest.mark.parametrize("name", ["running_mean", "running_var"])
def test_non_finite_running_statistics_warn_on_load_and_once_in_eval(kind, name):
    m = RUNNING_LAYERS[kind]()
    sd, channels = _bad_state(m, name)
    loaded = r"loaded running statistics.*channel\(s\) " + re.escape(str(channels))
    with pytest.warns(RuntimeWarning, match=loaded):
        m.load_state_dict(sd)
    m.eval()
    x = torch.randn(4, 3, 5, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # checked at load: the same buffers warn no more
        m(x)
        m(x)
    m.running_var.fill_(-2.0)  # a new version of the buffer: checked once more at eval
    with pytest.warns(RuntimeWarning, match=r"normalises with running statistics.*\[0, 1, 2\]"):
        m(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(x)


def test_finite_running_statistics_and_training_do_not_warn():
    m = batchnorm.BatchNorm2d(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.load_state_dict(batchnorm.BatchNorm2d(3).state_dict())
        m(torch.randn(4, 3, 5, 5))
        m.eval()(torch.randn(4, 3, 5, 5))


def test_non_finite_running_statistics_do_not_warn_under_compile():
    m = batchnorm.BatchNorm2d(3).eval()
    m.running_var[1] = float("nan")
    compiled = torch.compile(m, backend="eager", fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = compiled(torch.randn(4, 3, 5, 5))
    assert out[:, 1].isnan().all() and out[:, 0].isfinite().all()


# -- the numba kernels' wrappers check their arrays' lengths, however they are called -----
def _cpu_calls():
    cpu = kernels.load("cpu")
    x = torch.randn(SHAPES["cpu"])
    dy, v = torch.randn_like(x), torch.rand(3) + 0.5
    return cpu, x, dy, v, {
        "forward_eval_act": lambda mean, invstd, weight, bias, dy: cpu.forward_eval_act(
            x, mean, invstd, weight, bias, "relu", 0.0),
        "forward_train_act": lambda mean, invstd, weight, bias, dy: cpu.forward_train_act(
            x, weight, bias, 1e-5, "identity", 0.0),
        "backward_reduce": lambda mean, invstd, weight, bias, dy: cpu.backward_reduce(
            dy, x, mean, invstd),
        "backward_elemt": lambda mean, invstd, weight, bias, dy: cpu.backward_elemt(
            dy, x, mean, invstd, weight, bias, bias, x.numel() / x.shape[1]),
        "backward": lambda mean, invstd, weight, bias, dy: cpu.backward(
            dy, x, mean, invstd, weight),
        "backward_eval": lambda mean, invstd, weight, bias, dy: cpu.backward_eval(
            dy, x, mean, invstd, weight),
        "backward_act": lambda mean, invstd, weight, bias, dy: cpu.backward_act(
            dy, x, mean, invstd, weight, bias, "leaky_relu", 0.01, True),
        "backward_act_input": lambda mean, invstd, weight, bias, dy: cpu.backward_act_input(
            dy, x, mean, invstd, weight, bias, "relu", 0.0, True),
    }


@pytest.mark.parametrize("vector", ["mean", "invstd", "weight", "bias", "dy"])
@pytest.mark.parametrize("function", [
    "forward_eval_act", "forward_train_act", "backward_reduce", "backward_elemt", "backward",
    "backward_eval", "backward_act", "backward_act_input"])
def test_cpu_kernel_wrappers_refuse_a_short_vector_called_directly(function, vector):
    pytest.importorskip("numba")
    cpu, x, dy, v, calls = _cpu_calls()
    args = {"mean": v * 0, "invstd": v, "weight": v, "bias": v * 0, "dy": dy}
    calls[function](**args)  # the right lengths run
    args[vector] = dy[:, :, :50] if vector == "dy" else v[:2]
    if vector not in READS[function]:  # this function does not read it: nothing to refuse
        return
    with pytest.raises(ValueError, match=r"cpu kernels: .*(3 elements|the input's size)"):
        calls[function](**args)


#: What each wrapper hands to its kernels (backward_elemt's sums are passed as "bias").
READS = {
    "forward_eval_act": {"mean", "invstd", "weight", "bias"},
    "forward_train_act": {"weight", "bias"},
    "backward_reduce": {"mean", "invstd", "dy"},
    "backward_elemt": {"mean", "invstd", "weight", "bias", "dy"},
    "backward": {"mean", "invstd", "weight", "dy"},
    "backward_eval": {"mean", "invstd", "weight", "dy"},
    "backward_act": {"mean", "invstd", "weight", "bias", "dy"},
    "backward_act_input": {"mean", "invstd", "weight", "bias", "dy"},
}


def test_cpu_running_update_and_guard_refuse_short_vectors():
    pytest.importorskip("numba")
    cpu = kernels.load("cpu")
    rm, rv, mean, invstd = torch.zeros(3), torch.ones(3), torch.zeros(3), torch.ones(3)
    assert cpu.update_running(rm, rv, mean, invstd, 1e-5, 1.0, 0.1) is True
    with pytest.raises(ValueError, match="running_var must have 3 elements"):
        cpu.update_running(rm, torch.ones(2), mean, invstd, 1e-5, 1.0, 0.1)
    assert torch.equal(rm, torch.zeros(3))
    with pytest.raises(ValueError, match="invstd must have mean's 3 elements"):
        cpu.finite_batch(mean, torch.ones(2), 1e-5)
