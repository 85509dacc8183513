"""Where the dispatcher picks ATen's kernels (small tensors, channels_last, (N, C)), the
modules are torch.nn bit for bit, running statistics included (ATen's kernel updates the
buffers), while the non-finite guard and checkpointing keep working."""

import warnings

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import batchnorm
from batchnorm import kernels

CASES = [
    ("BatchNorm1d", (64, 10), False),
    ("BatchNorm1d", (8, 6, 5), False),
    ("BatchNorm2d", (4, 3, 5, 5), False),
    ("BatchNorm2d", (4, 8, 5, 5), True),  # channels_last
    ("BatchNorm3d", (2, 3, 3, 4, 2), False),
]


def _input(shape, channels_last, dtype=torch.float32):
    x = torch.randn(shape, dtype=dtype) * 3 + 1
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("name, shape, channels_last", CASES)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_training_steps_equal_torch_nn_bit_for_bit(name, shape, channels_last, momentum, dtype):
    ours = getattr(batchnorm, name)(shape[1], momentum=momentum, dtype=dtype)
    theirs = getattr(torch.nn, name)(shape[1], momentum=momentum, dtype=dtype)
    assert kernels.pick("forward_train", _input(shape, channels_last, dtype)).name == "native"
    for _ in range(3):
        x = _input(shape, channels_last, dtype)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        ys = [m(xi) for m, xi in zip((ours, theirs), xs)]
        g = torch.randn_like(ys[0])
        for y in ys:
            y.backward(g)
        assert torch.equal(ys[0], ys[1]) and torch.equal(xs[0].grad, xs[1].grad)
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    assert torch.equal(ours.weight.grad, theirs.weight.grad)


def test_functional_batch_norm_updates_like_torch_bit_for_bit():
    x = _input((16, 5), False)
    bufs = [(torch.zeros(5), torch.ones(5)) for _ in range(2)]
    y0 = batchnorm.functional.batch_norm(x, *bufs[0], training=True, momentum=0.2)
    y1 = torch.nn.functional.batch_norm(x, *bufs[1], training=True, momentum=0.2)
    assert torch.equal(y0, y1)
    assert torch.equal(bufs[0][0], bufs[1][0]) and torch.equal(bufs[0][1], bufs[1][1])


@pytest.mark.parametrize("backend", ["auto", "cpu", "torch"])
def test_non_finite_batch_leaves_every_buffer_untouched(backend):
    bn = batchnorm.BatchNorm2d(3)
    bn(torch.randn(4, 3, 5, 5))
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(4, 3, 5, 5)
    x[1, 2, 0, 0] = float("nan")
    with kernels.use_backend(backend), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = bn(x)
    assert any("channel(s) [2]" in str(w.message) for w in caught)
    for key, value in before.items():
        assert torch.equal(bn.state_dict()[key], value), key
    assert torch.isnan(y[:, 2]).all() and torch.isfinite(y[:, :2]).all()


def test_wrong_buffer_dtype_falls_back_to_the_guarded_update():
    """float64 input on a float32 module: ATen cannot take the buffers; our update runs."""
    ours, theirs = batchnorm.BatchNorm1d(4), batchnorm.BatchNorm1d(4, dtype=torch.float64)
    x = torch.randn(32, 4, dtype=torch.float64)
    ours(x)
    theirs(x)
    torch.testing.assert_close(ours.running_var, theirs.running_var.float(), rtol=1e-6, atol=1e-7)
    assert ours.running_var.dtype == torch.float32 and int(ours.num_batches_tracked) == 1


@pytest.mark.parametrize(
    "make",
    [
        lambda: batchnorm.BatchNorm2d(3),
        lambda: batchnorm.BatchRenorm2d(3),
        lambda: batchnorm.BatchRenorm2d(3, warmup_steps=0),  # r and d clipped at once
        lambda: batchnorm.GhostBatchNorm2d(3, virtual_batch_size=8),  # one sub-batch
    ],
    ids=["bn", "renorm", "renorm-no-warmup", "ghost"],
)
@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpoint_recomputation_counts_once(make, reentrant):
    """The recomputed forward makes the same ATen call (non-reentrant checkpoint compares
    the saved tensors) on copies of the buffers, so statistics are counted once, and the
    gradients are those of the unchecked layer (Batch Renorm's recomputation reuses the r
    and d of its original forward, taken before the update)."""
    plain, ckpt = make(), make()
    for _ in range(3):
        x = torch.randn(4, 3, 5, 5) * 2 + 1
        xs = [x.clone().requires_grad_() for _ in range(2)]
        plain(xs[0]).square().sum().backward()
        checkpoint(ckpt, xs[1], use_reentrant=reentrant).square().sum().backward()
        assert torch.equal(xs[0].grad, xs[1].grad)
    for key, value in plain.state_dict().items():
        assert torch.equal(ckpt.state_dict()[key], value), key
    assert int(ckpt.num_batches_tracked) == 3


def _nan_batch(c=3):
    x = torch.randn(4, c, 5, 5)
    x[0, 1, 0, 0] = float("nan")
    return x


def _guarded_step_keeps(bn, x):
    """One step on a non-finite batch: buffers and counter as before, a warning."""
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.warns(RuntimeWarning, match=r"channel\(s\) \[1\]"):
        bn(x)
    for key, value in before.items():
        assert torch.equal(bn.state_dict()[key], value), key


@pytest.mark.parametrize("backend", ["auto", "cpu"])
def test_guard_follows_buffers_that_were_replaced_or_moved(backend):
    """The layer's backup keeps numpy views of the buffers it saved last (ATen's route) or
    updates them through (the numba kernels' route, ``backend="cpu"``): a buffer assigned
    anew, converted by ``.double()`` or moved into shared memory must be re-viewed, or the
    guard would check (and restore) or update the old memory."""
    with kernels.use_backend(backend):
        _replaced_or_moved()


def _replaced_or_moved():
    bn = batchnorm.BatchNorm2d(3)
    bn(torch.randn(4, 3, 5, 5))  # views made
    bn.running_mean = torch.full((3,), 2.0)
    bn(torch.randn(4, 3, 5, 5))
    assert int(bn.num_batches_tracked) == 2 and bn.running_mean.sub(2).abs().max() < 0.5
    _guarded_step_keeps(bn, _nan_batch())
    bn.running_var.share_memory_()  # same tensor object, new memory
    _guarded_step_keeps(bn, _nan_batch())
    bn.double()
    _guarded_step_keeps(bn, _nan_batch().double())
    bn(torch.randn(4, 3, 5, 5, dtype=torch.float64))
    assert int(bn.num_batches_tracked) == 3


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (16, 3)], ids=["fused", "two_pass"])
def test_numba_route_folds_the_batch_in_right_after_its_kernel(shape, grad, momentum):
    """On the numba kernels' route the layer's backup is handed to the training forward,
    which updates the running buffers as soon as its kernel has the statistics
    (``RunningBackup.blend``): torch.nn's running statistics and count, with and without
    autograd, on the fused kernels and the two-pass ones (few channels, cut in parts)."""
    name = "BatchNorm1d" if len(shape) == 2 else "BatchNorm2d"  # (N, C): channels-last rows
    ours = getattr(batchnorm, name)(3, momentum=momentum)
    theirs = getattr(torch.nn, name)(3, momentum=momentum)
    with kernels.use_backend("cpu"), torch.set_grad_enabled(grad):
        for _ in range(3):
            x = torch.randn(shape) * 2 + 1
            ours(x.clone().requires_grad_(grad)), theirs(x)
            assert ours._running_backup.blended()  # the update ran in the kernels' call
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-5, atol=1e-6)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 3


def test_copies_of_a_layer_guard_their_own_buffers():
    import copy
    import pickle

    bn = batchnorm.BatchNorm2d(3)
    bn(torch.randn(4, 3, 5, 5))
    original = {k: v.clone() for k, v in bn.state_dict().items()}
    for twin in (copy.deepcopy(bn), pickle.loads(pickle.dumps(bn))):
        twin(torch.randn(4, 3, 5, 5) + 3)
        assert int(twin.num_batches_tracked) == 2
        _guarded_step_keeps(twin, _nan_batch())
    for key, value in original.items():
        assert torch.equal(bn.state_dict()[key], value), key


def test_non_finite_buffers_before_the_step_let_a_finite_batch_pass():
    """The fast check reads the blended buffers; when they were not finite already, the
    batch statistics decide, as the torch-op guard does: counted, no warning."""
    bn = batchnorm.BatchNorm1d(4)
    bn.running_var[2] = float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bn(torch.randn(16, 4))
    assert int(bn.num_batches_tracked) == 1 and torch.isinf(bn.running_var[2])
    assert torch.isfinite(bn.running_mean).all()


@pytest.mark.parametrize("name, shape, channels_last", CASES)
def test_eval_with_grad_equals_torch_nn_through_atens_autograd(name, shape, channels_last):
    """Eval mode with an input that needs grad (frozen BN while fine-tuning, input
    gradients): ATen's autograd records the eval kernel, as in torch.nn."""
    ours = getattr(batchnorm, name)(shape[1])
    theirs = getattr(torch.nn, name)(shape[1])
    with torch.no_grad():
        theirs.running_mean.uniform_(-1, 1)
        theirs.running_var.uniform_(0.5, 2)
        theirs.weight.uniform_(0.5, 1.5)
    ours.load_state_dict(theirs.state_dict())
    ours.eval()
    theirs.eval()
    x = _input(shape, channels_last)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ys = [m(xi) for m, xi in zip((ours, theirs), xs)]
    assert "NativeBatchNorm" in type(ys[0].grad_fn).__name__
    g = torch.randn_like(ys[0])
    for y in ys:
        y.backward(g)
    assert torch.equal(ys[0], ys[1]) and torch.equal(xs[0].grad, xs[1].grad)
    assert torch.equal(ours.weight.grad, theirs.weight.grad)
    assert torch.equal(ours.bias.grad, theirs.bias.grad)


def test_eval_with_grad_double_backward_and_learnable_statistics():
    bn = batchnorm.BatchNorm2d(3, dtype=torch.float64).eval()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(bn, (x,))
    # statistics that require grad (ATen refuses them): ``BatchNormEval`` differentiates
    mean = torch.randn(3, dtype=torch.float64, requires_grad=True)
    var = torch.rand(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, m, v: batchnorm.functional.batch_norm(x, m, v, training=False), (x, mean, var)
    )


def test_functional_batch_norm_guards_without_a_layer_backup():
    """``functional.batch_norm`` has no layer to keep a backup in: the torch copy guards."""
    x = _nan_batch().flatten(2)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    before = rm.clone(), rv.clone()
    assert kernels.pick("forward_train", x).name == "native"
    with pytest.warns(RuntimeWarning, match=r"channel\(s\) \[1\]"):
        batchnorm.functional.batch_norm(x, rm, rv, training=True)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("given", ["invstd", "var"])
@pytest.mark.parametrize("finite", [True, False, "inf"])
def test_the_device_guard_equals_the_host_guard(finite, given, momentum, backend):
    """``stats.update_on_device`` (what CUDA buffers get: no host read) leaves the same
    buffers and count as the host-read guard, with the batch given as ``invstd`` (the
    kernels') or as its variance, through a backend's fused update (``auto``: the numba
    one on CPU; Triton's on CUDA: tests/test_kernels_triton.py) or the torch operations
    (``torch``: the guard as ``torch.where``); its warning comes from ``report_pending``
    (here at once: CPU tensors need no wait), naming the channel."""
    from batchnorm.core import stats

    torch.manual_seed(0)
    C, count, eps = 4, 24, 1e-5
    mean, var = torch.randn(C), torch.rand(C) + 0.5
    if finite is False:
        mean[2] = float("nan")
    elif finite == "inf":
        var[2] = float("inf")
    invstd = torch.rsqrt(var + eps)
    batch = (dict(var=None, invstd=invstd, eps=eps) if given == "invstd"
             else dict(var=var.clone()))
    start = (torch.randn(C), torch.rand(C) + 1.0, torch.tensor(3))

    def run(update):
        rm, rv, nbt = (t.clone() for t in start)
        args = dict(batch)
        variance = args.pop("var")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            update(rm, rv, mean, variance, count, momentum, nbt, **args)
            deferred = len(caught)
            stats.report_pending()
        return (rm, rv, nbt), deferred, [str(w.message) for w in caught]

    with kernels.use_backend(backend):
        host, _, host_warnings = run(stats.update_running)
        device, deferred, device_warnings = run(stats.update_on_device)
    for a, b in zip(host, device):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    ok = finite is True
    assert int(device[2]) == 3 + ok
    assert deferred == 0
    assert len(device_warnings) == len(host_warnings) == (0 if ok else 1)
    if not ok:
        assert "channel(s) [2]" in device_warnings[0]
        assert device_warnings[0] == host_warnings[0]
    if given == "var":
        assert torch.equal(batch["var"], var)  # the caller's variance is not written
