"""BatchNorm1d/2d/3d are drop-in for torch.nn: the same outputs, input and parameter
gradients and running statistics over several steps, for a table of configurations."""

import itertools

import pytest
import torch

import batchnorm
from conftest import TOL

SHAPES = [
    ("1d", (8, 5)),
    ("1d", (2, 3)),
    ("1d", (4, 3, 7)),
    ("2d", (4, 3, 5, 6)),
    ("2d", (2, 4, 1, 1)),
    ("2d-cl", (3, 4, 5, 6)),
    ("3d", (2, 3, 3, 4, 5)),
    ("3d-cl", (2, 3, 3, 2, 4)),
]
CLASSES = {
    "1d": (batchnorm.BatchNorm1d, torch.nn.BatchNorm1d),
    "2d": (batchnorm.BatchNorm2d, torch.nn.BatchNorm2d),
    "3d": (batchnorm.BatchNorm3d, torch.nn.BatchNorm3d),
}
CONFIGS = list(
    itertools.product(
        SHAPES,
        ["train", "eval"],
        [True, False],  # affine
        [True, False],  # track_running_stats
        [0.1, None, 0.0],  # momentum
        [torch.float64, torch.float32, torch.bfloat16],
    )
)


def _make_input(shape, kind, dtype):
    x = torch.randn(shape, dtype=torch.float64) * 3 + 1.5
    x = x.to(dtype)
    if kind.endswith("-cl"):
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def _pair(kind, c, affine, track, momentum, dtype):
    ours_cls, theirs_cls = CLASSES[kind[:2]]
    param_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    kw = dict(eps=1e-5, momentum=momentum, affine=affine, track_running_stats=track, dtype=param_dtype)
    ours, theirs = ours_cls(c, **kw), theirs_cls(c, **kw)
    with torch.no_grad():
        if affine:
            theirs.weight.uniform_(0.5, 1.5)
            theirs.bias.uniform_(-0.5, 0.5)
        if track:
            theirs.running_mean.uniform_(-1, 1)
            theirs.running_var.uniform_(0.5, 2)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize(
    "shape_kind,mode,affine,track,momentum,dtype", CONFIGS,
    ids=lambda v: str(v).replace("torch.", "") if not isinstance(v, tuple) else v[0] + "x".join(map(str, v[1])),
)
def test_matches_torch_nn_over_several_steps(shape_kind, mode, affine, track, momentum, dtype, backend):
    # "auto" would send these small shapes to ATen (torch.nn's own kernels): force each of
    # our backends instead so the twin is a real second computation.
    with batchnorm.kernels.use_backend(backend):
        _run_steps(shape_kind, mode, affine, track, momentum, dtype)


def _run_steps(shape_kind, mode, affine, track, momentum, dtype):
    kind, shape = shape_kind
    ours, theirs = _pair(kind, shape[1], affine, track, momentum, dtype)
    ours.train(mode == "train")
    theirs.train(mode == "train")
    tol = TOL[dtype]
    ptol = TOL[torch.float32] if dtype == torch.bfloat16 else tol
    for _step in range(3):
        x = _make_input(shape, kind, dtype)
        x1 = x.clone().requires_grad_()
        x2 = x.clone().requires_grad_()
        y1, y2 = ours(x1), theirs(x2)
        assert y1.dtype == y2.dtype and y1.shape == y2.shape
        if kind.endswith("-cl"):
            assert y1.stride() == y2.stride(), "memory format is preserved"
        torch.testing.assert_close(y1, y2, **tol)
        dy = torch.randn_like(y1)
        y1.backward(dy)
        y2.backward(dy)
        torch.testing.assert_close(x1.grad, x2.grad, **tol)
        if affine:
            # bf16 runs keep float32 parameters: their gradients sum many bf16 products
            grad_tol = dict(rtol=5e-2, atol=5e-2) if dtype == torch.bfloat16 else tol
            torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, **grad_tol)
            torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, **grad_tol)
        if track:
            torch.testing.assert_close(ours.running_mean, theirs.running_mean, **ptol)
            torch.testing.assert_close(ours.running_var, theirs.running_var, **ptol)
            assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item()


def test_state_dict_keys_and_repr_match_torch():
    for ours_cls, theirs_cls in CLASSES.values():
        for track, affine, bias in itertools.product((True, False), repeat=3):
            kw = dict(affine=affine, track_running_stats=track, bias=bias)
            ours, theirs = ours_cls(7, **kw), theirs_cls(7, **kw)
            assert list(ours.state_dict()) == list(theirs.state_dict())
            assert repr(ours).split("(", 1)[1] == repr(theirs).split("(", 1)[1]


def test_checkpoint_without_num_batches_tracked_loads():
    old = torch.nn.BatchNorm2d(4).state_dict()
    del old["num_batches_tracked"]
    old._metadata[""]["version"] = 1
    bn = batchnorm.BatchNorm2d(4)
    bn.load_state_dict(old)
    assert bn.num_batches_tracked.item() == 0


def test_torch_checkpoint_round_trip():
    theirs = torch.nn.BatchNorm1d(6)
    theirs(torch.randn(10, 6))
    ours = batchnorm.BatchNorm1d(6)
    ours.load_state_dict(theirs.state_dict())
    back = torch.nn.BatchNorm1d(6)
    back.load_state_dict(ours.state_dict())
    for k, v in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)


def test_float16_input_keeps_float32_statistics():
    bn = batchnorm.BatchNorm2d(3)
    x = (torch.randn(4, 3, 5, 5) * 2 + 1).half()
    y = bn(x)
    assert y.dtype == torch.float16 and bn.running_mean.dtype == torch.float32
    ref = torch.nn.functional.batch_norm(x.float(), None, None, training=True)
    torch.testing.assert_close(y.float(), ref, **TOL[torch.float16])


def test_factory_arguments_set_dtype_of_parameters_and_buffers():
    bn = batchnorm.BatchNorm1d(3, dtype=torch.float64)
    assert bn.weight.dtype == bn.running_var.dtype == torch.float64
    assert bn.num_batches_tracked.dtype == torch.long
