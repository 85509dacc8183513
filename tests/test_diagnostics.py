"""diagnose / watch: each misuse is flagged, a clean model is not, nothing is changed."""

import warnings

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.diagnostics import BNMisuseWarning

BN = {"torch": (nn.BatchNorm2d, nn.BatchNorm1d), "ours": (batchnorm.BatchNorm2d, batchnorm.BatchNorm1d)}


def _model(impl):
    bn2d, bn1d = BN[impl]
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), bn2d(6), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5), bn1d(5))


def _data(k=6, n=32, scale=1.0, shift=0.0):
    return [torch.randn(n, 3, 8, 8) * scale + shift for _ in range(k)]


def _clean(impl):
    return batchnorm.recalibrate(_model(impl), _data(), progress=False)


@pytest.mark.parametrize("impl", ["torch", "ours"])
def test_a_clean_model_has_no_findings(impl):
    model = _clean(impl)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = batchnorm.diagnose(model, _data(k=4))
    assert report.ok and report.findings == [], str(report)
    assert [r.name for r in report.rows] == ["1", "6"]
    assert all(r.mean_shift is not None and r.kinds == [] for r in report.rows)
    for k, v in model.state_dict().items():  # diagnose changes nothing
        assert torch.equal(v, state[k])
    assert not model.training
    handle = batchnorm.watch(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BNMisuseWarning)
        with torch.no_grad():
            model(_data(k=1)[0])  # evaluation
        model.train()
        model(_data(k=1)[0]).sum().backward()  # a training step
    assert handle.findings == []


@pytest.mark.parametrize("impl", ["torch", "ours"])
def test_statistics_never_updated(impl):
    model = _model(impl).eval()
    report = batchnorm.diagnose(model)
    assert report.kinds() == {"never_updated"} and len(report.findings) == 2
    assert "still mean 0, variance 1" in report.findings[0].message
    handle = batchnorm.watch(model)
    with pytest.warns(BNMisuseWarning, match="never updated"):
        model(_data(k=1)[0])
    assert {f.kind for f in handle.findings} == {"never_updated"}


@pytest.mark.parametrize("impl", ["torch", "ours"])
def test_evaluation_in_train_mode(impl):
    model = _clean(impl).train()
    handle = batchnorm.watch(model)
    with pytest.warns(BNMisuseWarning, match="model.eval"):
        with torch.no_grad():
            model(_data(k=1)[0])
    assert [f.kind for f in handle.findings] == ["eval_in_train_mode"] * 2
    handle.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error", BNMisuseWarning)
        with torch.no_grad():
            model(_data(k=1)[0])  # hooks removed


def test_batch_of_one_in_training():
    model = _clean("ours").train()
    bn2d = model[1]
    handle = batchnorm.watch(bn2d)
    with pytest.warns(BNMisuseWarning, match="batch of one"):
        bn2d(torch.randn(1, 6, 4, 4))
    assert [f.kind for f in handle.findings] == ["batch_of_one"]


@pytest.mark.parametrize("impl", ["torch", "ours"])
def test_train_eval_gap(impl):
    model = _clean(impl)
    shifted = _data(k=2, scale=3.0, shift=2.0)
    report = batchnorm.diagnose(model, shifted)
    assert "train_eval_gap" in report.kinds()
    assert report.rows[0].mean_shift > 1 and "recalibrate" in report.findings[0].message
    batchnorm.watch(model)
    with pytest.warns(BNMisuseWarning, match="far from the running"):
        with torch.no_grad():
            model(shifted[0])


def test_dead_channels_and_non_finite_statistics():
    model = _clean("torch")
    with torch.no_grad():
        model[1].weight[[2, 4]] = 0.0
        model[6].running_var[1] = float("nan")
    report = batchnorm.diagnose(model)
    assert report.rows[0].dead == [2, 4] and report.rows[0].kinds == ["dead_channels"]
    assert report.rows[1].kinds == ["non_finite"]


def test_the_table_is_readable():
    model = _model("torch").eval()
    with torch.no_grad():
        model[1].weight[0] = 0.0
    text = str(batchnorm.diagnose(model))
    lines = text.splitlines()
    assert lines[0].split() == ["layer", "type", "mode", "C", "batches", "dead", "mean",
                                "shift", "var", "ratio", "issues"]
    assert lines[2].split()[:6] == ["1", "BatchNorm2d", "eval", "6", "0", "1"]
    assert "never_updated, dead_channels" in lines[2]
    assert "2 BN layer(s), 3 finding(s)" in text
    rich = pytest.importorskip("rich.console")
    console = rich.Console(record=True, width=140)
    console.print(batchnorm.diagnose(model))
    assert "BatchNorm2d" in console.export_text()
