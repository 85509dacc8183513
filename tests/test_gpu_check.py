"""The GPU check's CPU-side parts (benchmarks/gpu/): the model-step driver on small models,
the summary of a run's files, run.sh's argument checks and the comparison of the Triton
backend's two reduction paths. The whole script's dry run
(``bash benchmarks/gpu/run.sh OUT --dry-run``) takes minutes and is not run here."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))

import compare_paths  # noqa: E402
import model_step  # noqa: E402
import summarize  # noqa: E402
import tune  # noqa: E402


def test_model_step_converts_every_bn_and_trains_the_same_model(tmp_path):
    """Small stand-ins on CPU, eager: torch.nn and batchnorm's layers start from the same
    weights (same first loss), from_torch converts all 4 BN layers, every run is recorded
    and the summary reads them."""
    out = tmp_path / "ms.json"
    rc = model_step.main(["--device", "cpu", "--small", "--modes", "eager", "--batch", "4",
                          "--size", "16", "--steps", "1", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    runs = {(r["model"], r["impl"]): r for r in result["runs"]}
    assert len(runs) == 4 and all(r["ok"] for r in runs.values())
    for model in model_step.MODELS:
        nn_run, ours = runs[(model, "torch.nn")], runs[(model, "batchnorm")]
        assert (nn_run["bn_layers"], nn_run["converted"]) == (4, 0)
        assert (ours["bn_layers"], ours["converted"]) == (4, 4)
        assert ours["source"] == "small stand-in (--small)"
        # bf16 autocast, same weights and batch: the first losses agree to bf16 precision
        assert ours["first_loss"] == pytest.approx(nn_run["first_loss"], rel=1e-2)
        assert ours["losses_finite"] and ours["step_ms"] > 0
        assert "peak_mib" not in ours  # CUDA only
    targets = result["summary"]["targets"]
    assert targets["first losses agree (rel. diff < 2e-2)"] is True
    assert targets["cspdarknet53 eager lower peak memory than torch.nn"] is None  # no CUDA
    assert targets["resnet50 compiled at least as fast as torch.nn"] is None  # not run
    assert result["left_out"] == []


def test_model_step_leaves_out_what_does_not_fit_the_budget(tmp_path):
    out = tmp_path / "ms.json"
    rc = model_step.main(["--device", "cpu", "--small", "--models", "resnet50", "--budget-s",
                          "1", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["runs"] == []
    assert result["left_out"] == [f"resnet50 {impl} {mode}" for mode in ("eager", "compile")
                                  for impl in model_step.IMPLS]


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0"
failures="1" skipped="1" tests="3" time="2.5"><testcase classname="tests.test_cuda" name="test_a"
time="0.1" /><testcase classname="tests.test_cuda" name="test_b" time="0.1"><failure
message="AssertionError: Tensor-likes are not close!">details</failure></testcase><testcase
classname="tests.test_cuda" name="test_c" time="0"><skipped message="not run: limit" />
</testcase></testsuite></testsuites>"""


def test_summary_reports_steps_tests_and_missing_files(tmp_path):
    (tmp_path / "tests.xml").write_text(JUNIT)
    steps = tmp_path / "steps.tsv"
    steps.write_text("0\tenv\t0\t3\t30\n1\ttests\t124\t120\t120\n2\tbench\t1\t5\t100\n")
    assert summarize.main([str(tmp_path), str(steps)]) == 0
    result = json.loads((tmp_path / "summary.json").read_text())
    assert [s["status"] for s in result["steps"]] == ["ok", "timed out", "failed"]
    tests = result["tests"]
    assert (tests["tests"], tests["passed"], tests["failures"], tests["skipped"]) == (3, 1, 1, 1)
    assert tests["failed"] == ["tests.test_cuda::test_b [failure]: AssertionError: "
                               "Tensor-likes are not close!"]
    assert tests["skipped_reasons"] == ["not run: limit"]
    assert result["bench"] is None and result["model_step"] is None and result["env"] is None
    text = (tmp_path / "summary.md").read_text()
    assert "| 1 | tests | timed out (exit 124) | 120 | 120 |" in text
    assert "Tests: 1 passed, 1 failed, 0 errors, 1 skipped" in text


@pytest.mark.parametrize("args", [[], ["out", "--steps"], ["out", "--fast"],
                                  ["out", "--steps", "1 4"], ["out", "--budget", "ten"]])
def test_run_sh_says_how_to_call_it(args, tmp_path):
    done = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/run.sh"), *args],
                          capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 2
    assert "usage: bash benchmarks/gpu/run.sh OUTDIR [--dry-run]" in done.stderr
    assert not (tmp_path / "out").exists()


def test_run_sh_refuses_a_budget_below_the_steps_caps(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/run.sh"), str(tmp_path / "out"),
                           "--steps", "2 3", "--budget", "300"], capture_output=True,
                          text=True, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 2
    assert "steps '2 3' need 325s, more than the budget of 300s" in done.stdout + done.stderr


def _bench(tmp_path, path, times):
    rows = [dict(shape=shape, layout="nchw", dtype="float32", op="train fwd+bwd", ours_ms=ms)
            for shape, ms in times.items()]
    rows.append(dict(shape="2x3x4x4", layout="nchw", dtype="float32", op="eval fwd",
                     error="RuntimeError: x"))  # a failed case has no time
    (tmp_path / f"bench-{path}.json").write_text(json.dumps(dict(tuning=dict(path=path), rows=rows)))


def test_compare_paths_pairs_the_forced_runs(tmp_path):
    _bench(tmp_path, "split", {"32x64x112x112": 0.4, "32x256x7x7": 0.3})
    _bench(tmp_path, "whole", {"32x64x112x112": 0.8, "32x256x7x7": 0.1})
    _bench(tmp_path, "auto", {"32x64x112x112": 0.4, "32x256x7x7": 0.2})
    assert compare_paths.main([str(tmp_path)]) == 0
    table = json.loads((tmp_path / "paths.json").read_text())
    assert [(r["shape"], r["per_channel"]) for r in table] == [("32x256x7x7", 32 * 49),
                                                               ("32x64x112x112", 32 * 112 * 112)]
    small, large = table
    assert small["split_over_whole"] == pytest.approx(3.0)
    assert small["auto_over_best"] == pytest.approx(2.0)
    assert large["split_over_whole"] == pytest.approx(0.5)
    assert large["auto_over_best"] == pytest.approx(1.0)


def test_compare_paths_refuses_a_run_of_the_wrong_path(tmp_path):
    _bench(tmp_path, "split", {"32x64x56x56": 0.4})
    with pytest.raises(FileNotFoundError, match="bench-whole.json is missing"):
        compare_paths.compare(str(tmp_path))
    (tmp_path / "bench-whole.json").write_text(json.dumps(dict(tuning=dict(path="auto"), rows=[])))
    with pytest.raises(ValueError, match="expected a run with BATCHNORM_TRITON_PATH=whole, got"):
        compare_paths.compare(str(tmp_path))


def test_tune_sweeps_in_the_interpreter_and_keeps_only_agreeing_faster_tunings(tmp_path):
    """tune.py's dry run (Triton's interpreter, one tiny shape): the base tuning of each
    path is timed and checked against native BN, the budget leaves the rest out (listed),
    the kept tuning is the base or a timed candidate, and the module's tuning is restored."""
    pytest.importorskip("triton")
    out = tmp_path / "tune.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT / "src"))
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/gpu/tune.py"), "--dry-run", "--out", str(out),
         "--layouts", "channels_last", "--dtypes", "float32", "--reps", "1",
         "--budget-s", "0"],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert set(result["sweeps"]) == {"channels_last split", "channels_last whole"}
    for key, entry in result["sweeps"].items():
        assert "error" not in entry["base"] and entry["base"]["objective"] > 0
        assert entry["best"]["path"] == key.split()[1]
        assert entry["candidates"] == []  # budget 0: every candidate left out, and listed
    assert len(result["left_out"]) == sum(
        len([v for v in tune.DRY_SPACE[p] if v != result["base"][p]])
        for key in (("channels_last", "split"), ("channels_last", "whole"))
        for p in tune.PARAMS[key])
