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
