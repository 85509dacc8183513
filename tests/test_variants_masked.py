"""Masked / weighted statistics: a bool mask equals BN on the selected elements only
(outputs, gradients, running statistics), float weights match the weighted definition
written out in float64, the functional ``batch_norm(..., mask=)`` equals the module,
gradcheck and gradgradcheck of the closed-form backward, and bad masks leave state
untouched."""

import pytest
import torch

import batchnorm
from batchnorm.variants.masked import masked_batch_norm
from conftest import TOL

F64 = TOL[torch.float64]


def test_sequence_mask_equals_batchnorm_on_the_selected_elements_only():
    n, c, length = 5, 3, 7
    lengths = torch.tensor([7, 3, 5, 1, 6])
    mask = torch.arange(length) < lengths.unsqueeze(1)  # (N, L), True = real token
    masked, plain = batchnorm.MaskedBatchNorm1d(c, momentum=0.3), torch.nn.BatchNorm1d(c, momentum=0.3)
    with torch.no_grad():
        for m in (masked, plain):
            m.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
            m.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    for _ in range(3):
        x = (torch.randn(n, c, length) * 2 + 1)
        x[~mask.unsqueeze(1).expand_as(x)] = 1e3  # padding far off: must not leak in
        x1 = x.clone().requires_grad_()
        selected = x.clone().transpose(1, 2)[mask].requires_grad_()  # (M, C)
        y1, y2 = masked(x1, mask=mask), plain(selected)
        torch.testing.assert_close(y1.transpose(1, 2)[mask], y2, **TOL[torch.float32])
        g = torch.randn_like(y2)
        y2.backward(g)
        g_full = torch.zeros(n, length, c)
        g_full[mask] = g  # the loss sees the selected outputs only
        y1.backward(g_full.transpose(1, 2))
        torch.testing.assert_close(x1.grad.transpose(1, 2)[mask], selected.grad, **TOL[torch.float32])
        assert torch.all(x1.grad.transpose(1, 2)[~mask] == 0)
        torch.testing.assert_close(masked.weight.grad, plain.weight.grad, **TOL[torch.float32])
        torch.testing.assert_close(masked.bias.grad, plain.bias.grad, **TOL[torch.float32])
        for m in (masked, plain):
            m.weight.grad = m.bias.grad = None
        torch.testing.assert_close(masked.running_mean, plain.running_mean, **TOL[torch.float32])
        torch.testing.assert_close(masked.running_var, plain.running_var, **TOL[torch.float32])
    assert masked.num_batches_tracked.item() == 3


def test_per_sample_mask_on_images():
    x = torch.randn(6, 2, 3, 3, dtype=torch.float64)
    keep = torch.tensor([True, False, True, True, False, True])
    y = batchnorm.MaskedBatchNorm2d(2, dtype=torch.float64)(x, mask=keep)
    ref = torch.nn.BatchNorm2d(2, dtype=torch.float64)(x[keep])
    torch.testing.assert_close(y[keep], ref, **F64)


def weighted_definition(x, w_full, weight, bias, eps):
    """Weighted BN in float64 with autograd; ``w_full`` broadcasts as (N, 1, *S)."""
    dims = [0, *range(2, x.dim())]
    view = (1, -1) + (1,) * (x.dim() - 2)
    total = w_full.expand(x.shape[0], 1, *x.shape[2:]).sum()
    mean = (w_full * x).sum(dims) / total
    var = (w_full * (x - mean.view(view)) ** 2).sum(dims) / total
    return (x - mean.view(view)) / torch.sqrt(var.view(view) + eps) * weight.view(view) + bias.view(view)


@pytest.mark.parametrize("shape,mask_shape", [((6, 3), (6,)), ((4, 3, 5), (4, 5)), ((4, 3, 5), (4,)),
                                              ((3, 2, 4, 5), (3, 1, 5)), ((2, 2, 2, 3, 3), (2, 2, 3, 3))])
def test_float_weights_match_the_weighted_definition(shape, mask_shape):
    c = shape[1]
    cls = {2: batchnorm.MaskedBatchNorm1d, 3: batchnorm.MaskedBatchNorm1d,
           4: batchnorm.MaskedBatchNorm2d, 5: batchnorm.MaskedBatchNorm3d}[len(shape)]
    bn = cls(c, momentum=0.5, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    weights = torch.rand(mask_shape, dtype=torch.float64) * 3
    w_full = weights.reshape(shape[0], 1, *([1] * (len(shape) - 2))) if len(mask_shape) == 1 \
        else weights.unsqueeze(1)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    w_ref = bn.weight.detach().clone().requires_grad_()
    b_ref = bn.bias.detach().clone().requires_grad_()
    y, y_ref = bn(x, mask=weights), weighted_definition(x_ref, w_full, w_ref, b_ref, bn.eps)
    torch.testing.assert_close(y, y_ref, **F64)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, **F64)
    torch.testing.assert_close(bn.weight.grad, w_ref.grad, **F64)
    torch.testing.assert_close(bn.bias.grad, b_ref.grad, **F64)
    # running statistics: weighted mean, variance unbiased with Kish's n_eff
    full = w_full.expand(shape[0], 1, *shape[2:])
    n_eff = full.sum() ** 2 / (full ** 2).sum()
    dims = [0, *range(2, len(shape))]
    mean = (w_full * x.detach()).sum(dims) / full.sum()
    var = (w_full * (x.detach() - mean.view(1, -1, *([1] * (len(shape) - 2)))) ** 2).sum(dims) / full.sum()
    torch.testing.assert_close(bn.running_mean, 0.5 * mean, **F64)
    torch.testing.assert_close(bn.running_var, 0.5 + 0.5 * var * n_eff / (n_eff - 1), **F64)


def test_integer_weights_count_samples_repeatedly_and_scale_does_not_matter():
    x = torch.randn(4, 3, dtype=torch.float64)
    counts = torch.tensor([1.0, 3.0, 0.0, 2.0], dtype=torch.float64)
    y = masked_batch_norm(x, None, None, training=True, mask=counts)
    repeated = torch.repeat_interleave(x, counts.long(), dim=0)
    mean, var = repeated.mean(0), repeated.var(0, correction=0)
    torch.testing.assert_close(y, (x - mean) / torch.sqrt(var + 1e-5), **F64)
    torch.testing.assert_close(masked_batch_norm(x, None, None, training=True, mask=counts * 7.5), y, **F64)


def test_functional_batch_norm_mask_keyword_equals_the_module():
    x = torch.randn(4, 3, 6)
    mask = torch.rand(4, 6) > 0.3
    bn = batchnorm.MaskedBatchNorm1d(3)
    rm, rv = torch.zeros(3), torch.ones(3)
    y1 = bn(x, mask=mask)
    y2 = batchnorm.batch_norm(x, rm, rv, training=True, mask=mask)
    assert torch.equal(y1, y2)
    assert torch.equal(bn.running_mean, rm) and torch.equal(bn.running_var, rv)
    y3 = batchnorm.batch_norm(x, rm, rv, training=False, mask=mask)  # eval: running stats
    assert torch.equal(y3, batchnorm.batch_norm(x, rm, rv, training=False))


def test_without_a_mask_it_is_batchnorm_and_eval_ignores_the_mask():
    masked, plain = batchnorm.MaskedBatchNorm2d(3), batchnorm.BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2)
    assert torch.equal(masked(x), plain(x))
    masked.eval(), plain.eval()
    assert torch.equal(masked(x, mask=torch.tensor([True, False, True, False])), plain(x))


def test_gradcheck_and_gradgradcheck_float64():
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(4, 3, dtype=torch.float64) + 0.1
    w = (torch.rand(2, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    f = lambda x, w, b: masked_batch_norm(x, None, None, w, b, training=True, mask=weights)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


BAD_MASKS = [
    (torch.ones(3, 5, dtype=torch.bool), ValueError, "mask must have shape"),
    (torch.ones(4, 6, dtype=torch.bool), ValueError, "mask must have shape"),
    (torch.ones(4, 5, dtype=torch.long), TypeError, "bool .* or floating point"),
    (-torch.ones(4, 5), ValueError, "finite and >= 0"),
    (torch.full((4, 5), float("nan")), ValueError, "finite and >= 0"),
    (torch.zeros(4, 5, dtype=torch.bool), ValueError, "selects 0 value"),
    (torch.eye(4, 5, dtype=torch.bool)[:1].expand(4, 5) & (torch.arange(4) == 0).unsqueeze(1),
     ValueError, "selects 1 value"),
]


@pytest.mark.parametrize("mask,err,msg", BAD_MASKS, ids=[m for *_, m in BAD_MASKS])
def test_bad_masks_raise_clearly_and_leave_state_untouched(mask, err, msg):
    bn = batchnorm.MaskedBatchNorm1d(3)
    bn(torch.randn(4, 3, 5))
    snap = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(err, match=msg):
        bn(torch.randn(4, 3, 5), mask=mask)
    assert all(torch.equal(v, snap[k]) for k, v in bn.state_dict().items())
    with pytest.raises(err, match=msg if "selects" not in msg else "training statistics need"):
        masked_batch_norm(torch.randn(4, 3, 5), bn.running_mean, bn.running_var, training=True, mask=mask)
    assert all(torch.equal(v, snap[k]) for k, v in bn.state_dict().items())
