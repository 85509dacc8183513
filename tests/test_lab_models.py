"""The lab's models, training engine and probes: both arms start from the same weights,
runs are reproducible, divergence is recorded, probes leave the model as they found it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from batchnorm.lab.data import load
from batchnorm.lab.experiment import decide
from batchnorm.lab.experiments import c4_scale_invariance
from batchnorm.lab.measure import checkpoint_matrix, steps_to
from batchnorm.lab.models import NORMS, make_norm, mlp, register_norm
from batchnorm.lab.probes import PROBES
from batchnorm.lab.train import RunResult, TrainSpec, build_model, train
from batchnorm.modules import BatchNorm1d


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


def test_decide() -> None:
    assert decide(True, False) == "supported"
    assert decide(False, True) == "not supported"
    assert decide(False, False) == "inconclusive"


def test_scale_invariance_is_exact_without_eps() -> None:
    """C4: BN(aWu) = BN(Wu) and a dL/d(aW) = dL/dW, float64, eps = 0, our BatchNorm1d."""
    cfg = c4_scale_invariance.Config.quick()
    gen = torch.Generator().manual_seed(0)
    u, w, r = torch.randn(60, 40, generator=gen), torch.randn(100, 40, generator=gen), torch.randn(60, 100, generator=gen)
    rows = c4_scale_invariance.errors(cfg, u, w, r, torch.float64, eps=0.0)
    assert [row["scale"] for row in rows] == list(cfg.scales)
    assert max(max(row["output"], row["gradient"]) for row in rows) < 1e-12
    # and the check can fail: a non-scalar change of W is seen
    y1, g1 = c4_scale_invariance.output_and_grad(BatchNorm1d(100, eps=0.0, affine=False).double(), w.double(), u.double(), r.double())
    y2, _ = c4_scale_invariance.output_and_grad(BatchNorm1d(100, eps=0.0, affine=False).double(), (w + 0.1).double(), u.double(), r.double())
    assert (y1 - y2).abs().max() > 1e-3


def test_kaiming_init_is_he_normal_and_shared_across_arms() -> None:
    plain = mlp(400, (300, 300), 10, activation="relu", init="kaiming", seed=2)
    normed = mlp(400, (300, 300), 10, activation="relu", norm="ours", init="kaiming", seed=2)
    w = plain.blocks[0].linear.weight
    assert abs(float(w.detach().std()) - math.sqrt(2 / 400)) < 0.02 * math.sqrt(2 / 400)
    assert torch.equal(w, normed.blocks[0].linear.weight) and not plain.blocks[1].linear.bias.any()
    with pytest.raises(ValueError, match="unknown init 'xavier'"):
        mlp(4, (4,), 2, init="xavier")
