"""The lab's experiments C3, C6-C16 run end to end in the smoke profile with evidence for
every stated condition, and the README table is generated from a results.json (never typed in)."""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from batchnorm.lab.data import load
from batchnorm.lab.experiment import VERDICTS, ClaimResult, Condition, Context, verdict
from batchnorm.lab.experiments import MODULES
from batchnorm.lab.measure import checkpoint_matrix
from batchnorm.lab.models import mlp
from batchnorm.lab.results import finite
from batchnorm.lab.store import RunStore
from batchnorm.lab.summary import END, START, markdown_table, replace_block
from batchnorm.lab.train import RunResult, TrainSpec, few_class_batch, train

PART2 = ("c3_lr_multipliers", "c6_noisy_bn", "c7_covariate_shift", "c8_smoothness", "c9_small_batches", "c10_ghost",
         "c11_precise_bn", "c12_adabn", "c13_tent", "c14_memory", "c15_placement", "c16_folding")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data():
    return load("gaussians")


@pytest.fixture(scope="module")
def lab_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("lab")


def test_every_experiment_states_its_rule_and_has_five_seeds_in_full() -> None:
    assert set(PART2) <= set(MODULES)
    for name in MODULES:
        module = importlib.import_module(f"batchnorm.lab.experiments.{name}")
        assert module.Config.full().seeds >= 5 and module.Config.smoke().seeds == 1, name
        assert module.CONDITIONS and all(isinstance(c, Condition) and c.reason for c in module.CONDITIONS), name
        assert len({c.key for c in module.CONDITIONS}) == len(module.CONDITIONS), name
        assert module.PAPER and all(len(p) == 2 for p in module.PAPER), name
        assert "Rule history" in module.__doc__ or all(c.check for c in module.CONDITIONS), name


@pytest.mark.parametrize("name", PART2)
def test_smoke_profile_gives_a_complete_result(name: str, data, lab_dir: Path) -> None:
    module = importlib.import_module(f"batchnorm.lab.experiments.{name}")
    torch.set_num_threads(1)
    result = module.run(Context(module, "smoke", data, lab_dir, RunStore(lab_dir)))
    assert isinstance(result, ClaimResult)
    assert result.id == module.ID and result.title == module.TITLE and result.claim == module.CLAIM
    assert result.verdict in VERDICTS and result.verdict == verdict(result.evidence)
    assert [e["key"] for e in result.evidence] == [c.key for c in module.CONDITIONS]
    for e in result.evidence:  # one seed: a finding has no interval and is undecided
        assert e["low"] is None and e["high"] is None and len(e["values"]) == 1
        assert e["holds"] is None or e["check"]
    assert len(result.paper) == len(module.PAPER) and all(p["here"] for p in result.paper)
    assert result.summary and result.metrics
    assert len(result.captions) == len(result.figures) and all(result.captions)
    assert result.figures and all((lab_dir / f).is_file() and (lab_dir / f).stat().st_size > 0 for f in result.figures)
    assert result.tables and all((lab_dir / t).is_file() for t in result.tables)
    assert result.seeds == [0]
    json.dumps(finite(result.to_json()), allow_nan=False)


def test_two_class_batches_hold_two_classes(data) -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        index = few_class_batch(data.y_train, 2, 32, g)
        assert len(index) == 32 and len(index.unique()) == 32
        assert len(data.y_train[index].unique()) <= 2
    with pytest.raises(ValueError, match="classes_per_batch 11: expected 0"):
        train(TrainSpec(steps=1, classes_per_batch=11), data)


def test_noisy_bn_adds_noise_in_training_only() -> None:
    model = mlp(8, (6,), 3, norm="noisy", seed=0)
    norm = model.blocks[0].norm
    x = torch.randn(16, 6)
    torch.manual_seed(0)
    noisy = norm.train()(x)
    plain = norm.bn(x)
    assert not torch.allclose(noisy, plain)
    norm.eval()
    assert torch.equal(norm(x), norm.bn(x))


def test_dropout_and_seeded_runs_are_reproducible(data) -> None:
    spec = TrainSpec(widths=(8,), steps=5, eval_every=5, dropout=0.5, norm="noisy")
    a, b = train(spec, data), train(spec, data)
    assert a.train_loss == b.train_loss
    assert a.train_loss != train(TrainSpec(widths=(8,), steps=5, eval_every=5, dropout=0.5, norm="noisy", seed=1), data).train_loss


def test_a_run_diverging_between_checkpoints_keeps_its_last_value() -> None:
    ok = RunResult({}, [], [], [0, 20, 40], [0.1, 0.5, 0.6], [2.0, 1.0, 0.9])
    diverged = RunResult({}, [], [], [0, 20, 29], [0.1, 0.3, 0.0], [2.0, 1.5, float("nan")], diverged_at=29)
    steps, values = checkpoint_matrix([diverged, ok])
    assert steps.tolist() == [0, 20, 40]
    assert values.tolist() == [[0.1, 0.3, 0.0], [0.1, 0.5, 0.6]]


def _results(profile: str = "full") -> dict:
    evidence = [{"key": "gap", "condition": "batch 4: Renorm minus BN > 0", "estimate": 0.084, "low": 0.05, "high": 0.118,
                 "threshold": 0.0, "holds": True},
                {"key": "two", "condition": "2-class | Renorm minus BN > 0", "estimate": 0.01, "low": -0.02, "high": 0.04,
                 "threshold": 0.0, "holds": None}]
    claim = {"id": "C9", "title": "Renorm | small batches", "summary": "BN 50.1%,\nRenorm 60.2%", "verdict": "inconclusive",
             "kind": "finding", "seeds": [0, 1, 2, 3, 4], "evidence": evidence,
             "paper": [{"setting": "ImageNet, groups of 4", "paper": "74.2% / 76.5%", "here": "50.1% / 60.2%"}]}
    check = {"id": "A1", "title": "Formula", "summary": "within 1e-7", "verdict": "supported", "kind": "check",
             "seeds": [0], "paper": [], "evidence": [{"key": "e", "condition": "error < 1e-05", "estimate": 1e-7, "low": None,
                                                      "high": None, "threshold": 1e-5, "holds": True}]}
    other = {**claim, "id": "C10", "title": "Ghost", "summary": "gap 1%", "verdict": "not supported",
             "evidence": [{**evidence[0], "holds": False}]}
    return {"profile": profile, "indicative": profile != "full", "command": "batchnorm lab --profile full --out lab-full",
            "seconds": 1200.0, "data": {"name": "mnist1d", "sha256": "ab" * 32}, "commit": {"sha": "0123456789abcdef", "dirty": False},
            "machine": {"cpus": 2}, "claims": [check, claim, other]}


def test_markdown_table_has_one_row_per_claim_with_its_conditions() -> None:
    table = markdown_table(_results())
    lines = table.splitlines()
    assert "`batchnorm lab --profile full --out lab-full`" in lines[0] and "commit 0123456789" in lines[0]
    assert "Findings: 0 supported, 1 not supported, 1 inconclusive; property checks: 1 passed" in lines[0]
    assert "1-5 seed(s) per experiment" in lines[0]
    assert lines[2] == "| Claim | Paper → here | Measured | Conditions | Verdict |"
    assert lines[4].startswith("| A1 Formula (check) |") and lines[4].endswith("| supported |")
    assert lines[5] == ("| C9 Renorm \\| small batches | ImageNet, groups of 4: 74.2% / 76.5% → 50.1% / 60.2% | "
                        "BN 50.1%, Renorm 60.2% | batch 4: Renorm minus BN > 0: 0.084 [0.05, 0.118] → held<br>"
                        "2-class \\| Renorm minus BN > 0: 0.01 [-0.02, 0.04] → *undecided* | *inconclusive* |")
    assert lines[6].endswith("→ **failed** | **not supported** |")
    with pytest.raises(ValueError, match="no claims"):
        markdown_table({"claims": []})


def test_long_summaries_are_never_cut() -> None:
    results = _results()
    results["claims"][1]["summary"] = "; ".join(f"setting {i}: 12.3% vs 45.6%" for i in range(40))
    row = markdown_table(results).splitlines()[5]
    assert "setting 39: 12.3% vs 45.6%" in row and "…" not in row


def test_replace_block_keeps_the_rest_and_needs_both_markers() -> None:
    text = f"intro\n{START}\nold table\n{END}\noutro\n"
    assert replace_block(text, "new\n") == f"intro\n{START}\nnew\n{END}\noutro\n"
    for bad in ("no markers", f"{START} only", f"{END} then {START}", f"{START}{START}{END}"):
        with pytest.raises(ValueError, match="marker"):
            replace_block(bad, "x")


def test_readme_script_updates_only_the_marked_block(tmp_path: Path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("readme_table", ROOT / "scripts" / "readme_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n{START}\nstale\n{END}\nfooter\n")
    results_json = tmp_path / "results.json"
    args = [str(results_json), "--readme", str(readme)]

    results_json.write_text(json.dumps(_results("quick")))
    assert script.main(args) == 2
    assert "'quick' profile" in capsys.readouterr().err and "stale" in readme.read_text()

    results_json.write_text(json.dumps(_results("full")))
    assert script.main(args) == 0
    text = readme.read_text()
    assert text.startswith("# title\n") and text.endswith(f"{END}\nfooter\n") and "stale" not in text
    assert markdown_table(_results("full")).rstrip() in text


def _percentile_run(p15: list[float], p50: list[float], p85: list[float]) -> RunResult:
    probes = {"unit_percentiles": [{"p15": [a], "p50": [b], "p85": [c]} for a, b, c in zip(p15, p50, p85)]}
    steps = list(range(0, 100 * len(p50), 100))
    return RunResult({}, [], [], steps, [0.0] * len(steps), [0.0] * len(steps), probes)


def test_c2_drift_is_in_widths_net_and_total() -> None:
    from batchnorm.lab.experiments.c2_distribution import drift

    # the first checkpoint (step 0) is before 10% of training and not counted
    run = _percentile_run([9, 0, 1, 0, 2], [9, 1, 2, 1, 3], [9, 2, 3, 2, 4])  # width 2, median 1 -> 2 -> 1 -> 3
    net, total = drift(run)
    assert net == pytest.approx(1.0) and total == pytest.approx(2.0)  # |3 - 1| / 2; (1 + 1 + 2) / 2
    scaled = _percentile_run(*(list(np.multiply(v, 10.0)) for v in ([9, 0, 1, 0, 2], [9, 1, 2, 1, 3], [9, 2, 3, 2, 4])))
    assert drift(scaled) == pytest.approx((net, total))  # scale-free: a growing gamma is not drift


def test_c3_reads_first_reach_on_a_trailing_mean() -> None:
    from batchnorm.lab.experiments.c3_lr_multipliers import first_reach, smooth

    acc = np.asarray([[0.0, 0.9, 0.0, 0.6, 0.6, 0.6]])
    assert smooth(acc)[0].tolist() == pytest.approx([0.0, 0.45, 0.3, 0.5, 0.4, 0.6])
    steps = np.arange(6) * 10
    assert first_reach(steps, smooth(acc)[0], 0.5, 99.0) == 30.0  # the lone 0.9 at step 10 does not count
    assert first_reach(steps, smooth(acc)[0], 0.7, 99.0) == 99.0  # never reached: censored
