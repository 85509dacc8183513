"""batchnorm on a CUDA GPU: every layer kind and the Triton kernels against the float64
reference (``batchnorm.reference``, or the same layer in float64 on CPU) and torch.nn.

Skipped, with the reason, where ``torch.cuda.is_available()`` is False. The GPU check
``benchmarks/gpu/run.sh`` runs this file on the GPU machine. Its dry run on CPU sets
``BATCHNORM_CUDA_TESTS_ON_CPU=1`` and ``TRITON_INTERPRET=1``: the same tests then run on
CPU tensors with the Triton backend forced, in Triton's interpreter, at the interpreter's
tiny block sizes: smaller shapes (which still cross its block edges) and float32 and
bfloat16 only (``on_gpu(gpu_values, cpu_values)`` picks the list), as the interpreter runs
each program of a kernel in Python.

What is compared, and the tolerances (``torch.testing.assert_close``, |a - b| <= atol +
rtol * |b|), always against float64 math applied to the very same (rounded) input:

* outputs and input gradients, stored in the input's dtype: float32 rtol = atol = 1e-4
  (float32 arithmetic over up to millions of values); float16 rtol 2e-3, atol 4e-3
  (about four float16 rounding steps, 2^-11 each); bfloat16 rtol 1.6e-2, atol 3e-2
  (about four bfloat16 steps, 2^-8 each);
* parameter gradients (float32 sums over the m values of a channel, whatever the input
  dtype): rtol 1e-4, atol 1e-4 * sqrt(m);
* batch statistics and running statistics (float32): rtol 2e-5, atol 1e-6;
* against torch.nn in the same dtype (both round): twice the output tolerance.

BN + activation layers in float16/bfloat16 get the dtype's output tolerance (atol *
sqrt(m)) for their parameter gradients instead of float32's: the memory-saving backward
reconstructs x_hat from the rounded output, and the input-saving one takes the
activation's derivative at the BN output rounded to the input's dtype (as torch.nn's
BN -> activation does).
"""

import copy
import dataclasses
import importlib
import math
import os
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
ON_CPU = not CUDA and os.environ.get("BATCHNORM_CUDA_TESTS_ON_CPU") == "1"
if not CUDA and not ON_CPU:
    pytest.skip(
        "no CUDA device (torch.cuda.is_available() is False): these tests need a GPU; "
        "benchmarks/gpu/run.sh runs them on the GPU machine, and "
        "BATCHNORM_CUDA_TESTS_ON_CPU=1 TRITON_INTERPRET=1 runs them on CPU in Triton's "
        "interpreter",
        allow_module_level=True,
    )
if ON_CPU and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError(
        "BATCHNORM_CUDA_TESTS_ON_CPU=1 runs the Triton kernels on CPU, which needs "
        "TRITON_INTERPRET=1 in the environment before Python starts; got TRITON_INTERPRET="
        f"{os.environ.get('TRITON_INTERPRET')!r}"
    )
pytest.importorskip("triton", reason="the Triton kernels need triton (pip install batchnorm[gpu])")

import batchnorm  # noqa: E402
from batchnorm import kernels, reference  # noqa: E402
from batchnorm.kernels import activations  # noqa: E402

tb = kernels.load("triton")  # the Triton backend module (None: it failed to import)
if tb is None:
    raise ImportError("batchnorm.kernels.load('triton') is None: triton imports but the "
                      "Triton backend does not; import it by hand to see why")

DEVICE = torch.device("cuda" if CUDA else "cpu")
EPS = 1e-5


def on_gpu(gpu_values, cpu_values):
    """The parameters on the GPU, or the interpreter's smaller set on CPU (dry run)."""
    return gpu_values if CUDA else cpu_values


DTYPES = on_gpu([torch.float32, torch.bfloat16, torch.float16], [torch.float32, torch.bfloat16])
DTYPE_IDS = ["f32", "bf16", "f16"][: len(DTYPES)]
TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=2e-3, atol=4e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=3e-2),
}
STATS_TOL = dict(rtol=2e-5, atol=1e-6)

# (N, C, H, W): C = 3 at 7x7, odd C and spatial sizes, N = 1 in training (49 values per
# channel), a C above the channels-last block (128 on the GPU, 8 in the interpreter), a
# spatial size above the NCHW block (512 on the GPU, 16 in the interpreter), and on the GPU
# ResNet-50-like sizes (many blocks, reductions split over many programs per channel).
SHAPES = on_gpu(
    [(4, 3, 7, 7), (2, 7, 5, 3), (1, 3, 7, 7), (8, 64, 14, 14), (3, 130, 3, 3), (2, 5, 33, 35),
     (32, 64, 56, 56), (16, 2048, 7, 7), (64, 3, 129, 129)],
    [(4, 3, 7, 7), (1, 3, 7, 7), (2, 9, 3, 2)],
)
LAYOUTS = ["nchw", "channels_last"]


@pytest.fixture(scope="module", autouse=True)
def _triton_built_for_this_device():
    """On CUDA, the kernels compiled for the GPU: tests/test_kernels_triton.py rebuilds the
    shared backend module for the interpreter when it is imported (collected) in the same
    pytest process; rebuild it for the GPU for this module and back afterwards."""
    if not CUDA or not tb.INTERPRETED:
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TRITON_INTERPRET", raising=False)
        importlib.reload(tb.kern)
        importlib.reload(tb)
        yield
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        importlib.reload(tb.kern)
        importlib.reload(tb)


@pytest.fixture(autouse=True)
def _within_the_gpu_checks_budget():
    """benchmarks/gpu/run.sh gives this file a time limit: the tests not yet started when
    BATCHNORM_TEST_DEADLINE (seconds since the epoch) has passed are skipped, saying so,
    so that pytest still ends and writes its report within the limit."""
    deadline = os.environ.get("BATCHNORM_TEST_DEADLINE")
    if deadline and time.time() > float(deadline):
        pytest.skip("not run: the GPU check's time limit for the tests was reached "
                    "(BATCHNORM_TEST_DEADLINE)")
    yield


@pytest.fixture(autouse=True)
def _backend():
    """On CUDA the default ("auto") backend, which users get; on CPU the Triton one forced."""
    if CUDA:
        yield
    else:
        with kernels.use_backend("triton"):
            yield


# --- helpers -----------------------------------------------------------------------


def fmt(layout: str, dim: int):
    if layout == "nchw":
        return torch.contiguous_format
    return {4: torch.channels_last, 5: torch.channels_last_3d}[dim]


def make(shape, layout="nchw", dtype=torch.float32, scale=2.0, shift=0.5):
    """A random input on DEVICE in the dtype and memory layout asked for."""
    x = torch.randn(shape, device=DEVICE) * scale + shift
    if len(shape) in (4, 5):
        x = x.contiguous(memory_format=fmt(layout, len(shape)))
    return x.to(dtype)


def params(C):
    w = torch.rand(C, device=DEVICE) + 0.5
    b = torch.randn(C, device=DEVICE) * 0.3
    return w, b


def np64(t):
    return None if t is None else t.detach().double().cpu().numpy()


def close(actual, expected, **tol):
    if isinstance(expected, torch.Tensor):
        expected = expected.detach().double().cpu()
    else:
        expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual.detach().double().cpu(), expected, **tol)


def close_sums(actual, expected, m, tol=None):
    """Per-channel sums over m values: float32 accumulation (or ``tol``), atol * sqrt(m)."""
    tol = tol or dict(rtol=1e-4, atol=1e-4)
    close(actual, expected, rtol=tol["rtol"], atol=tol["atol"] * math.sqrt(m))


def aten_sums_tol(x):
    """The tolerance of parameter-gradient sums for a plain BN call on x: half input on
    ATen's route (``auto`` on CUDA) has torch.nn's own numbers, held to the dtype's
    tolerance (an H200 measured torch.nn's NCHW bfloat16 weight gradient 0.4% of the
    largest off float64); otherwise float32 accumulation (None)."""
    aten = kernels.pick("forward_train", x).name == "native"
    return TOL[x.dtype] if aten and x.dtype != torch.float32 else None


def set_affine(layer, C):
    w, b = params(C)
    with torch.no_grad():
        if getattr(layer, "weight", None) is not None:
            layer.weight.copy_(w)
        if getattr(layer, "bias", None) is not None:
            layer.bias.copy_(b)
    return layer


def shape_id(s):
    return "x".join(map(str, s))


# --- the backend in use -------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_layers_run_on_the_device_kernels(dtype, layout):
    """Every kernel call of a layer on this device goes to a device backend, never
    silently to the pure-torch fallback: on CUDA ("auto") plain BN of every dtype to
    ATen's kernels (torch.nn's cuDNN call, measured faster), BN + activation to Triton;
    with Triton forced (and in the interpreter) everything to Triton."""
    x = make((2, 3, 4, 5), layout, dtype)
    assert tb.INTERPRETED == (not CUDA)
    plain = "native" if CUDA else "triton"
    want = {"forward_train": plain, "forward_eval": plain, "backward": plain,
            "normalize": "triton", "forward_train_act": "triton", "backward_act": "triton"}
    for op, name in want.items():
        if plain == "native" or op != "forward_eval":  # Triton has no forward_eval
            assert kernels.pick(op, x).name == name, op
    with kernels.use_backend("triton"):
        for op in ("forward_train", "normalize", "backward", "forward_train_act"):
            assert kernels.pick(op, x).name == "triton", op


# --- BatchNorm2d against the float64 reference --------------------------------------


# On CUDA both routes of a plain layer: "auto" (ATen's / cuDNN's kernels) and the Triton
# kernels forced; in the interpreter, Triton.
BACKENDS = on_gpu(["auto", "triton"], ["triton"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=[shape_id(s) for s in SHAPES])
def test_batchnorm2d_training_step_matches_float64_and_torch_nn(shape, layout, dtype, backend):
    """Two training steps (forward, backward, running statistics), then eval forward and
    backward, against ``batchnorm.reference`` and torch.nn.BatchNorm2d."""
    with kernels.use_backend(backend):
        _training_step_matches(shape, layout, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", [None, "leaky_relu"])
def test_a_non_finite_batch_leaves_the_running_statistics(backend, act):
    """The guard on the device: a batch with a NaN leaves the running statistics and the
    batch count as they were, without a host read per step; the warning naming the
    channel comes once the GPU has got there (``report_pending``)."""
    from batchnorm.core import stats

    C = 5
    bn = (batchnorm.BatchNorm2d(C) if act is None
          else batchnorm.BatchNormAct2d(C, act=act, alpha=0.1)).to(DEVICE)
    x = make((4, C, 6, 6), "channels_last", torch.float32)
    with kernels.use_backend(backend):
        bn(x)
        before = {k: v.clone() for k, v in bn.state_dict().items()}
        x[1, 3, 2, 2] = float("nan")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = bn(x)
            stats.report_pending(wait=True)
    assert torch.isnan(y[:, 3]).all() and torch.isfinite(y[:, [0, 1, 2, 4]]).all()
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    messages = [str(w.message) for w in caught if "not finite" in str(w.message)]
    assert len(messages) == 1 and "channel(s) [3]" in messages[0], messages


# One rounding of the statistics and of the result to the buffers' dtype (values of order
# 1), and float32's lerp one ulp apart where one side fuses it (FMA) and the other not.
UPDATE_TOL = {
    torch.float32: dict(rtol=2.5e-7, atol=1e-7),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=8e-3, atol=8e-3),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_the_fused_running_update_equals_the_torch_operations(dtype, momentum):
    """The guarded running update of the device's buffers (``stats.update_on_device``)
    as one Triton launch (``kernels.updater``) leaves the buffers and the count that its
    torch operations leave (backend ``torch``), for buffers of each dtype and more
    channels than one block of the kernel (1,024 on the GPU); a batch with one NaN mean
    leaves everything as it was, and the warning naming the channel comes with
    ``report_pending``."""
    from batchnorm.core import stats

    C = on_gpu(2500, 11)
    gen = torch.Generator().manual_seed(4)
    mean = torch.randn(C, generator=gen).to(DEVICE)
    invstd = torch.rsqrt(torch.rand(C, generator=gen) + 0.5 + EPS).to(DEVICE)
    start = (torch.randn(C, generator=gen).to(DEVICE, dtype),
             (torch.rand(C, generator=gen) + 1.0).to(DEVICE, dtype),
             torch.tensor(3, device=DEVICE))

    def run(backend, mean):
        rm, rv, nbt = (t.clone() for t in start)
        with kernels.use_backend(backend), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert (kernels.updater(rm) is tb) == (backend == "triton")
            stats.update_on_device(rm, rv, mean, None, 64, momentum, nbt, invstd=invstd,
                                   eps=EPS)
            stats.report_pending(wait=True)
        return (rm, rv, nbt), [str(w.message) for w in caught if "not finite" in str(w.message)]

    (fused, warned), (torch_ops, _) = run("triton", mean), run("torch", mean)
    assert warned == [] and int(fused[2]) == int(torch_ops[2]) == 4
    for a, b in zip(fused[:2], torch_ops[:2]):
        assert a.dtype == dtype
        close(a, b, **UPDATE_TOL[dtype])
    bad = mean.clone()
    bad[C - 2] = float("nan")  # in the last block of channels
    fused, warned = run("triton", bad)
    for a, b in zip(fused, start):
        assert torch.equal(a, b)
    assert len(warned) == 1 and f"channel(s) [{C - 2}]" in warned[0]


def _training_step_matches(shape, layout, dtype):
    C = shape[1]
    m = math.prod(shape) // C
    ours = set_affine(batchnorm.BatchNorm2d(C).to(DEVICE), C)
    theirs = torch.nn.BatchNorm2d(C).to(DEVICE)
    theirs.load_state_dict(ours.state_dict())
    rm, rv = np.zeros(C), np.ones(C)
    # Half input on ATen's route: parameter gradients at the dtype's tolerance against
    # float64 and at float32 accumulation against torch.nn's (the same call)
    sums_tol = aten_sums_tol(make(shape, layout, dtype))
    half_aten = sums_tol is not None
    for step in range(2):
        x, dy = make(shape, layout, dtype), make(shape, layout, dtype, 1.0, 0.0)
        xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = ours(xo)
        y.backward(dy)
        want, cache = reference.forward(np64(x), np64(ours.weight), np64(ours.bias), EPS)
        dx64, dw64, db64 = reference.backward(np64(dy), cache)
        assert y.dtype == dtype and y.is_contiguous(memory_format=fmt(layout, 4))
        close(y, want, **TOL[dtype])
        close(xo.grad, dx64, **TOL[dtype])
        close_sums(ours.weight.grad, dw64, m, sums_tol)
        close_sums(ours.bias.grad, db64, m, sums_tol)
        rm, rv = reference.update_running(rm, rv, cache.mean, cache.var, m, 0.1)
        close(ours.running_mean, rm, **STATS_TOL)
        close(ours.running_var, rv, **STATS_TOL)
        assert int(ours.num_batches_tracked) == step + 1
        # torch.nn, same dtype: both round their output once
        yt = theirs(xt)
        yt.backward(dy)
        twice = {k: 2 * v for k, v in TOL[dtype].items()}
        close(y, yt, **twice)
        close(xo.grad, xt.grad, **twice)
        if half_aten:
            close_sums(ours.weight.grad, theirs.weight.grad, m)
            close_sums(ours.bias.grad, theirs.bias.grad, m)
        ours.weight.grad = ours.bias.grad = None
        theirs.weight.grad = theirs.bias.grad = None
    ours.eval()
    x, dy = make(shape, layout, dtype), make(shape, layout, dtype, 1.0, 0.0)
    x.requires_grad_()
    y = ours(x)
    y.backward(dy)
    close(y, reference.forward_eval(np64(x), rm, rv, np64(ours.weight), np64(ours.bias), EPS),
          **TOL[dtype])
    k = np64(ours.weight) / np.sqrt(rv + EPS)
    close(x.grad, np64(dy) * k.reshape(1, C, 1, 1), **TOL[dtype])
    x_hat = (np64(x) - rm.reshape(1, C, 1, 1)) / np.sqrt(rv + EPS).reshape(1, C, 1, 1)
    close_sums(ours.bias.grad, np64(dy).sum(axis=(0, 2, 3)), m, sums_tol)
    close_sums(ours.weight.grad, (np64(dy) * x_hat).sum(axis=(0, 2, 3)), m, sums_tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1, 3, 7, 7), (1, 7, 1, 1)], ids=shape_id)
def test_eval_with_a_batch_of_one(shape, dtype):
    """N = 1 in eval (one value per channel with 1x1): running statistics, no error."""
    C = shape[1]
    bn = set_affine(batchnorm.BatchNorm2d(C).to(DEVICE), C)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(C, device=DEVICE))
        bn.running_var.copy_(torch.rand(C, device=DEVICE) + 0.5)
    bn.eval()
    x = make(shape, "channels_last", dtype)
    want = reference.forward_eval(np64(x), np64(bn.running_mean), np64(bn.running_var),
                                  np64(bn.weight), np64(bn.bias), EPS)
    close(bn(x), want, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("cls,shape,layout", [
    (batchnorm.BatchNorm1d, (5, 7), "nchw"),
    (batchnorm.BatchNorm1d, on_gpu((64, 300), (6, 11)), "nchw"),
    (batchnorm.BatchNorm1d, on_gpu((3, 7, 33), (3, 2, 17)), "nchw"),
    (batchnorm.BatchNorm3d, on_gpu((2, 3, 4, 5, 6), (2, 3, 2, 3, 3)), "nchw"),
    (batchnorm.BatchNorm3d, on_gpu((2, 9, 3, 5, 7), (2, 9, 2, 2, 1)), "channels_last"),
], ids=["1d-NC", "1d-NC-wide", "1d-NCL", "3d", "3d-cl"])
def test_batchnorm1d_and_3d_match_float64(cls, shape, layout, dtype):
    C = shape[1]
    m = math.prod(shape) // C
    bn = set_affine(cls(C).to(DEVICE), C)
    x, dy = make(shape, layout, dtype), make(shape, layout, dtype, 1.0, 0.0)
    x.requires_grad_()
    y = bn(x)
    y.backward(dy)
    want, cache = reference.forward(np64(x), np64(bn.weight), np64(bn.bias), EPS)
    dx64, dw64, db64 = reference.backward(np64(dy), cache)
    close(y, want, **TOL[dtype])
    close(x.grad, dx64, **TOL[dtype])
    close_sums(bn.weight.grad, dw64, m, aten_sums_tol(x))
    close_sums(bn.bias.grad, db64, m, aten_sums_tol(x))
    rm, rv = reference.update_running(np.zeros(C), np.ones(C), cache.mean, cache.var, m, 0.1)
    close(bn.running_mean, rm, **STATS_TOL)
    close(bn.running_var, rv, **STATS_TOL)
    bn.eval()
    close(bn(x), reference.forward_eval(np64(x), rm, rv, np64(bn.weight), np64(bn.bias), EPS),
          **TOL[dtype])


@pytest.fixture(params=["split", "whole"])
def path(request, monkeypatch):
    """Force one of the Triton backend's two reduction paths (split: partial + merge +
    elementwise kernels; whole channel: one kernel per call) for the test; ``took(x)``
    says whether a call on x takes it."""
    auto = tb._tuning
    forced = {}

    def tuning(device):
        if device not in forced:
            forced[device] = dataclasses.replace(auto(device), path=request.param)
        return forced[device]

    monkeypatch.setattr(tb, "_tuning", tuning)
    return request.param


def took(x, path):
    return tb._planned(x)[0].whole == (path == "whole")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_statistics_survive_a_large_mean(layout, path):
    """float32 statistics of values around 1e4 with spread 1 (no E[x^2] - E[x]^2), on
    both reduction paths."""
    x = make(on_gpu((8, 16, 17, 19), (2, 9, 5, 4)), layout, torch.float32, 1.0, 1e4)
    assert took(x, path)
    mean, var = tb.batch_stats(x)
    want_mean, want_var = reference.batch_stats(np64(x))
    close(mean, want_mean, rtol=1e-6, atol=0)
    close(var, want_var, rtol=1e-3, atol=0)


# --- the variants against the same layer in float64 on CPU ---------------------------


def _renorm():
    return batchnorm.BatchRenorm2d(7, r_max=2.0, d_max=1.0, warmup_steps=1)


VARIANTS = {
    "renorm": (_renorm, None),
    "ghost": (lambda: batchnorm.GhostBatchNorm2d(7, virtual_batch_size=2), None),
    "masked": (lambda: batchnorm.MaskedBatchNorm2d(7), "mask"),
    "act-relu": (lambda: batchnorm.BatchNormAct2d(7, act="relu"), None),
    "act-leaky-saving": (lambda: batchnorm.BatchNormAct2d(7, act="leaky_relu", alpha=0.1), None),
    "act-leaky-plain": (
        lambda: batchnorm.BatchNormAct2d(7, act="leaky_relu", alpha=0.1, memory_saving=False),
        None),
    "act-silu": (lambda: batchnorm.BatchNormAct2d(7, act="silu"), None),
    "act-elu-saving": (lambda: batchnorm.BatchNormAct2d(7, act="elu", alpha=1.0), None),
    "sync": (lambda: batchnorm.SyncBatchNorm(7), None),
}


# Every layer kind in ``auto``, and BN + activation with ATen's kernels forced (``native``:
# on CUDA its BN, activation and the memory-saving backward from z as ATen operations, the
# route whose host cost benchmarks/gpu/profile_layer.py compares with Triton's).
VARIANT_CASES = [(name, "auto") for name in VARIANTS] + [
    (name, "native") for name in ("act-leaky-saving", "act-relu", "act-elu-saving")]
# Layers whose parameter gradients come from BN's kernels (plain BN in auto: ATen's, with
# torch.nn's numbers for half input; BN + activation: Triton's or ATen's): half input at
# the dtype's tolerance. Renorm and masked BN sum theirs with torch operations in float32.
KERNEL_SUMS = {"ghost", "sync"} | {name for name in VARIANTS if name.startswith("act-")}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name,backend", VARIANT_CASES,
                         ids=[f"{n}-{b}" for n, b in VARIANT_CASES])
def test_variant_matches_itself_in_float64_on_cpu(name, backend, layout, dtype):
    """Three training steps and an eval forward of each layer kind on this device (the
    input's dtype, float32 parameters) against a copy of the layer in float64 on CPU (the
    pure-torch backend; the CPU tests check those against their formulas). SyncBatchNorm:
    one process, no process group (the collective is tested on CPU in test_distributed)."""
    with kernels.use_backend(backend):
        _variant_matches(name, layout, dtype)


def _variant_matches(name, layout, dtype):
    factory, extra = VARIANTS[name]
    shape = on_gpu((5, 7, 6, 5), (5, 7, 3, 2))
    m = math.prod(shape) // 7
    ours = set_affine(factory().to(DEVICE), 7)
    twin = copy.deepcopy(ours).to("cpu", torch.float64)
    half = dtype != torch.float32 and name in KERNEL_SUMS
    for step in range(3):
        x, dy = make(shape, layout, dtype), make(shape, layout, dtype, 1.0, 0.0)
        args = ()
        if extra == "mask":
            mask = torch.rand(shape[0], *shape[2:], device=DEVICE) > 0.3
            args = (mask,)
        xo = x.clone().requires_grad_()
        x64 = x.detach().cpu().double().requires_grad_()
        y = ours(xo, *args)
        y.backward(dy)
        with kernels.use_backend("torch"):
            y64 = twin(x64, *(a.cpu() for a in args))
            y64.backward(dy.cpu().double())
        assert y.dtype == dtype
        close(y, y64, **TOL[dtype])
        close(xo.grad, x64.grad, **TOL[dtype])
        sums_tol = TOL[dtype] if half else None
        for (pname, p), p64 in zip(ours.named_parameters(), twin.parameters()):
            close_sums(p.grad, p64.grad, m, sums_tol)
            p.grad = p64.grad = None
        for (bname, b), b64 in zip(ours.named_buffers(), twin.buffers()):
            if b.is_floating_point():
                close(b, b64, **STATS_TOL)
            else:
                assert torch.equal(b.cpu(), b64), bname
    ours.eval()
    twin.eval()
    x = make(shape, layout, dtype)
    with kernels.use_backend("torch"):
        want = twin(x.cpu().double())
    close(ours(x), want, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("act", ["identity", "leaky_relu"])
def test_frozen_matches_the_batchnorm_it_froze(act, layout, dtype):
    """FrozenBatchNorm2d made from a trained BatchNorm2d computes its eval forward (and the
    activation), with the input gradient of that affine map."""
    bn = set_affine(batchnorm.BatchNorm2d(7).to(DEVICE), 7)
    bn(make((6, 7, 5, 5)))  # one training step: running statistics away from (0, 1)
    frozen = batchnorm.FrozenBatchNorm2d.from_batchnorm(bn) if act == "identity" else None
    if frozen is None:
        frozen = batchnorm.FrozenBatchNorm2d(7, act=act, alpha=0.1).to(DEVICE)
        frozen.load_state_dict(bn.state_dict())
    shape = on_gpu((3, 7, 7, 7), (3, 7, 2, 3))
    x, dy = make(shape, layout, dtype), make(shape, layout, dtype, 1.0, 0.0)
    x.requires_grad_()
    y = frozen(x)
    y.backward(dy)
    rm, rv = np64(bn.running_mean), np64(bn.running_var)
    pre = reference.forward_eval(np64(x), rm, rv, np64(bn.weight), np64(bn.bias), EPS)
    slope = np.where(pre > 0, 1.0, 0.1) if act == "leaky_relu" else np.ones_like(pre)
    close(y, pre * slope, **TOL[dtype])
    k = (np64(bn.weight) / np.sqrt(rv + EPS)).reshape(1, 7, 1, 1)
    close(x.grad, np64(dy) * slope * k, **TOL[dtype])


# --- the Triton kernels at the GPU's block sizes --------------------------------------

# (shape, layout): a spatial size over the NCHW block (512), C over the channels-last
# block (128), C = 3 at 129x129 (reductions split over many programs), 2048 channels.
KERNEL_CASES = on_gpu(
    [((3, 7, 1000), "nchw"), ((4, 200, 9, 9), "channels_last"), ((2, 2048, 7, 7), "nchw"),
     ((5, 3, 7, 7), "channels_last"), ((64, 3, 129, 129), "nchw"),
     ((64, 3, 129, 129), "channels_last")],
    [((3, 7, 40), "nchw"), ((2, 10, 3, 3), "channels_last"), ((3, 5, 300), "nchw")],
)


def test_the_kernel_cases_take_both_reduction_paths():
    """The Triton backend's own choice (no path forced) sends test_triton_kernels_match_float64's
    small cases to the whole-channel path and the large ones to the split path."""
    taken = {tb._planned(_kernel_input(shape, layout, torch.float32)[0])[0].whole
             for shape, layout in KERNEL_CASES}
    assert taken == {True, False}


def _kernel_input(shape, layout, dtype):
    x = make(shape, layout if len(shape) == 4 else "nchw", dtype)
    return x, make(shape, layout if len(shape) == 4 else "nchw", dtype, 1.0, 0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,layout", KERNEL_CASES,
                         ids=[f"{shape_id(s)}-{lay}" for s, lay in KERNEL_CASES])
def test_triton_kernels_match_float64(shape, layout, dtype):
    """forward_train, normalize (eval), backward and backward_eval against the reference."""
    x, dy = _kernel_input(shape, layout, dtype)
    C = shape[1]
    m = x.numel() // C
    w, b = params(C)
    y, mean, invstd = tb.forward_train(x, w, b, EPS)
    want, cache = reference.forward(np64(x), np64(w), np64(b), EPS)
    close(mean, cache.mean, **STATS_TOL)
    close(invstd, cache.invstd, **STATS_TOL)
    close(y, want, **TOL[dtype])
    assert y.dtype == dtype and y.stride() == x.stride()
    dx, dw, db = tb.backward(dy, x, mean, invstd, w)
    dx64, dw64, db64 = reference.backward(np64(dy), cache)
    close(dx, dx64, **TOL[dtype])
    close_sums(dw, dw64, m)
    close_sums(db, db64, m)
    assert dx.stride() == x.stride()
    y_eval = tb.normalize(x, mean, invstd, w, None)
    close(y_eval, reference.forward(np64(x), np64(w), None, EPS)[0], **TOL[dtype])
    dx_eval, _, _ = tb.backward_eval(dy, x, mean, invstd, w)
    k = (np64(w) * np64(invstd)).reshape(1, C, *([1] * (x.dim() - 2)))
    close(dx_eval, np64(dy) * k, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("act,alpha", [("leaky_relu", 0.1), ("elu", 1.0), ("relu", 0.0),
                                       ("silu", 0.0), ("gelu", 0.0)])
@pytest.mark.parametrize("shape,layout", KERNEL_CASES[:2],
                         ids=[f"{shape_id(s)}-{lay}" for s, lay in KERNEL_CASES[:2]])
def test_triton_bn_act_kernels_match_float64_autograd(shape, layout, act, alpha, dtype, path):
    """Fused BN + activation forward; for the invertible activations also the backward
    from the output alone, against float64 autograd of act(BN(x)); on both reduction
    paths (test_triton_kernels_match_float64's shapes take both without forcing)."""
    x, dz = _kernel_input(shape, layout, dtype)
    assert took(x, path)
    C = shape[1]
    m = x.numel() // C
    w, b = params(C)
    x64, w64, b64 = (t.detach().cpu().double().requires_grad_() for t in (x, w, b))
    z64 = activations.apply(F.batch_norm(x64, None, None, w64, b64, True, 0.0, EPS), act, alpha)
    z64.backward(dz.cpu().double())
    z, mean, invstd = tb.forward_train_act(x, w, b, EPS, act, alpha)
    close(z, z64, **TOL[dtype])
    if not activations.is_invertible(act, alpha):
        return
    dx, dw, db = tb.backward_act(dz, z, mean, invstd, w, b, act, alpha, True)
    # x_hat comes back from the rounded output: the dtype's tolerance
    close(dx, x64.grad, **{k: 2 * v for k, v in TOL[dtype].items()})
    close_sums(dw, w64.grad, m, None if dtype == torch.float32 else TOL[dtype])
    close_sums(db, b64.grad, m, None if dtype == torch.float32 else TOL[dtype])


# --- torch.compile --------------------------------------------------------------------


def test_compiled_model_with_our_layers_matches_eager():
    """A Conv-BN-ReLU model with batchnorm's layers under torch.compile: the same outputs,
    gradients and running statistics as eager (channels last, float32)."""
    torch._dynamo.reset()
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), batchnorm.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), batchnorm.BatchNormAct2d(8, act="leaky_relu"),
    ).to(DEVICE).to(memory_format=torch.channels_last)
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin)
    x = make((4, 3, 9, 9), "channels_last")
    y = model(x)
    y.square().mean().backward()
    yc = compiled(x)
    yc.square().mean().backward()
    close(yc, y, **TOL[torch.float32])
    for (name, p), pc in zip(model.named_parameters(), twin.parameters()):
        close(pc.grad, p.grad, rtol=1e-4, atol=1e-5)
    for (name, b), bc in zip(model.named_buffers(), twin.buffers()):
        close(bc, b, **STATS_TOL)
