"""The numba CPU kernels compute what the pure-torch backend computes.

Twins: every ``cpu_backend`` function against ``torch_backend`` (same contract) at the
dtype tolerances of ``conftest.TOL``, and float32 results against the float64
computation. Each configuration runs on both code paths of the channel-major kernels:
"fused" (one task per channel, statistics and output back to back) and "split" (each
channel cut into parts whose partial sums are added), forced by shrinking the thresholds.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from batchnorm import kernels
from batchnorm.kernels import torch_backend as T

C = pytest.importorskip("batchnorm.kernels.cpu.backend")

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}

# (shape, layout): odd sizes on purpose (C=1, H=W=1, N=2, widths not a multiple of 16)
CASES = [
    ((4, 3, 5, 7), "nchw"),
    ((4, 3, 5, 7), "channels_last"),
    ((2, 1, 9, 11), "nchw"),
    ((2, 5, 1, 1), "nchw"),
    ((2, 5, 1, 1), "channels_last"),
    ((8, 17), "nchw"),
    ((3, 6, 19), "nchw"),
    ((3, 6, 19), "channels_last"),
    ((2, 4, 3, 5, 3), "nchw"),
    ((2, 4, 3, 5, 3), "channels_last"),
    ((2, 40, 3, 3), "nchw"),
    ((5, 33, 4, 4), "channels_last"),
]
ACTS = [("identity", 0.0), ("relu", 0.0), ("leaky_relu", 0.1), ("elu", 1.0), ("silu", 0.0),
        ("gelu", 0.0)]


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t`` in channels-last memory order (any rank), or as is."""
    if layout == "nchw":
        return t.contiguous()
    perm = (0, *range(2, t.dim()), 1)
    inverse = (0, t.dim() - 1, *range(1, t.dim() - 1))
    return t.permute(perm).contiguous().permute(inverse)


@pytest.fixture(params=["fused", "split"])
def path(request, monkeypatch):
    """Run on the fused per-channel path, or force the split path with tiny thresholds."""
    if request.param == "split":
        monkeypatch.setattr(C, "FUSE_BYTES", 0)
        monkeypatch.setattr(C, "MIN_TASK", 4)
    return request.param


def _inputs(shape, layout, dtype, mean=3.0, std=2.0):
    x = _layout(torch.randn(shape, dtype=torch.float64) * std + mean, layout).to(dtype)
    dy = _layout(torch.randn(shape, dtype=torch.float64), layout).to(dtype)
    c = shape[1]
    w = torch.rand(c, dtype=dtype) + 0.5
    b = torch.randn(c, dtype=dtype)
    return x, dy, w, b


def _close(ours, ref, dtype, scale=1.0):
    if isinstance(ours, tuple):
        assert len(ours) == len(ref)
        for a, b in zip(ours, ref):
            _close(a, b, dtype, scale)
        return
    if ref is None:
        assert ours is None
        return
    assert ours.dtype == ref.dtype
    tol = {k: v * scale for k, v in TOL[dtype].items()}
    torch.testing.assert_close(ours, ref, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,layout", CASES)
def test_every_function_matches_torch_backend(shape, layout, dtype, path):
    x, dy, w, b = _inputs(shape, layout, dtype)
    assert C.supports(x)
    _close(C.batch_stats(x), T.batch_stats(x), dtype)
    for wb in [(w, b), (None, None)]:
        _close(C.forward_train(x, *wb, 1e-5), T.forward_train(x, *wb, 1e-5), dtype)
    _, mean, invstd = T.forward_train(x, w, b, 1e-5)
    _close(C.normalize(x, mean, invstd, w, b), T.normalize(x, mean, invstd, w, b), dtype)
    _close(C.backward_reduce(dy, x, mean, invstd), T.backward_reduce(dy, x, mean, invstd), dtype)
    sums = T.backward_reduce(dy, x, mean, invstd)
    count = 3 * x.numel() // x.shape[1]  # as if the sums came from 3 ranks (sync BN)
    _close(
        C.backward_elemt(dy, x, mean, invstd, w, *sums, count),
        T.backward_elemt(dy, x, mean, invstd, w, *sums, count),
        dtype,
    )
    for mask in [(True, True, True), (False, True, True), (True, False, False)]:
        for weight in (w, None):
            _close(
                C.backward(dy, x, mean, invstd, weight, mask),
                T.backward(dy, x, mean, invstd, weight, mask),
                dtype,
            )
            _close(
                C.backward_eval(dy, x, mean, invstd, weight, mask),
                T.backward_eval(dy, x, mean, invstd, weight, mask),
                dtype,
            )


@pytest.mark.parametrize("shape,layout", CASES)
def test_outputs_keep_the_input_memory_layout(shape, layout, path):
    x, dy, w, b = _inputs(shape, layout, torch.float32)
    y, mean, invstd = C.forward_train(x, w, b, 1e-5)
    dx, _, _ = C.backward(dy, x, mean, invstd, w)
    assert y.stride() == x.stride() and dx.stride() == x.stride()
    assert mean.dtype == invstd.dtype == torch.float32


@pytest.mark.parametrize("act,alpha", ACTS)
@pytest.mark.parametrize("shape,layout", [CASES[0], CASES[1], CASES[7], CASES[11]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_activation_variants_match_torch_backend(shape, layout, dtype, act, alpha, path):
    x, dz, w, b = _inputs(shape, layout, dtype)
    z, mean, invstd = C.forward_train_act(x, w, b, 1e-5, act, alpha)
    _close((z, mean, invstd), T.forward_train_act(x, w, b, 1e-5, act, alpha), dtype)
    _close(
        C.forward_eval_act(x, mean, invstd, w, b, act, alpha),
        T.forward_eval_act(x, mean, invstd, w, b, act, alpha),
        dtype,
    )
    if act in ("identity", "leaky_relu", "elu"):
        for training in (True, False):
            # recovering y from z divides by alpha / takes log1p: allow 10x the tolerance
            _close(
                C.backward_act(dz, z, mean, invstd, w, b, act, alpha, training),
                T.backward_act(dz, z, mean, invstd, w, b, act, alpha, training),
                dtype,
                scale=10.0,
            )


def test_backward_act_refuses_a_non_invertible_activation():
    x, dz, w, b = _inputs((4, 3, 5, 5), "nchw", torch.float32)
    z, mean, invstd = C.forward_train_act(x, w, b, 1e-5, "relu", 0.0)
    with pytest.raises(ValueError, match="not invertible"):
        C.backward_act(dz, z, mean, invstd, w, b, "relu", 0.0, True)
    with pytest.raises(ValueError, match="unknown activation"):
        C.forward_train_act(x, w, b, 1e-5, "tanh", 0.0)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_float32_matches_the_float64_computation(layout, path):
    x, dy, w, b = _inputs((4, 6, 9, 7), layout, torch.float32)
    ref = T.forward_train(x.double(), w.double(), b.double(), 1e-5)
    got = C.forward_train(x, w, b, 1e-5)
    for ours, exact in zip(got, ref):
        torch.testing.assert_close(ours.double(), exact, rtol=2e-6, atol=2e-6)
    _, mean, invstd = ref
    dref = T.backward(dy.double(), x.double(), mean, invstd, w.double())
    dgot = C.backward(dy, x, mean.float(), invstd.float(), w)
    for ours, exact in zip(dgot, dref):
        torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_large_mean_small_spread_statistics_match_float64(layout, path):
    """A float32 channel with mean 1e4 and std 1 over 100k values: no cancellation, no
    drift (a float32 running sum would be off by ~1e-3 relative)."""
    x = _layout(torch.randn(10, 2, 100, 100, dtype=torch.float64) + 1e4, layout).float()
    mean, var = C.batch_stats(x)
    xd = x.double()
    ref_var, ref_mean = torch.var_mean(xd, dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-7, atol=0.0)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-5, atol=0.0)
    y, _, _ = C.forward_train(x, None, None, 0.0)
    y_ref = (xd - ref_mean.view(1, -1, 1, 1)) / ref_var.sqrt().view(1, -1, 1, 1)
    torch.testing.assert_close(y.double(), y_ref, rtol=0.0, atol=1e-5)


def test_nan_stays_in_its_channel():
    x = torch.randn(4, 3, 6, 6)
    x[1, 1, 2, 2] = float("nan")
    mean, var = C.batch_stats(x)
    assert mean[1].isnan() and var[1].isnan()
    assert mean[[0, 2]].isfinite().all() and var[[0, 2]].isfinite().all()
    y, _, _ = C.forward_train(x, None, None, 1e-5)
    assert y[:, 1].isnan().all() and y[:, [0, 2]].isfinite().all()


def test_dy_in_another_layout_or_dtype_gives_the_same_result():
    x, dy, w, _ = _inputs((4, 5, 6, 7), "channels_last", torch.float32)
    _, mean, invstd = C.forward_train(x, w, None, 1e-5)
    ref = C.backward(dy, x, mean, invstd, w)
    for other in (dy.contiguous(), dy.double(), dy.expand(4, 5, 6, 7)):
        _close(C.backward(other, x, mean, invstd, w), ref, torch.float32)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(4, 3, 8, 8)[:, :, ::2],  # strided
        lambda: torch.randn(4, 8, 3).transpose(0, 2),  # permuted batch axis
        lambda: torch.randn(4, 3, 5, 5, dtype=torch.bfloat16),
        lambda: torch.randn(4, 3, 5, 5, dtype=torch.float16),
        lambda: torch.randn(0, 3, 5, 5),
    ],
    ids=["strided", "permuted", "bfloat16", "float16", "empty"],
)
def test_unsupported_inputs_fall_back_to_torch(make):
    x = make()
    assert not C.supports(x)
    with kernels.use_backend("cpu"):
        assert kernels.pick("forward_train", x) is T
    if x.numel():  # called directly, the cpu functions hand such inputs to torch
        w = torch.ones(x.shape[1], dtype=x.dtype)
        _close(C.forward_train(x, w, None, 1e-5)[0], T.forward_train(x, w, None, 1e-5)[0],
               torch.float32, scale=10.0)


def test_dispatcher_uses_the_cpu_kernels_for_supported_tensors():
    x = torch.randn(2, 3, 4, 4)
    with kernels.use_backend("cpu"):
        assert kernels.pick("forward_train", x) is C
    with kernels.use_backend("auto"):  # auto takes them from PREFER_MIN elements on
        assert kernels.pick("forward_train", torch.randn(8, 64, 32, 32)) is C
        assert kernels.pick("forward_train", torch.randn(4, 64, 20, 20)) is not C
        assert kernels.pick("forward_train_act", torch.randn(4, 64, 20, 20)) is C
    with kernels.use_backend("torch"):
        assert kernels.pick("forward_train", x) is T


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_large_mean_backward_matches_float64(layout, path):
    """The backward sums shift x by the float32-rounded mean and restore the rest in
    float64: with mean 1e4 and std 1, sum(dy * x_hat) and dx keep float32 accuracy."""
    x = _layout(torch.randn(4, 3, 40, 50, dtype=torch.float64) + 1e4, layout).float()
    dy = _layout(torch.randn(4, 3, 40, 50, dtype=torch.float64), layout).float()
    _, mean, invstd = T.forward_train(x.double(), None, None, 1e-5)
    mean, invstd = mean.float(), invstd.float()  # the contract's float32 statistics
    ref = T.backward(dy.double(), x.double(), mean.double(), invstd.double(), None)
    got = C.backward(dy, x, mean, invstd, None)
    torch.testing.assert_close(got[0].double(), ref[0], rtol=1e-4, atol=1e-4)
    for ours, exact in zip(got[1:], ref[1:]):  # sums over 8000 values each
        torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=1e-3)


def _running_case(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    rm, rv = torch.randn(7, generator=g, dtype=dtype), torch.rand(7, generator=g, dtype=dtype) + 0.5
    mean = torch.randn(7, generator=g, dtype=dtype)
    invstd = torch.rand(7, generator=g, dtype=dtype) + 0.2
    return rm, rv, mean, invstd


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_running_update_matches_the_torch_update(dtype):
    from batchnorm import stats

    rm, rv, mean, invstd = _running_case(dtype)
    ref_m, ref_v = rm.clone(), rv.clone()
    stats.update_running(ref_m, ref_v, mean, stats.var_from_invstd(invstd, 1e-3), 50, 0.3)
    version = rm._version
    assert C.update_running(rm, rv, mean, invstd, 1e-3, 50 / 49, 0.3) is True
    _close((rm, rv), (ref_m, ref_v), dtype, scale=0.1)
    assert rm._version > version  # autograd sees the in-place write


def test_running_update_writes_nothing_for_a_non_finite_batch():
    rm, rv, mean, invstd = _running_case()
    mean[3] = float("nan")
    before = rm.clone(), rv.clone()
    assert C.update_running(rm, rv, mean, invstd, 1e-5, 1.0, 0.1) is False
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])
    mean[3] = 0.0
    invstd[2] = 0.0  # variance +inf
    assert C.update_running(rm, rv, mean, invstd, 1e-5, 1.0, 0.1) is False
    assert torch.equal(rv, before[1])


def test_running_update_declines_what_it_cannot_write():
    rm, rv, mean, invstd = _running_case()
    assert C.update_running(rm.half(), rv.half(), mean, invstd, 1e-5, 1.0, 0.1) is None
    assert C.update_running(rm[::2], rv[::2], mean[::2], invstd[::2], 1e-5, 1.0, 0.1) is None
    grad_m = rm.clone().requires_grad_()
    assert C.update_running(grad_m, rv, mean, invstd, 1e-5, 1.0, 0.1) is None
    with torch.inference_mode():
        inf_m, inf_v = rm.clone(), rv.clone()
    assert C.update_running(inf_m, inf_v, mean, invstd, 1e-5, 1.0, 0.1) is None


@pytest.mark.parametrize("momentum", [0.3, None])
def test_running_update_through_a_layers_backup_is_the_same_update(momentum):
    """``backup=`` (a layer's RunningBackup): the buffers are reached through the numpy
    views it keeps, made again when a buffer is replaced; the same bits, verdicts and count
    as the update that checks every tensor, and what the views cannot take goes that way."""
    from batchnorm.kernels.cpu.backup import RunningBackup

    backup = RunningBackup()
    rm, rv, mean, invstd = _running_case()
    twin = [rm.clone(), rv.clone()]
    count, twin_count = torch.tensor(3), torch.tensor(3)
    for step in range(3):
        if step == 2:  # a buffer replaced: viewed anew
            rm, twin[0] = rm.clone(), twin[0].clone()
        version = rm._version
        assert C.update_running(rm, rv, mean, invstd, 1e-3, 50 / 49, momentum, count,
                                backup=backup) is True
        assert C.update_running(*twin, mean, invstd, 1e-3, 50 / 49, momentum, twin_count)
        assert torch.equal(rm, twin[0]) and torch.equal(rv, twin[1])
        assert int(count) == int(twin_count) == 4 + step and rm._version > version
    bad = mean.clone()
    bad[3] = float("nan")
    before = rm.clone(), rv.clone()
    assert C.update_running(rm, rv, bad, invstd, 1e-3, 50 / 49, momentum, count,
                            backup=backup) is False
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1]) and int(count) == 6
    with pytest.raises(ValueError, match="running_mean must have 4 elements"):
        C.update_running(rm, rv, mean[:4], invstd[:4], 1e-3, 1.0, momentum, count,
                         backup=backup)
    assert C.update_running(rm, rv, mean.clone().requires_grad_(), invstd, 1e-3, 1.0,
                            momentum, count, backup=backup) is None
    assert torch.equal(rm, before[0]) and int(count) == 6


def test_the_thread_setting_is_read_as_numba_sets_it():
    """The kernels read numba's thread setting without ``numba.get_num_threads``' locks:
    the same number, after ``set_num_threads`` and in a new thread."""
    import threading

    import numba

    previous = numba.get_num_threads()
    try:
        for n in range(1, numba.config.NUMBA_NUM_THREADS + 1):
            numba.set_num_threads(n)
            assert C._num_threads() == n == numba.get_num_threads()
    finally:
        numba.set_num_threads(previous)
    seen = []
    thread = threading.Thread(target=lambda: seen.append((C._num_threads(),
                                                           numba.get_num_threads())))
    thread.start()
    thread.join()
    assert seen[0][0] == seen[0][1] >= 1


def test_a_small_input_runs_on_one_thread_and_the_setting_comes_back(monkeypatch):
    """Below ``PARALLEL_MIN`` elements the wrappers set numba to one thread for their
    kernels (``_on_one_thread``) and put the setting back, also when a check raises; the
    layout, threads and blocks are looked up once per size (``_geometry``) and follow the
    module's thresholds when they change."""
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has one thread")
    previous = numba.get_num_threads()
    seen = []
    real = C._on_one_thread

    def spy(function, *args):
        seen.append(function.__name__)
        return real(function, *args)

    monkeypatch.setattr(C, "_on_one_thread", spy)
    try:
        numba.set_num_threads(2)
        x, dy, w, b = _inputs((2, 8, 4, 4), "nchw", torch.float32)
        y, mean, invstd = C.forward_train(x, w, b, 1e-5)
        grads = C.backward(dy, x, mean, invstd, w)
        assert seen == ["forward_train_act", "backward"]
        assert numba.get_num_threads() == 2
        _close((y, mean, invstd), T.forward_train(x, w, b, 1e-5), torch.float32)
        _close(grads, T.backward(dy, x, mean, invstd, w), torch.float32)
        assert C._geometry(x).threads == 1 and C._geometry(x).one_thread
        with pytest.raises(ValueError, match="must have 8 elements"):
            C.forward_train(x, w[:3], b, 1e-5)
        assert numba.get_num_threads() == 2
        monkeypatch.setattr(C, "PARALLEL_MIN", 0)  # a new threshold: a new geometry
        assert C._geometry(x).threads == 2 and not C._geometry(x).one_thread
    finally:
        numba.set_num_threads(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("affine", [True, False])
def test_the_address_entries_give_the_array_kernels_bits(dtype, affine):
    """``_address``'s entries view the tensors at the given addresses and run the ``_nchw``
    kernel: the same bits as the kernel on numpy views of the same tensors (forward,
    backward with and without dx, the BN + activation backward), with and without weight
    and bias."""
    from batchnorm.kernels.cpu import _act as A
    from batchnorm.kernels.cpu import _address
    from batchnorm.kernels.cpu import _nchw as NCHW

    shape = (3, 12, 5, 7)
    n, c, m = shape[0], shape[1], 35
    x, dy, w, b = _inputs(shape, "nchw", dtype)
    w, b = (w, b) if affine else (None, None)
    like = C._EMPTY[dtype]
    view = lambda t: t.numpy().reshape(n, c, m)  # noqa: E731
    vec = lambda t: like if t is None else t.numpy()  # noqa: E731
    at = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
    k = 0 if w is None else c
    block, group, tasks = 5, 2, 2
    out_a, out_b = torch.empty_like(x), torch.empty_like(x)
    got = _address.forward_fused(like, at(x), at(w), k, at(b), k, at(out_a), n, c, m, 1e-5,
                                 A.LEAKY_RELU, 0.1, block, tasks, group)
    want = NCHW.forward_fused(view(x), vec(w), vec(b), 1e-5, view(out_b), A.LEAKY_RELU, 0.1,
                              block, tasks, group)
    assert all((g == h).all() for g, h in zip(got, want)) and torch.equal(out_a, out_b)
    mean, invstd = (torch.from_numpy(v) for v in want)
    for want_dx in (True, False):
        out_a, out_b = torch.zeros_like(x), torch.zeros_like(x)
        got = _address.backward_fused(like, at(dy), at(x), at(mean), at(invstd), at(w), k,
                                      at(out_a), want_dx, n, c, m, block, tasks, group)
        want = NCHW.backward_fused(view(dy), view(x), mean.numpy(), invstd.numpy(), vec(w),
                                   view(out_b) if want_dx else view(out_b)[:, :0], want_dx,
                                   block, tasks, group)
        assert all((g == h).all() for g, h in zip(got, want)) and torch.equal(out_a, out_b)
        assert want_dx or not out_a.any()
    low = like.dtype.type(0.0)
    out_a, out_b = torch.empty_like(x), torch.empty_like(x)
    got = _address.act_backward_fused(like, at(dy), at(x), at(mean), at(invstd), at(w), k,
                                      at(b), k, at(out_a), A.RELU, low, True, n, c, m, block,
                                      tasks, group)
    want = NCHW.act_backward_fused(view(dy), view(x), mean.numpy(), invstd.numpy(), vec(w),
                                   vec(b), view(out_b), A.RELU, low, True, block, tasks, group)
    assert all((g == h).all() for g, h in zip(got, want)) and torch.equal(out_a, out_b)


def test_the_fused_wrappers_take_vectors_in_any_dtype_layout_and_device_they_accept():
    """What the address entries read is made contiguous, on the CPU and in x's dtype
    first (``_contiguous``): strided float64 statistics and weights on float32 input give
    torch_backend's numbers."""
    x, dy, w, b = _inputs((4, 16, 6, 6), "nchw", torch.float32)
    assert C._geometry(x).fused[1][0], "the fused backward runs"
    wide = lambda v: torch.stack([v.double(), v.double()], 1)[:, 0]  # noqa: E731
    w64, b64 = wide(w), wide(b)
    assert not w64.is_contiguous() and w64.dtype == torch.float64
    got = C.forward_train_act(x, w64, b64, 1e-5, "relu", 0.0)
    _close(got, T.forward_train_act(x, w, b, 1e-5, "relu", 0.0), torch.float32)
    _, mean, invstd = got
    got = C.backward(dy, x, wide(mean), wide(invstd), w64)
    _close(got, T.backward(dy, x, mean, invstd, w), torch.float32)
    got = C.backward_act_input(dy, x, wide(mean), wide(invstd), w64, b64, "relu", 0.0, True)
    _close(got, T.backward_act_input(dy, x, mean, invstd, w, b, "relu", 0.0, True),
           torch.float32)


_FORKED = """
import multiprocessing as mp
import torch, batchnorm
from batchnorm import kernels

def child(q):
    m = batchnorm.BatchNorm2d(64)
    m(torch.randn(8, 64, 32, 32, requires_grad=True)).sum().backward()
    q.put(int(m.num_batches_tracked))

kernels.load("cpu")  # what a process's first BN call on CPU does
ctx = mp.get_context("fork")
q = ctx.Queue()
p = ctx.Process(target=child, args=(q,), daemon=True)
p.start()
p.join(120)
print(p.exitcode, q.get(timeout=5) if p.exitcode == 0 else None)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="fork() and GNU OpenMP: Linux")
def test_a_process_forked_after_loading_the_kernels_can_run_them():
    """Loading the backend does not start numba's threads (numba terminates a forked
    child that runs a parallel kernel once its parent started them: "fork() called from a
    process already using GNU OpenMP"): a worker forked after the parent loaded the
    kernels trains on the numba route. (A parent that has run an OpenMP parallel region,
    numba's or ATen's, cannot hand GNU OpenMP to a forked child at all: use "spawn".)"""
    done = subprocess.run([sys.executable, "-c", _FORKED], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["0", "1"], (done.stdout, done.stderr[-2000:])


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_constant_channel_with_zero_eps_gives_ieee_infinity(layout, path):
    """1 / sqrt(0) is +inf as in IEEE arithmetic (and torch), not a Python ZeroDivisionError."""
    x = _layout(torch.ones(4, 3, 10, 10), layout)
    _, mean, invstd = C.forward_train(x, None, None, 0.0)
    assert torch.equal(mean, torch.ones(3)) and torch.isinf(invstd).all()


@pytest.mark.parametrize("act,alpha", ACTS)
@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_from_the_input_matches_torch_backend(shape, layout, dtype, act, alpha, path):
    """The input-saving BN + activation backward (relu and leaky_relu: one fused kernel
    that decides the slope on x; silu and gelu in float32: the same kernel with the
    derivative at y recomputed from x; the others: y, then ATen's activation backward),
    with a zero and a negative weight among the channels (the slope's side flips with the
    sign)."""
    x, dz, w, b = _inputs(shape, layout, dtype)
    w = w.clone()
    w[0] = -w[0]
    if w.numel() > 1:
        w[1] = 0.0
    mean, var = T.batch_stats(x)
    invstd = torch.rsqrt(var + 1e-5)
    for training in (True, False):
        for weight, bias in ((w, b), (None, None)):
            _close(
                C.backward_act_input(dz, x, mean, invstd, weight, bias, act, alpha, training),
                T.backward_act_input(dz, x, mean, invstd, weight, bias, act, alpha, training),
                dtype,
            )


@pytest.mark.parametrize("act,dtype,fused", [
    ("silu", torch.float32, True), ("gelu", torch.float32, True), ("relu", torch.float64, True),
    ("silu", torch.float64, False), ("elu", torch.float32, False),
])
def test_which_input_saving_backwards_run_the_fused_kernel(act, dtype, fused, monkeypatch):
    """silu and gelu take the fused kernel in float32 only (float64 would call libm per
    element); elu never (ATen's kernels)."""
    from batchnorm.kernels.cpu import _act as A
    from batchnorm.kernels.cpu import _address

    calls = []
    real = _address.act_backward_fused

    def spy(*args):
        calls.append(args[10])  # the activation code
        return real(*args)

    monkeypatch.setattr(_address, "act_backward_fused", spy)
    x, dz, w, b = _inputs((2, 40, 3, 3), "nchw", dtype)
    mean, var = T.batch_stats(x)
    invstd = torch.rsqrt(var + 1e-5)
    alpha = 1.0 if act == "elu" else 0.0
    got = C.backward_act_input(dz, x, mean, invstd, w, b, act, alpha, True)
    _close(got, T.backward_act_input(dz, x, mean, invstd, w, b, act, alpha, True), dtype)
    assert calls == ([A.CODES[act]] if fused else [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 13, 5, 7), (2, 1, 9, 11), (4, 40, 2, 3)])
def test_fused_kernels_give_the_same_bits_for_any_pipeline(shape, dtype):
    """The fused kernels' pipeline (``_nchw._stage``: a task writes block k while it
    reduces block k + 1, ``group`` channels of each at a time; group 0: one block after the
    other) only reorders work between channels: every block size, task count and group
    (blocks of uneven size, more tasks than blocks, a group wider than a block) gives the
    bits of one block on one task.
    Forward, backward (with and without dx) and the BN + activation backward (relu's gate
    and silu's scratch dy, of which the pipeline keeps two)."""
    from batchnorm.kernels.cpu import _act as A
    from batchnorm.kernels.cpu import _nchw as NCHW

    x, dy, w, b = _inputs(shape, "nchw", dtype)
    n, c = shape[:2]
    xn, dn = x.numpy().reshape(n, c, -1), dy.numpy().reshape(n, c, -1)
    wn, bn = w.numpy(), b.numpy()
    mean, invstd = NCHW.forward_fused(xn, wn, bn, 1e-5, xn.copy(), 0, 0.0, c, 1, c)
    low = xn.dtype.type(0.0)

    def run(block, tasks, group):
        outs = [xn.copy() * 0 for _ in range(4)]
        got = [*NCHW.forward_fused(xn, wn, bn, 1e-5, outs[0], A.LEAKY_RELU, 0.1, block, tasks, group),
               *NCHW.backward_fused(dn, xn, mean, invstd, wn, outs[1], True, block, tasks, group),
               *NCHW.backward_fused(dn, xn, mean, invstd, wn, xn[:0], False, block, tasks, group),
               *NCHW.act_backward_fused(dn, xn, mean, invstd, wn, bn, outs[2], A.RELU, low, True,
                                        block, tasks, group)]
        if dtype == torch.float32:
            got += NCHW.act_backward_fused(dn, xn, mean, invstd, wn, bn, outs[3], A.SILU, low,
                                           True, block, tasks, group)
        return got + outs

    reference = run(c, 1, c)
    # ... and those bits are right: the pure-torch twin of the forward and the backward
    want_y = T.forward_train_act(x, w, b, 1e-5, "leaky_relu", 0.1)[0]
    want_dx = T.backward(dy, x, torch.from_numpy(mean), torch.from_numpy(invstd), w)[0]
    got_y, got_dx = reference[-4], reference[-3]
    _close(torch.from_numpy(got_y).reshape(shape), want_y, dtype)
    _close(torch.from_numpy(got_dx).reshape(shape), want_dx, dtype)
    for block in sorted({1, 2, 3, max(1, c // 3), c}):
        for tasks in (1, 2, 3, c + 2):
            for group in (0, 1, 2, c + 1):
                for got, want in zip(run(block, tasks, group), reference):
                    assert (got == want).all(), (block, tasks, group)
