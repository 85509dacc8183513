"""The Triton kernels, run on CPU tensors by Triton's interpreter, against float64 math
and the pure-torch backend.

The interpreter must be chosen before ``triton.jit`` decorates the kernels, so this module
sets ``TRITON_INTERPRET=1`` before importing the backend (and reloads the backend if an
earlier test imported it without the interpreter); the variable is set again while
this module's tests run and restored after them. The interpreter runs the tiny block
sizes of ``INTERPRETER_TUNING``, so these small shapes cross block edges and split their
reductions over several programs. Its float32 -> bfloat16 conversion truncates where a
GPU rounds to nearest, hence one bfloat16 step of tolerance.

Every reduction runs on two paths (split: partial + merge + elementwise kernels; whole
channel: one kernel per call): the tests that take the ``path`` fixture run once with
each, forced through ``Tuning.path``, and check that the call took it.
"""

import dataclasses
import importlib
import os
import sys

import pytest
import torch
import torch.nn.functional as F

_previous = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from batchnorm import kernels  # noqa: E402
from batchnorm.kernels import activations, torch_backend  # noqa: E402
from batchnorm.kernels.triton import _kernels as _triton_kernels  # noqa: E402
from batchnorm.kernels.triton import backend as tb  # noqa: E402

if not tb.INTERPRETED:  # imported earlier for the GPU: rebuild the kernels for the interpreter
    importlib.reload(_triton_kernels)
    tb = importlib.reload(tb)
if _previous is None:  # keep the variable to this module's tests (see _interpreter below)
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _previous


@pytest.fixture(autouse=True, scope="module")
def _interpreter():
    """Triton also reads TRITON_INTERPRET at launch time (lazy imports)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield

@pytest.fixture(params=["split", "whole"])
def path(request, monkeypatch):
    """Force one reduction path for every call of the test (the interpreter's blocks)."""
    forced = dataclasses.replace(tb.INTERPRETER_TUNING, path=request.param)
    monkeypatch.setattr(tb, "_tuning", lambda device: forced)
    return request.param


def took(x, path):
    """The backend plans ``x`` on ``path``."""
    return tb._planned(x)[0].whole == (path == "whole")


EPS = 1e-5
# (shape, channels_last): odd sizes, C = 1/3/7/9/17, spatial 1/5/33, N = 1..3; the
# interpreter's blocks are 16 spatial positions or 8 channels wide.
CASES = [
    ((3, 7, 33), False),
    ((3, 7, 33), True),
    ((2, 3, 5, 7), False),
    ((1, 17, 3, 3), True),
    ((5, 9), False),
    ((2, 1, 5), False),
    ((1, 3, 1), True),
]
CASE_IDS = [f"{'x'.join(map(str, s))}-{'cl' if cl else 'nchw'}" for s, cl in CASES]
# Output tolerances against float64 math (bfloat16/float16: one rounding step of the output).
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}
STATS_TOL = dict(rtol=1e-5, atol=1e-6)  # float32 statistics against float64


def make(shape, channels_last=False, dtype=torch.float32, scale=2.0, shift=0.5):
    """A test input in the requested layout (channel axis innermost when channels_last)."""
    x = torch.randn(shape) * scale + shift
    if channels_last:
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    return x.to(dtype)


def params(C):
    return torch.randn(C) * 0.5 + 1.0, torch.randn(C) * 0.3


def f64(*ts):
    return [None if t is None else t.double() for t in ts]


def close(actual, expected, **tol):
    torch.testing.assert_close(actual.double(), expected.double(), **tol)


def test_triton_supports_dense_layouts_and_half_types_only():
    x = make((2, 3, 4, 5))
    assert tb.supports(x)
    assert tb.supports(x.to(memory_format=torch.channels_last))
    assert tb.supports(x.bfloat16()) and tb.supports(x.half())
    assert not tb.supports(x.double())  # float64 stays on the pure-torch path
    assert not tb.supports(x[:, :, ::2])  # neither NCHW-contiguous nor channels last
    assert not tb.supports(x.transpose(2, 3))
    assert not tb.supports(torch.randn(5))
    assert not tb.supports(torch.randn(0, 3, 4))


@pytest.mark.parametrize("shape,cl", CASES, ids=CASE_IDS)
def test_triton_training_forward_and_backward_match_float64(shape, cl, path):
    x = make(shape, cl)
    assert took(x, path)
    w, b = params(shape[1])
    dy = make(shape, cl)
    y, mean, invstd = tb.forward_train(x, w, b, EPS)
    y64, mean64, invstd64 = torch_backend.forward_train(*f64(x, w, b), EPS)
    close(mean, mean64, **STATS_TOL)
    close(invstd, invstd64, **STATS_TOL)
    close(y, y64, **TOL[torch.float32])
    assert y.dtype == x.dtype and y.stride() == x.stride()
    dx, dw, db = tb.backward(dy, x, mean, invstd, w)
    dx64, dw64, db64 = torch_backend.backward(*f64(dy, x, mean64, invstd64, w))
    close(dx, dx64, **TOL[torch.float32])
    close(dw, dw64, rtol=1e-5, atol=1e-4)
    close(db, db64, rtol=1e-5, atol=1e-4)
    assert dx.stride() == x.stride() and dw.dtype == torch.float32


@pytest.mark.parametrize("shape,cl", CASES[:4], ids=CASE_IDS[:4])
def test_triton_batch_stats_and_normalize_match_torch_backend(shape, cl, path):
    x = make(shape, cl)
    assert took(x, path)
    mean, var = tb.batch_stats(x)
    mean_t, var_t = torch_backend.batch_stats(x)
    close(mean, mean_t, **STATS_TOL)
    close(var, var_t, **STATS_TOL)
    w, b = params(shape[1])
    invstd = torch.rsqrt(var_t + EPS)
    for weight, bias in [(w, b), (None, None), (w, None), (None, b)]:
        y = tb.normalize(x, mean_t, invstd, weight, bias)
        close(y, torch_backend.normalize(x, mean_t, invstd, weight, bias), **TOL[torch.float32])


@pytest.mark.parametrize("shape,cl", CASES[1:3], ids=CASE_IDS[1:3])
def test_triton_backward_pieces_take_sums_and_count_from_a_larger_batch(shape, cl, path):
    """backward_reduce + backward_elemt with all-reduced sums and a global count (sync BN)."""
    x, dy = make(shape, cl), make(shape, cl)
    assert took(x, path)
    w, _ = params(shape[1])
    mean, var = torch_backend.batch_stats(x)
    invstd = torch.rsqrt(var + EPS)
    sums = tb.backward_reduce(dy, x, mean, invstd)
    sums64 = torch_backend.backward_reduce(*f64(dy, x, mean, invstd))
    for s, s64 in zip(sums, sums64):
        close(s, s64, rtol=1e-5, atol=1e-4)
    count = 3 * x.numel() // x.shape[1]
    sum_dy, sum_dy_xhat = 3 * sums64[0], 3 * sums64[1]  # two more replicas' sums
    dx = tb.backward_elemt(dy, x, mean, invstd, w, sum_dy.float(), sum_dy_xhat.float(), count)
    dx64 = torch_backend.backward_elemt(*f64(dy, x, mean, invstd, w, sum_dy, sum_dy_xhat), count)
    close(dx, dx64, **TOL[torch.float32])


@pytest.mark.parametrize("mask", [(True, True, True), (True, False, False), (False, True, True)])
def test_triton_backward_masks_and_eval_backward(mask, path):
    shape = (3, 7, 33)
    x, dy = make(shape), make(shape)
    assert took(x, path)
    w, _ = params(7)
    mean, var = torch_backend.batch_stats(x)
    invstd = torch.rsqrt(var + EPS)
    for ours, theirs in [(tb.backward, torch_backend.backward),
                         (tb.backward_eval, torch_backend.backward_eval)]:
        got = ours(dy, x, mean, invstd, w, mask)
        want = theirs(*f64(dy, x, mean, invstd, w), mask)
        for g, e, on in zip(got, want, mask):
            assert (g is None) == (not on)
            if on:
                close(g, e, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cl", [False, True])
def test_triton_half_inputs_keep_their_dtype_with_float32_statistics(dtype, cl, path):
    shape = (3, 9, 5)
    x, dy = make(shape, cl, dtype), make(shape, cl, dtype)
    assert took(x, path)
    w, b = params(9)
    y, mean, invstd = tb.forward_train(x, w, b, EPS)
    y64, mean64, invstd64 = torch_backend.forward_train(*f64(x, w, b), EPS)
    assert y.dtype == dtype and mean.dtype == torch.float32 and y.stride() == x.stride()
    close(mean, mean64, **STATS_TOL)
    close(invstd, invstd64, **STATS_TOL)
    close(y, y64, **TOL[dtype])
    dx, dw, db = tb.backward(dy, x, mean, invstd, w)
    dx64, dw64, db64 = torch_backend.backward(*f64(dy, x, mean64, invstd64, w))
    assert dx.dtype == dtype and dw.dtype == torch.float32
    close(dx, dx64, **TOL[dtype])
    close(dw, dw64, rtol=1e-5, atol=1e-4)
    close(db, db64, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("cl", [False, True])
def test_triton_statistics_survive_a_large_mean(cl, path):
    """mean 1e4, std 1 in float32: E[x^2] - E[x]^2 would lose every digit of the variance;
    Chan's merge of unshifted running means would lose about 4 (their rounding, ulp(1e4)
    ~ 1e-3, against differences of the order of std); around the channel's first value
    the variance keeps float32's precision."""
    x = make((3, 2, 65), cl, scale=1.0, shift=1e4)
    assert took(x, path)
    mean, var = tb.batch_stats(x)
    mean64, var64 = torch_backend.batch_stats(x.double())
    close(mean, mean64, rtol=1e-7, atol=0)
    close(var, var64, rtol=1e-6, atol=0)
    y, _, _ = tb.forward_train(x, None, None, EPS)
    close(y, torch_backend.forward_train(x.double(), None, None, EPS)[0], rtol=0, atol=2e-3)


ODD = (3, 11, 5, 7)  # 11 channels cross the interpreter's 8-channel blocks, 35 positions its 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_triton_every_op_on_both_paths(cl, dtype, path):
    """Every operation of the backend on an odd shape, against float64 math on the same
    (rounded) input: outputs at the dtype's tolerance, statistics and sums at float32's."""
    x, dy = make(ODD, cl, dtype), make(ODD, cl, dtype)
    assert took(x, path)
    w, b = params(ODD[1])
    tol, sum_tol = TOL[dtype], dict(rtol=1e-5, atol=1e-4)
    x64, dy64, w64, b64 = f64(x, dy, w, b)

    def agree(got, want, first_tol=tol):
        assert len(got) == len(want)
        for i, (g, e) in enumerate(zip(got, want)):
            close(g, e, **(first_tol if i == 0 else sum_tol))

    mean, var = tb.batch_stats(x)
    mean64, var64 = torch_backend.batch_stats(x64)
    agree((mean, var), (mean64, var64), STATS_TOL)
    y, mean, invstd = tb.forward_train(x, w, b, EPS)
    y64, _, invstd64 = torch_backend.forward_train(x64, w64, b64, EPS)
    assert y.dtype == dtype and y.stride() == x.stride()
    close(y, y64, **tol)
    close(mean, mean64, **STATS_TOL)
    close(invstd, invstd64, **STATS_TOL)
    for act, alpha in [("leaky_relu", 0.1), ("gelu", 0.0)]:
        z, _, _ = tb.forward_train_act(x, w, b, EPS, act, alpha)
        close(z, torch_backend.forward_train_act(x64, w64, b64, EPS, act, alpha)[0], **tol)
    agree(tb.backward(dy, x, mean, invstd, w),
          torch_backend.backward(dy64, x64, mean64, invstd64, w64))
    agree(tb.backward_eval(dy, x, mean, invstd, w),
          torch_backend.backward_eval(dy64, x64, mean64, invstd64, w64))
    agree(tb.backward_reduce(dy, x, mean, invstd),
          torch_backend.backward_reduce(dy64, x64, mean64, invstd64), sum_tol)
    z, mean_z, invstd_z = tb.forward_train_act(x, w, b, EPS, "elu", 1.3)
    for training in (True, False):
        got = tb.backward_act(dy, z, mean_z, invstd_z, w, b, "elu", 1.3, training)
        assert got[0].dtype == dtype and got[0].stride() == x.stride()
        agree(got, torch_backend.backward_act(*f64(dy, z, mean_z, invstd_z, w, b), "elu", 1.3,
                                              training))


class _Launches:
    """Stands in for the kernel module: records the name of every kernel the backend
    launches, and launches it."""

    def __init__(self, module):
        self.module, self.names = module, []

    def __getattr__(self, name):
        kernel, names = getattr(self.module, name), self.names

        class Launcher:
            def __getitem__(self, grid):
                names.append(name)
                return kernel[grid]

        return Launcher()


SPLIT_FWD = ["stats_partial_kernel", "stats_merge_kernel"]
SPLIT_BWD = ["grad_partial_kernel", "grad_merge_kernel"]
LAUNCHES = {  # op: (split path, whole-channel path)
    "batch_stats": (SPLIT_FWD, ["whole_stats_kernel"]),
    "forward_train": (SPLIT_FWD + ["normalize_kernel"], ["whole_stats_kernel"]),
    "forward_train_act": (SPLIT_FWD + ["normalize_kernel"], ["whole_stats_kernel"]),
    "backward_reduce": (SPLIT_BWD, ["whole_grad_kernel"]),
    "backward": (SPLIT_BWD + ["grad_elemt_kernel"], ["whole_grad_kernel"]),
    "backward_eval": (SPLIT_BWD + ["grad_elemt_kernel"], ["whole_grad_kernel"]),
    "backward_act": (SPLIT_BWD + ["grad_elemt_kernel"], ["whole_grad_kernel"]),
}


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_triton_the_whole_channel_path_is_one_launch_per_call(monkeypatch, cl, path):
    x, dy = make(ODD, cl), make(ODD, cl)
    w, b = params(ODD[1])
    mean, invstd = (t.float() for t in torch_backend.forward_train(x, w, b, EPS)[1:])
    calls = {
        "batch_stats": lambda: tb.batch_stats(x),
        "forward_train": lambda: tb.forward_train(x, w, b, EPS),
        "forward_train_act": lambda: tb.forward_train_act(x, w, b, EPS, "silu", 0.0),
        "backward_reduce": lambda: tb.backward_reduce(dy, x, mean, invstd),
        "backward": lambda: tb.backward(dy, x, mean, invstd, w),
        "backward_eval": lambda: tb.backward_eval(dy, x, mean, invstd, w),
        "backward_act": lambda: tb.backward_act(dy, x, mean, invstd, w, b, "elu", 1.0, True),
    }
    spy = _Launches(tb.kern)
    monkeypatch.setattr(tb, "kern", spy)
    for op, call in calls.items():
        spy.names.clear()
        call()
        assert spy.names == LAUNCHES[op][path == "whole"], op
    spy.names.clear()  # only dx, or only the sums: the same kernels on both paths
    tb.backward_eval(dy, x, mean, invstd, w, (True, False, False))
    tb.backward(dy, x, mean, invstd, w, (False, True, True))
    assert spy.names == ["grad_elemt_kernel"] + LAUNCHES["backward_reduce"][path == "whole"]


def test_triton_path_choice_follows_the_tuning():
    """Whole channel for small channels whatever the grid, up to ``whole_large`` elements
    with at least ``whole_fill`` programs per SM; split above (GPU tuning, 132 SMs)."""
    t, sms = dataclasses.replace(tb.GPU_TUNING, path="auto"), 132

    def plan(shape, cl=False, tuning=t):
        x = make_meta(shape, cl)
        return tb._plan(x.shape, x.stride(), tuning, sms)

    few, enough = sms // 2, int(t.whole_fill * sms)
    assert plan((1, few, t.whole_small)).whole
    assert not plan((1, few, t.whole_small + 1)).whole
    assert plan((1, enough, t.whole_large)).whole
    assert not plan((1, enough, t.whole_large + 1)).whole
    assert not plan((1, enough, 2), tuning=dataclasses.replace(t, path="split")).whole
    assert plan((1, few, t.whole_large + 1), tuning=dataclasses.replace(t, path="whole")).whole
    # channels last: blocks as narrow as it takes for ``enough`` programs, not narrower
    wide = plan((1, t.max_cols_cl * enough, 3), cl=True)
    assert wide.whole and wide.reduction.block_k == t.max_cols_cl
    assert wide.reduction.channel_blocks == enough
    narrow = plan((1, 64, 3), cl=True)
    assert narrow.whole and narrow.reduction.block_k == t.whole_min_cols_cl
    assert not plan((1, 64, t.whole_small // t.whole_min_cols_cl + 1), cl=True).whole


def make_meta(shape, channels_last):
    x = torch.empty(shape, device="meta")
    return x.movedim(1, -1).contiguous().movedim(-1, 1) if channels_last else x


def test_triton_path_forced_by_the_environment(monkeypatch):
    for path in tb.PATHS:
        monkeypatch.setenv("BATCHNORM_TRITON_PATH", path)
        assert tb._forced_path() == path
    monkeypatch.setenv("BATCHNORM_TRITON_PATH", "fast")
    with pytest.raises(ValueError, match="expected one of auto, split, whole, got 'fast'"):
        tb._forced_path()


def test_triton_dy_in_another_layout_than_x(path):
    x = make((2, 5, 3, 3), channels_last=True)
    dy = make((2, 5, 3, 3))
    assert took(x, path)
    mean, var = torch_backend.batch_stats(x)
    invstd = torch.rsqrt(var + EPS)
    dx, dw, db = tb.backward(dy, x, mean, invstd, None)
    want = torch_backend.backward(*f64(dy, x, mean, invstd), None)
    assert dx.stride() == x.stride()
    for g, e in zip((dx, dw, db), want):
        close(g, e, rtol=1e-5, atol=1e-4)


ACTS = [("identity", 0.0), ("relu", 0.0), ("leaky_relu", 0.1), ("elu", 1.3), ("silu", 0.0),
        ("gelu", 0.0)]


@pytest.mark.parametrize("act,alpha", ACTS, ids=[a for a, _ in ACTS])
def test_triton_forward_with_activation_matches_float64(act, alpha, path):
    x = make((2, 7, 33), channels_last=act in ("elu", "gelu"))
    assert took(x, path)
    w, b = params(7)
    z, mean, invstd = tb.forward_train_act(x, w, b, EPS, act, alpha)
    z64, mean64, invstd64 = torch_backend.forward_train_act(*f64(x, w, b), EPS, act, alpha)
    close(z, z64, **TOL[torch.float32])
    z_eval = tb.forward_eval_act(x, mean64.float(), invstd64.float(), w, b, act, alpha)
    close(z_eval, torch_backend.forward_eval_act(*f64(x, mean64, invstd64, w, b), act, alpha),
          **TOL[torch.float32])


INVERTIBLE = [("identity", 0.0), ("leaky_relu", 0.1), ("elu", 1.3)]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("act,alpha", INVERTIBLE, ids=[a for a, _ in INVERTIBLE])
def test_triton_backward_with_activation_from_the_output(act, alpha, training, path):
    cl = act == "leaky_relu"
    x, dz = make((3, 9, 5), cl), make((3, 9, 5), cl)
    assert took(x, path)
    w, b = params(9)
    z, mean, invstd = tb.forward_train_act(x, w, b, EPS, act, alpha)
    got = tb.backward_act(dz, z, mean, invstd, w, b, act, alpha, training)
    want = torch_backend.backward_act(*f64(dz, z, mean, invstd, w, b), act, alpha, training)
    assert got[0].stride() == z.stride()
    for g, e in zip(got, want):
        close(g, e, rtol=1e-5, atol=1e-4)
    # without weight and bias
    got = tb.backward_act(dz, z, mean, invstd, None, None, act, alpha, training)
    want = torch_backend.backward_act(*f64(dz, z, mean, invstd), None, None, act, alpha, training)
    for g, e in zip(got, want):
        close(g, e, rtol=1e-5, atol=1e-4)


def test_triton_backward_with_activation_equals_autograd_in_float64(path):
    """The from-output backward gives the true gradient of act(BN(x)) (training mode)."""
    x, dz = make((2, 3, 17)), make((2, 3, 17))
    assert took(x, path)
    w, b = params(3)
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, w, b))
    out = activations.apply(torch.nn.functional.batch_norm(
        x64, None, None, w64, b64, training=True, eps=EPS), "elu", 1.3)
    out.backward(dz.double())
    z, mean, invstd = tb.forward_train_act(x, w, b, EPS, "elu", 1.3)
    dx, dw, db = tb.backward_act(dz, z, mean, invstd, w, b, "elu", 1.3, True)
    close(dx, x64.grad, rtol=1e-4, atol=1e-4)
    close(dw, w64.grad, rtol=1e-4, atol=1e-4)
    close(db, b64.grad, rtol=1e-4, atol=1e-4)


def test_triton_activation_errors_are_clear():
    x = make((2, 3, 5))
    z, mean, invstd = tb.forward_train_act(x, None, None, EPS, "relu", 0.0)
    with pytest.raises(ValueError, match="not invertible"):
        tb.backward_act(x, z, mean, invstd, None, None, "relu", 0.0, True)
    with pytest.raises(ValueError, match="unknown activation"):
        tb.forward_train_act(x, None, None, EPS, "tanh", 0.0)


@pytest.mark.parametrize("path", ["split", "whole"])
@pytest.mark.parametrize("cl", [False, True])
def test_triton_gpu_block_sizes_under_the_interpreter(monkeypatch, cl, path):
    """The GPU's block sizes (512 spatial positions, 128 channels per block; on the
    whole-channel path with 16 SMs, 16 channels per block) on shapes that cross them,
    split over several programs."""
    gpu = dataclasses.replace(tb.GPU_TUNING, path=path)
    monkeypatch.setattr(tb, "_tuning", lambda device: gpu)
    monkeypatch.setattr(tb, "_sm_count", lambda device: 16)
    shape = (9, 130, 2, 3) if cl else (3, 2, 1100)
    x, dy = make(shape, cl), make(shape, cl)
    plan = tb._planned(x)[0]
    assert plan.whole == (path == "whole")
    assert plan.reduction.block_k == (16 if cl and path == "whole" else 128 if cl else 512)
    w, b = params(shape[1])
    y, mean, invstd = tb.forward_train(x, w, b, EPS)
    y64, mean64, invstd64 = torch_backend.forward_train(*f64(x, w, b), EPS)
    close(mean, mean64, **STATS_TOL)
    close(y, y64, **TOL[torch.float32])
    dx, dw, db = tb.backward(dy, x, mean, invstd, w)
    dx64, dw64, db64 = torch_backend.backward(*f64(dy, x, mean64, invstd64, w))
    close(dx, dx64, **TOL[torch.float32])
    close(dw, dw64, rtol=1e-5, atol=1e-4)


def test_triton_dispatcher_selects_the_backend_for_supported_tensors():
    x = make((2, 3, 5))
    with kernels.use_backend("triton"):
        assert kernels.pick("forward_train", x).name == "triton"
        assert kernels.pick("forward_train", x.double()) is torch_backend


def test_triton_missing_means_the_backend_is_absent(monkeypatch):
    """Without the optional ``triton`` package the module does not import and the
    dispatcher falls back to the pure-torch backend."""
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` fail
    for mod in ("batchnorm.kernels.triton.backend", "batchnorm.kernels.triton._kernels"):
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setattr(kernels, "_loaded", {"torch": torch_backend})
    monkeypatch.setattr(kernels, "_candidates", {})  # the dispatcher's per-op cache
    with pytest.raises(ImportError):
        importlib.import_module("batchnorm.kernels.triton.backend")
    assert kernels.load("triton") is None
    with kernels.use_backend("triton"):
        assert kernels.pick("forward_train", make((2, 3, 5))) is torch_backend


@pytest.mark.parametrize("cl", [False, True])
def test_triton_bench_pairs_agree_with_native_on_cpu(cl):
    """The GPU benchmark times ours against native: the pairs compute the same thing."""
    from batchnorm import bench_gpu

    x, dy = make((2, 5, 3, 4), cl), make((2, 5, 3, 4), cl)
    w, b = params(5)
    for op in bench_gpu.OPS:
        ours, native = bench_gpu.op_pair(op.name, x, w, b, dy)
        close(ours(), native(), rtol=1e-5, atol=1e-5)


# Compiled for an H100 (sm_90) without a GPU: the interpreter accepts code that the
# compiler rejects (e.g. a non-constexpr global). One variant per kernel and feature.
_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource
from batchnorm.kernels.triton import _kernels as k

FLOATS = ("alpha", "eps", "inv_count")
VARIANTS = [
    ("stats_partial_kernel", "bf16", dict(CL=False, BLOCK_R=8, BLOCK_K=512)),
    ("stats_partial_kernel", "fp32", dict(CL=True, BLOCK_R=32, BLOCK_K=128)),
    ("stats_merge_kernel", "fp32", dict(BLOCK_C=64, BLOCK_P=64)),
    ("normalize_kernel", "fp16", dict(HAS_W=True, HAS_B=True, ACT=5, CL=False, BLOCK_R=8, BLOCK_K=512)),
    ("normalize_kernel", "bf16", dict(HAS_W=False, HAS_B=False, ACT=3, CL=True, BLOCK_R=32, BLOCK_K=128)),
    ("normalize_kernel", "fp32", dict(HAS_W=True, HAS_B=False, ACT=4, CL=True, BLOCK_R=32, BLOCK_K=128)),
    ("grad_partial_kernel", "bf16", dict(FROM_OUTPUT=True, HAS_CENTER=True, ACT=3, CL=False, BLOCK_R=8, BLOCK_K=512)),
    ("grad_partial_kernel", "fp32", dict(FROM_OUTPUT=False, HAS_CENTER=True, ACT=0, CL=True, BLOCK_R=32, BLOCK_K=128)),
    ("grad_merge_kernel", "fp32", dict(SCALE_MODE=2, BLOCK_C=64, BLOCK_P=64)),
    ("grad_elemt_kernel", "fp16", dict(TRAINING=True, FROM_OUTPUT=True, HAS_W=True, HAS_CENTER=True, ACT=2, CL=True, BLOCK_R=32, BLOCK_K=128)),
    ("grad_elemt_kernel", "bf16", dict(TRAINING=True, FROM_OUTPUT=False, HAS_W=False, HAS_CENTER=True, ACT=0, CL=False, BLOCK_R=8, BLOCK_K=512)),
    ("grad_elemt_kernel", "fp32", dict(TRAINING=False, FROM_OUTPUT=False, HAS_W=True, HAS_CENTER=False, ACT=0, CL=False, BLOCK_R=8, BLOCK_K=512)),
    ("grad_elemt_kernel", "bf16", dict(TRAINING=False, FROM_OUTPUT=True, HAS_W=True, HAS_CENTER=True, ACT=5, CL=True, BLOCK_R=32, BLOCK_K=128)),
    ("grad_merge_kernel", "fp32", dict(SCALE_MODE=0, BLOCK_C=64, BLOCK_P=64)),
    ("grad_partial_kernel", "fp16", dict(FROM_OUTPUT=True, HAS_CENTER=False, ACT=2, CL=True, BLOCK_R=32, BLOCK_K=128)),
    ("whole_stats_kernel", "bf16", dict(NORMALIZE=True, HAS_W=True, HAS_B=True, ACT=2, CL=False, BLOCK_R=8, BLOCK_K=512)),
    ("whole_stats_kernel", "fp32", dict(NORMALIZE=True, HAS_W=False, HAS_B=True, ACT=4, CL=True, BLOCK_R=256, BLOCK_K=16)),
    ("whole_stats_kernel", "fp16", dict(NORMALIZE=True, HAS_W=True, HAS_B=False, ACT=5, CL=False, BLOCK_R=64, BLOCK_K=64)),
    ("whole_stats_kernel", "fp16", dict(NORMALIZE=False, HAS_W=False, HAS_B=False, ACT=0, CL=True, BLOCK_R=32, BLOCK_K=128)),
    ("whole_stats_kernel", "fp32", dict(NORMALIZE=False, HAS_W=False, HAS_B=False, ACT=0, CL=False, BLOCK_R=16, BLOCK_K=256)),
    ("whole_grad_kernel", "bf16", dict(DX=True, TRAINING=True, SCALE_MODE=1, FROM_OUTPUT=False, HAS_W=True, HAS_CENTER=True, ACT=0, CL=False, BLOCK_R=8, BLOCK_K=512)),
    ("whole_grad_kernel", "fp32", dict(DX=True, TRAINING=True, SCALE_MODE=1, FROM_OUTPUT=False, HAS_W=False, HAS_CENTER=True, ACT=0, CL=True, BLOCK_R=256, BLOCK_K=16)),
    ("whole_grad_kernel", "fp16", dict(DX=True, TRAINING=True, SCALE_MODE=2, FROM_OUTPUT=True, HAS_W=True, HAS_CENTER=True, ACT=5, CL=True, BLOCK_R=256, BLOCK_K=16)),
    ("whole_grad_kernel", "bf16", dict(DX=True, TRAINING=False, SCALE_MODE=0, FROM_OUTPUT=True, HAS_W=False, HAS_CENTER=False, ACT=2, CL=False, BLOCK_R=64, BLOCK_K=64)),
    ("whole_grad_kernel", "fp32", dict(DX=True, TRAINING=False, SCALE_MODE=1, FROM_OUTPUT=False, HAS_W=True, HAS_CENTER=True, ACT=0, CL=True, BLOCK_R=32, BLOCK_K=128)),
    ("whole_grad_kernel", "bf16", dict(DX=False, TRAINING=False, SCALE_MODE=1, FROM_OUTPUT=False, HAS_W=False, HAS_CENTER=True, ACT=0, CL=False, BLOCK_R=16, BLOCK_K=256)),
    ("running_update_kernel", "bf16", dict(CUMULATIVE=True, HAS_NBT=True, BLOCK=1024)),
    ("running_update_kernel", "fp32", dict(CUMULATIVE=False, HAS_NBT=True, BLOCK=64)),
    ("running_update_kernel", "fp16", dict(CUMULATIVE=False, HAS_NBT=False, BLOCK=1024)),
]
# running_update_kernel: buffers (rm, rv) of the variant's dtype, float32 statistics, the
# int64 count, the bool verdict, float64 bits as int64
TYPES = dict(mean_ptr="*fp32", invstd_ptr="*fp32", nbt_ptr="*i64", ok_ptr="*i1",
             eps_bits="i64", correction_bits="i64", momentum="fp32")
for name, dtype, const in VARIANTS:
    fn = getattr(k, name)
    sig = {}
    for arg in fn.arg_names:
        if arg in const:
            sig[arg] = "constexpr"
        elif name == "running_update_kernel" and arg in TYPES:
            sig[arg] = TYPES[arg]
        elif name == "running_update_kernel" and arg in ("rm_ptr", "rv_ptr"):
            sig[arg] = "*" + dtype
        elif arg.endswith(("_ptr", "_out")):
            sig[arg] = "*" + (dtype if arg in ("x_ptr", "y_ptr", "g_ptr", "v_ptr", "dx_ptr") else "fp32")
        else:
            sig[arg] = "fp32" if arg in FLOATS else "i32"
    triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
print("compiled", len(VARIANTS))
"""


def test_triton_kernels_compile_for_an_h100():
    import subprocess

    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_triton_backend_behind_the_module_matches_torch_nn():
    """BatchNorm2d with the Triton backend forced: the same outputs, gradients and running
    statistics as torch.nn.BatchNorm2d (training step, then eval)."""
    import batchnorm

    x = make((3, 5, 4, 3), channels_last=True)
    dy = make((3, 5, 4, 3), channels_last=True)
    ours, theirs = batchnorm.BatchNorm2d(5), torch.nn.BatchNorm2d(5)
    with torch.no_grad():
        for m in (ours, theirs):
            m.weight.copy_(torch.linspace(0.5, 1.5, 5))
            m.bias.copy_(torch.linspace(-1, 1, 5))
    xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    with kernels.use_backend("triton"):
        assert kernels.pick("forward_train", x).name == "triton"
        yo = ours(xo)
        yo.backward(dy)
        ours.eval()
        eval_o = ours(x)
    yt = theirs(xt)
    yt.backward(dy)
    theirs.eval()
    close(yo, yt, rtol=1e-5, atol=1e-5)
    close(xo.grad, xt.grad, rtol=1e-5, atol=1e-5)
    close(ours.weight.grad, theirs.weight.grad, rtol=1e-5, atol=1e-4)
    close(ours.bias.grad, theirs.bias.grad, rtol=1e-5, atol=1e-4)
    close(ours.running_mean, theirs.running_mean, rtol=1e-5, atol=1e-6)
    close(ours.running_var, theirs.running_var, rtol=1e-5, atol=1e-6)
    close(eval_o, theirs(x), rtol=1e-5, atol=1e-5)


def _kink_case(n=64):
    """One channel, weight 1, bias 0, values symmetric about 0 with one exactly at the
    mean: its normalised value is exactly 0, leaky ReLU's kink."""
    half = torch.arange(1, n // 2 + 1) * 0.125  # exact sums: the mean is exactly 0
    x = torch.cat([half, -half, torch.zeros(1)]).reshape(-1, 1, 1, 1)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    dy[-1] = 2.0  # the kink element's gradient: a slope difference there moves the sums
    return x, torch.ones(1), torch.zeros(1), dy


def test_the_bench_check_explains_the_leaky_relu_kink_channel_wide():
    """Both sides take torch's slope (alpha) at exactly 0, so the kink element itself
    agrees. An element put on the other side of the kink (as a rounding to the other sign
    does; the GPU run's disagreement) changes its channel's two sums, so it moves every dx
    of the channel by weight * invstd / m * (1 - alpha) * dy_k * (1 + x_hat_i x_hat_k), not
    only its own: the check leaves the flipped element out, allows exactly that shift
    elsewhere (the measured difference equals it), and still fails a difference beyond
    it; nothing is left out of the other operations."""
    from batchnorm import bench_gpu

    x, w, b, dy = _kink_case()
    k = x.shape[0] - 1
    ours, native = (f() for f in bench_gpu.op_pair("train fwd+bwd leaky_relu", x, w, b, dy))
    limit = bench_gpu.TOL[torch.float32] * (1 + native.abs().max().item())
    left_out, _ = bench_gpu.kink("train fwd+bwd leaky_relu", x, w, b, dy)
    assert not left_out.any() and (ours - native).abs().max() <= limit
    # native with element k on the other side: its slope 1 instead of alpha
    xg = x.clone().requires_grad_()
    y = F.batch_norm(xg, None, None, w, b, True, 0.1, bench_gpu.EPS)
    slope = torch.where(y > 0, 1.0, bench_gpu.LEAKY_ALPHA)
    slope[k] = 1.0
    (flipped_native,) = torch.autograd.grad(y, xg, dy * slope)
    flipped = torch.zeros_like(x, dtype=torch.bool)
    flipped[k] = True
    allowance = bench_gpu.kink_allowance(flipped, x, w, dy)
    diff = (ours - flipped_native).abs()[~flipped]
    assert diff.max() > 10 * limit  # the shift of the whole channel, not a rounding
    close(diff, allowance[~flipped], rtol=1e-4, atol=1e-6)  # the formula is the shift
    check = bench_gpu.agreement("train fwd+bwd leaky_relu", x, w, b, dy, ours,
                                flipped_native, flipped=flipped)
    assert check["agrees"] and check["kink_elements"] == 1
    wrong = ours.clone()
    wrong[0] += torch.sign(ours[0] - flipped_native[0]) * 2 * limit  # beyond the shift
    assert not bench_gpu.agreement("train fwd+bwd leaky_relu", x, w, b, dy, wrong,
                                   flipped_native, flipped=flipped)["agrees"]
    for op in bench_gpu.OP_NAMES:
        if op != "train fwd+bwd leaky_relu":
            assert bench_gpu.kink(op, x, w, b, dy) is None


# --- the fused running update (what CUDA buffers get: one launch, no host read) -------


def _batch(C, bad=None):
    """A batch's (mean, invstd) of C channels; ``bad`` makes channels 2 and 9 (or 9) non-finite."""
    gen = torch.Generator().manual_seed(1)
    mean, var = torch.randn(C, generator=gen), torch.rand(C, generator=gen) + 0.5
    invstd = torch.rsqrt(var + EPS)
    if bad == "nan mean":
        mean[[2, 9]] = float("nan")
    elif bad == "inf mean":
        mean[9] = float("-inf")
    elif bad == "inf var":
        invstd[9] = 0.0
    elif bad == "nan var":
        invstd[[2, 9]] = float("nan")
    return mean, invstd


def _update(backend, start, mean, invstd, count, momentum):
    """``stats.update_on_device`` with ``backend`` chosen, on copies of ``start``; returns
    the buffers and the messages of the guard's warnings (not the interpreter's numpy
    ones: 1 / 0)."""
    import warnings

    from batchnorm.core import stats

    rm, rv, nbt = (t.clone() for t in start)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with kernels.use_backend(backend):
            assert (kernels.updater(rm) is tb) == (backend == "triton")
            stats.update_on_device(rm, rv, mean, None, count, momentum, nbt, invstd=invstd,
                                   eps=EPS)
        stats.report_pending(wait=True)
    return (rm, rv, nbt), [str(w.message) for w in caught if "not finite" in str(w.message)]


# One rounding of the statistics and of the result to the buffers' dtype either way
# (statistics and buffers of order 1: half-type atol one step at 1); the interpreter's
# float32 -> bfloat16 conversion truncates where ATen rounds (one more bfloat16 step);
# float32: ATen's CPU lerp_ is an FMA, the interpreter's is not (one ulp apart).
UPDATE_TOL = {
    torch.float32: dict(rtol=2.5e-7, atol=1e-7),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=8e-3, atol=8e-3),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("momentum", [0.1, 1.0, None])
@pytest.mark.parametrize("count", [24, 1])
def test_fused_running_update_matches_the_torch_ops_and_float64(dtype, momentum, count):
    """Triton's ``update_running`` (one program looping over 11 channels in blocks of 4)
    leaves the buffers and count that ``update_on_device``'s torch operations leave, and
    the float64 formula's: mean and unbiased variance ``var * count / (count - 1)`` (count
    1: the variance itself) blended with ``momentum`` or 1 / num_batches_tracked."""
    from batchnorm.core import reference

    C = 11
    mean, invstd = _batch(C)
    gen = torch.Generator().manual_seed(2)
    start = (torch.randn(C, generator=gen).to(dtype),
             (torch.rand(C, generator=gen) + 1.0).to(dtype), torch.tensor(3))
    fused, fused_warnings = _update("triton", start, mean, invstd, count, momentum)
    torch_ops, _ = _update("torch", start, mean, invstd, count, momentum)
    assert fused_warnings == [] and int(fused[2]) == int(torch_ops[2]) == 4
    for a, b in zip(fused[:2], torch_ops[:2]):
        assert a.dtype == dtype
        close(a, b, **UPDATE_TOL[dtype])
    var64 = invstd.double().pow(-2) - EPS
    rm64, rv64 = (t.double().numpy() for t in start[:2])
    if count > 1:
        want = reference.update_running(rm64, rv64, mean.double().numpy(), var64.numpy(),
                                        count, momentum, 4)
    else:
        f = 0.25 if momentum is None else momentum
        want = (rm64 + f * (mean.double().numpy() - rm64), rv64 + f * (var64.numpy() - rv64))
    for a, b in zip(fused[:2], want):
        close(a, torch.from_numpy(b), **{k: 2 * v for k, v in UPDATE_TOL[dtype].items()})


@pytest.mark.parametrize("bad,channels", [("nan mean", [2, 9]), ("inf mean", [9]),
                                          ("inf var", [9]), ("nan var", [2, 9])])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_fused_running_update_writes_nothing_for_a_non_finite_batch(bad, channels, momentum):
    """One non-finite statistic (in any block of channels) leaves every buffer and the
    count as they were, and the warning of ``report_pending`` names the channels, as with
    the torch operations; the kernel's verdict is a device tensor (False)."""
    C = 11
    mean, invstd = _batch(C, bad)
    start = (torch.randn(C), torch.rand(C) + 1.0, torch.tensor(3))
    fused, fused_warnings = _update("triton", start, mean, invstd, 24, momentum)
    _, torch_warnings = _update("torch", start, mean, invstd, 24, momentum)
    for a, b in zip(fused, start):
        assert torch.equal(a, b)
    assert len(fused_warnings) == 1 and f"channel(s) {channels}" in fused_warnings[0]
    assert fused_warnings == torch_warnings
    rm, rv, nbt = (t.clone() for t in start)
    verdict = tb.update_running(rm, rv, mean, invstd, EPS, 24 / 23, momentum, nbt)
    assert verdict.dtype == torch.bool and verdict.dim() == 0 and not bool(verdict)


def test_fused_running_update_declines_what_it_cannot_write():
    """None (the caller's torch operations run) for buffers or statistics the kernel does
    not take; a clear error for the cumulative average without a count."""
    mean, invstd = _batch(5)
    rm, rv = torch.zeros(5), torch.ones(5)
    assert tb.update_running(rm.double(), rv.double(), mean, invstd, EPS, 1.0, 0.1) is None
    assert tb.update_running(rm, rv.half(), mean, invstd, EPS, 1.0, 0.1) is None
    assert tb.update_running(rm, rv, mean.double(), invstd.double(), EPS, 1.0, 0.1) is None
    assert tb.update_running(torch.zeros(10)[::2], rv, mean, invstd, EPS, 1.0, 0.1) is None
    assert tb.update_running(rm.requires_grad_(), rv, mean, invstd, EPS, 1.0, 0.1) is None
    assert tb.update_running(rm.detach(), rv, mean[:4], invstd[:4], EPS, 1.0, 0.1) is None
    with pytest.raises(ValueError, match="needs num_batches_tracked"):
        tb.update_running(rm.detach(), rv, mean, invstd, EPS, 1.0, None)
    verdict = tb.update_running(rm.detach(), rv, mean, invstd, EPS, 1.0, 0.1)  # no count
    assert bool(verdict)


def _host_ops(monkeypatch, step):
    """(Triton launches, top-level ATen ops outside them) of ``step()`` (its second run,
    under torch.profiler; each launch is marked, as the interpreter's own torch calls
    are no part of what a GPU runs)."""
    import collections

    from torch.profiler import ProfilerActivity, profile, record_function

    class Marked:
        def __init__(self, module):
            self.module = module

        def __getattr__(self, name):
            kernel = getattr(self.module, name)

            class Launcher:
                def __getitem__(self, grid):
                    def launch(*args, **kwargs):
                        with record_function("triton launch"):
                            return kernel[grid](*args, **kwargs)
                    return launch
            return Launcher()

    monkeypatch.setattr(tb, "kern", Marked(tb.kern))
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    launches, ops = 0, collections.Counter()
    for event in prof.events():
        above, parent = [], event.cpu_parent
        while parent is not None:
            above.append(parent.name)
            parent = parent.cpu_parent
        if "triton launch" in above:
            continue
        if event.name == "triton launch":
            launches += 1
        elif event.name.startswith("aten::") and not any(a.startswith("aten::") for a in above):
            ops[event.name] += 1
    return launches, ops


@pytest.mark.parametrize("act", [None, "leaky_relu"])
def test_a_training_call_on_the_triton_route_is_a_few_launches(monkeypatch, act):
    """The host cost of a layer's training forward + backward on the Triton route
    (whole-channel path): 3 Triton launches (forward, the running update, backward) and
    at most 12 ATen operations around them for BatchNorm2d (8 allocations, the verdict's
    host read, which CUDA buffers replace by a pinned copy, the two gradient
    accumulations, one detach), 5 more for BatchNormAct2d (the effective weight). Before
    the fused update (2026-12-04): 2 launches and 29 / 34 ATen operations (the update as
    14 torch operations; zero gradients made for mean and invstd; dtype casts)."""
    import batchnorm

    forced = dataclasses.replace(tb.INTERPRETER_TUNING, path="whole")
    monkeypatch.setattr(tb, "_tuning", lambda device: forced)
    C = 8
    layer = (batchnorm.BatchNorm2d(C) if act is None
             else batchnorm.BatchNormAct2d(C, act=act, alpha=0.01))
    x = make((4, C, 5, 5)).requires_grad_()
    dy = make((4, C, 5, 5))

    def step():
        x.grad = None
        layer(x).backward(dy)

    with kernels.use_backend("triton"):
        launches, ops = _host_ops(monkeypatch, step)
    assert launches == 3, ops
    assert sum(ops.values()) <= (12 if act is None else 17), ops
    assert int(layer.num_batches_tracked) == 2


@pytest.mark.parametrize("momentum", [0.1, None])
def test_the_device_update_is_one_launch(monkeypatch, momentum):
    """``stats.update_on_device`` with the Triton backend: one launch, an allocation (the
    verdict) and the host read of the previous verdict (on CUDA also the pinned copy of
    the verdict); with torch operations it was 20 / 27 operations (14 / 19 kernel
    launches on a GPU)."""
    from batchnorm.core import stats

    mean, invstd = _batch(8)
    rm, rv, nbt = torch.zeros(8), torch.ones(8), torch.tensor(0)
    with kernels.use_backend("triton"):
        launches, ops = _host_ops(monkeypatch, lambda: stats.update_on_device(
            rm, rv, mean, None, 100, momentum, nbt, invstd=invstd, eps=EPS))
    stats.report_pending()
    assert launches == 1 and int(nbt) == 2
    assert sum(ops.values()) <= 2, ops
