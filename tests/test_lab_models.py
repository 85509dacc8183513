"""The lab's models, training engine and probes: both arms start from the same weights,
runs are reproducible, divergence is recorded, probes leave the model as they found it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from batchnorm.lab.data import load
from batchnorm.lab.experiment import Condition, evidence, interval, judge, verdict
from batchnorm.lab.experiments import c4_scale_invariance
from batchnorm.lab.measure import checkpoint_matrix, steps_to
from batchnorm.lab.models import NORMS, NORMS_2D, ConvNet, convnet, make_norm, mlp, register_norm
from batchnorm.lab.probes import PROBES
from batchnorm.lab.train import RunResult, TrainSpec, build_model, train
from batchnorm import BatchNorm1d, BatchNorm2d


@pytest.fixture(scope="module")
def data():
    return load("gaussians")


@pytest.mark.parametrize(("norm", "placement"), [("ours", "before"), ("torch", "before"), ("ours", "after")])
def test_arms_start_from_the_same_weights(norm: str, placement: str) -> None:
    plain = mlp(40, (16, 16), 10, activation="sigmoid", seed=3)
    normed = mlp(40, (16, 16), 10, activation="sigmoid", norm=norm, placement=placement, seed=3)
    for a, b in zip(plain.blocks, normed.blocks):
        assert torch.equal(a.linear.weight, b.linear.weight)
        assert (b.linear.bias is None) == (placement == "before")
    assert torch.equal(plain.head.weight, normed.head.weight) and torch.equal(plain.head.bias, normed.head.bias)
    assert not torch.equal(plain.blocks[0].linear.weight, mlp(40, (16, 16), 10, seed=4).blocks[0].linear.weight)


def test_the_bn_arm_uses_our_batchnorm() -> None:
    model = mlp(40, (8,), 10, norm="ours")
    assert type(model.blocks[0].norm) is BatchNorm1d
    assert type(mlp(40, (8,), 10, norm="torch").blocks[0].norm) is nn.BatchNorm1d


def test_building_leaves_the_global_generator_alone() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    mlp(40, (8,), 10, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_bad_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown norm kind 'nope': expected one of"):
        make_norm("nope", 4)
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        mlp(4, (4,), 2, activation="gelu")
    with pytest.raises(ValueError, match="unknown placement 'inside'"):
        mlp(4, (4,), 2, norm="ours", placement="inside")


def test_a_new_norm_kind_is_one_registration() -> None:
    @register_norm("layer-test")
    def _layer(num_features: int) -> nn.Module:
        return nn.LayerNorm(num_features)

    try:
        model = mlp(40, (8, 8), 10, norm="layer-test")
        assert all(isinstance(b.norm, nn.LayerNorm) for b in model.blocks)
    finally:
        del NORMS["layer-test"]


@pytest.mark.parametrize("placement", ["before", "after"])
def test_preactivations_are_the_activation_inputs(placement: str) -> None:
    model = mlp(40, (8, 6), 10, activation="sigmoid", norm="ours", placement=placement).train()
    x = torch.randn(32, 40)
    logits, zs = model.preactivations(x)
    torch.testing.assert_close(logits, model(x))
    z0 = model.blocks[0].linear(x)
    torch.testing.assert_close(zs[0], model.blocks[0].norm(z0) if placement == "before" else z0)
    assert [z.shape[1] for z in zs] == [8, 6]


def test_training_is_reproducible_and_learns(data) -> None:
    spec = TrainSpec(widths=(32,), activation="relu", norm="ours", lr=0.1, steps=60, eval_every=20, batch_size=32)
    a, b = train(spec, data), train(spec, data)
    assert a.train_loss == b.train_loss and a.test_accuracy == b.test_accuracy
    assert a.eval_steps == [0, 20, 40, 60] and len(a.train_loss) == 60
    assert a.final_test_accuracy > 0.2  # ten balanced classes: chance is 0.1
    assert RunResult.from_json(a.to_json()) == a


def test_divergence_is_recorded(data) -> None:
    spec = TrainSpec(widths=(32, 32), activation="relu", lr=1e6, steps=50, eval_every=10, batch_size=32)
    r = train(spec, data)
    assert r.diverged_at is not None and r.diverged_at < 50
    assert not math.isfinite(r.train_loss[-1]) and r.eval_steps[-1] == r.diverged_at
    assert r.final_test_accuracy <= 0.2


@pytest.mark.parametrize("name", sorted(PROBES))
def test_probes_leave_the_model_untouched(data, name: str) -> None:
    spec = TrainSpec(widths=(8, 8), norm="ours", seed=1)
    model = build_model(spec, data).eval()
    model(data.x_train[:64]).sum()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    out = PROBES[name](model, data)
    assert not model.training
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    assert all(p.grad is None for p in model.parameters())
    assert out and all(isinstance(v, list) for v in out.values())


def test_unit_percentiles_match_numpy(data) -> None:
    model = build_model(TrainSpec(widths=(8, 5), norm="ours"), data)
    p = PROBES["unit_percentiles"](model, data)
    with torch.no_grad():
        _, zs = model.train().preactivations(data.x_test[:1000])
    expected = np.percentile(zs[-1].double().numpy(), [15, 50, 85], axis=0)
    np.testing.assert_allclose([p["p15"], p["p50"], p["p85"]], expected, rtol=1e-12, atol=1e-12)


def test_checkpoint_matrix_pads_a_diverged_run() -> None:
    def run(acc: list[float]) -> RunResult:
        return RunResult({}, [], [], [0, 10, 20][: len(acc)], acc, acc)

    steps, m = checkpoint_matrix([run([0.1, 0.5, 0.7]), run([0.1, 0.0])])
    assert steps.tolist() == [0, 10, 20] and m.tolist() == [[0.1, 0.5, 0.7], [0.1, 0.0, 0.0]]
    assert steps_to(steps, m[0], 0.5) == 10 and steps_to(steps, m[1], 0.5) is None


def test_interval_is_the_student_t_interval() -> None:
    from scipy import stats

    values = [0.1, 0.3, 0.2, 0.25, 0.15]
    mean, low, high = interval(values)
    sem = np.std(values, ddof=1) / math.sqrt(5)
    t = stats.t.ppf(0.975, 4)  # 2.776
    assert mean == pytest.approx(0.2) and low == pytest.approx(0.2 - t * sem) and high == pytest.approx(0.2 + t * sem)
    # ratios: geometric mean and the exponentiated interval of the logs
    g, gl, gh = interval([2.0, 8.0], log=True)
    m, ml, mh = interval([math.log(2.0), math.log(8.0)])
    assert g == pytest.approx(4.0) and gl == pytest.approx(math.exp(ml)) and gh == pytest.approx(math.exp(mh))
    assert interval([0.5]) == (0.5, None, None)  # one seed: no interval
    assert interval([0.25, 0.25, 0.25]) == (0.25, 0.25, 0.25)  # no spread: a zero-width interval
    mean, low, high = interval([1.0, float("nan")])
    assert math.isnan(mean) and low is None and high is None
    with pytest.raises(ValueError, match="no values"):
        interval([])


def test_a_condition_holds_fails_or_is_undecided_by_its_interval() -> None:
    above = Condition("k", "gap", ">", 0.0, "sign")
    assert judge(above, 0.1, 0.05, 0.15) is True
    assert judge(above, -0.1, -0.15, -0.05) is False
    assert judge(above, 0.02, -0.01, 0.05) is None and judge(above, 0.02, None, None) is None
    below = Condition("k", "ratio", "<", 10.0, "one order", log=True)
    assert judge(below, 2.0, 1.5, 3.0) is True and judge(below, 20.0, 12.0, 30.0) is False
    within = Condition("k", "gap", "within", 0.05, "close")
    assert judge(within, 0.0, -0.02, 0.03) is True
    assert judge(within, 0.1, 0.07, 0.13) is False and judge(within, -0.1, -0.13, -0.07) is False
    assert judge(within, 0.04, 0.02, 0.06) is None
    check = Condition("k", "error", "<", 1e-5, "rounding", check=True)
    assert judge(check, 1e-7, None, None) is True and judge(check, 1e-3, None, None) is False
    with pytest.raises(ValueError, match="op '>='"):
        Condition("k", "x", ">=", 0.0, "r")
    with pytest.raises(ValueError, match="positive threshold"):
        Condition("k", "x", ">", 0.0, "r", log=True)


def test_evidence_and_verdict_follow_mechanically() -> None:
    e = evidence(Condition("gap", "BN minus no BN", ">", 0.0, "sign"), [0.1, 0.2, 0.15, 0.12, 0.18])
    assert set(e) >= {"condition", "estimate", "low", "high", "threshold", "holds"}
    assert e["holds"] is True and e["low"] > 0 and e["values"] == [0.1, 0.2, 0.15, 0.12, 0.18]
    c = evidence(Condition("err", "error", "<", 1e-5, "rounding", check=True), 3e-7)
    assert c["low"] is None and c["high"] is None and c["holds"] is True
    held, failed, open_ = {"holds": True}, {"holds": False}, {"holds": None}
    assert verdict([held, held]) == "supported"
    assert verdict([held, failed, open_]) == "not supported"
    assert verdict([held, open_]) == "inconclusive"
    with pytest.raises(ValueError, match="at least one condition"):
        verdict([])


def test_scale_invariance_is_exact_without_eps() -> None:
    """C4: BN(aWu) = BN(Wu) and a dL/d(aW) = dL/dW, float64, our BatchNorm1d, with
    EXACT_EPS (training refuses eps = 0), which float64 does not see: var + eps == var."""
    cfg = c4_scale_invariance.Config.quick()
    eps = c4_scale_invariance.EXACT_EPS
    gen = torch.Generator().manual_seed(0)
    u, w, r = torch.randn(60, 40, generator=gen), torch.randn(100, 40, generator=gen), torch.randn(60, 100, generator=gen)
    for a in cfg.scales:  # the premise: every batch variance absorbs eps, as with eps = 0
        var = torch.var((a * u.double()) @ w.double().T, dim=0, correction=0)
        assert torch.equal(var + eps, var)
    rows = c4_scale_invariance.errors(cfg, u, w, r, torch.float64, eps=eps)
    assert [row["scale"] for row in rows] == list(cfg.scales)
    assert max(max(row["output"], row["gradient"]) for row in rows) < 1e-12
    # and the check can fail: a non-scalar change of W is seen
    y1, g1 = c4_scale_invariance.output_and_grad(BatchNorm1d(100, eps=eps, affine=False).double(), w.double(), u.double(), r.double())
    y2, _ = c4_scale_invariance.output_and_grad(BatchNorm1d(100, eps=eps, affine=False).double(), (w + 0.1).double(), u.double(), r.double())
    assert (y1 - y2).abs().max() > 1e-3


def test_kaiming_init_is_he_normal_and_shared_across_arms() -> None:
    plain = mlp(400, (300, 300), 10, activation="relu", init="kaiming", seed=2)
    normed = mlp(400, (300, 300), 10, activation="relu", norm="ours", init="kaiming", seed=2)
    w = plain.blocks[0].linear.weight
    assert abs(float(w.detach().std()) - math.sqrt(2 / 400)) < 0.02 * math.sqrt(2 / 400)
    assert torch.equal(w, normed.blocks[0].linear.weight) and not plain.blocks[1].linear.bias.any()
    with pytest.raises(ValueError, match="unknown init 'xavier'"):
        mlp(4, (4,), 2, init="xavier")


def test_conv_net_views_rows_as_images_and_shares_weights_across_arms() -> None:
    plain = convnet((1, 8, 8), (4, 8), 10, seed=1)
    normed = convnet((1, 8, 8), (4, 8), 10, norm="ours", seed=1)
    assert isinstance(plain, ConvNet) and isinstance(normed.blocks[0].norm, BatchNorm2d)
    assert torch.equal(plain.blocks[0].linear.weight, normed.blocks[0].linear.weight)
    assert normed.blocks[0].linear.bias is None and plain.blocks[0].linear.bias is not None
    x = torch.randn(6, 64)
    logits, zs = normed.preactivations(x)
    assert logits.shape == (6, 10) and [z.shape for z in zs] == [(6, 4, 8, 8), (6, 8, 4, 4)]
    assert torch.allclose(normed(x), logits)
    # the same numbers as torch.nn's conv net built by hand
    ref = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), plain.blocks[0].linear, nn.ReLU(), plain.blocks[1].linear, nn.ReLU())
    assert torch.allclose(plain.head(ref(x).mean(dim=(2, 3))), plain(x), atol=1e-6)
    assert set(NORMS_2D) >= {"none", "ours", "torch", "noisy"}
    with pytest.raises(ValueError, match="unknown norm kind 'ghost' for images"):
        convnet((1, 8, 8), (4,), 10, norm="ghost")
    with pytest.raises(ValueError, match="expected \\(channels, height, width\\)"):
        convnet((64,), (4,), 10)


def test_conv_runs_need_images_and_learn_digits() -> None:
    digits = load("digits")
    assert digits.image_shape == (1, 8, 8)
    spec = TrainSpec(arch="conv", widths=(8, 16), activation="relu", init="kaiming", norm="ours", lr=0.2, steps=150,
                     eval_every=50)
    r = train(spec, digits)
    assert r.test_accuracy[-1] > 0.5 > r.test_accuracy[0]
    with pytest.raises(ValueError, match="a conv net needs images"):
        build_model(spec, load("gaussians"))
    with pytest.raises(ValueError, match="unknown arch 'rnn'"):
        build_model(TrainSpec(arch="rnn"), digits)


def test_saturating_init_saturates_sigmoids(data) -> None:
    model = mlp(data.n_features, (100,) * 4, 10, activation="sigmoid", init="saturating", seed=0)
    _, zs = model.preactivations(data.x_test[:500])
    assert all((z.abs() > 4).double().mean() > 0.2 for z in zs)
    default = mlp(data.n_features, (100,) * 4, 10, activation="sigmoid", seed=0)
    _, zs = default.preactivations(data.x_test[:500])
    assert all((z.abs() > 4).double().mean() < 0.01 for z in zs)
