"""The run store: resuming skips finished runs, --fresh redoes them, writes are atomic,
an interrupted lab keeps every run it finished, and a corrupt stored run is trained again.
The output folder: a report of other claims is kept unless --replace, a bad --out or bad
data stops the lab with exit code 2 before any training."""

from __future__ import annotations

import json
import os
import struct
import warnings
from pathlib import Path

import numpy as np

import pytest
from typer.testing import CliRunner

import batchnorm.lab.experiment as experiment
from batchnorm.cli import app
from batchnorm.lab.data import load
from batchnorm.lab.experiment import Context
from batchnorm.lab.experiments import c1_training
from batchnorm.lab.output import OutputError, prepare
from batchnorm.lab.store import RunStore, write_atomic
from batchnorm.lab.train import TrainSpec

SPEC = TrainSpec(widths=(8,), steps=6, eval_every=3, batch_size=16)


@pytest.fixture(scope="module")
def data():
    return load("gaussians")


@pytest.fixture
def count_training(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts the runs that are actually trained (not read from the store)."""
    calls: list[str] = []
    real = experiment.train

    def counting(spec, data, on_progress=None):
        calls.append(spec.label())
        return real(spec, data, on_progress)

    monkeypatch.setattr(experiment, "train", counting)
    return calls


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_write_atomic_writes_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b.json"
    write_atomic(path, "hello")
    write_atomic(path, b"bytes")
    assert path.read_bytes() == b"bytes"
    assert temporaries(tmp_path) == []
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_write_atomic_keeps_the_old_file_when_interrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "result.json"
    write_atomic(path, "old")

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, "new")
    assert path.read_text() == "old"
    assert temporaries(tmp_path) == []


def test_store_get_put_fresh(tmp_path: Path) -> None:
    key = RunStore.key(SPEC.to_json(), "data")
    assert key != RunStore.key({**SPEC.to_json(), "seed": 1}, "data")
    assert key != RunStore.key(SPEC.to_json(), "other data")
    store = RunStore(tmp_path)
    assert store.get("run", key) is None
    store.put("run", key, {"x": 1})
    assert store.get("run", key) == {"x": 1}
    fresh = RunStore(tmp_path, fresh=True)
    assert fresh.get("run", key) is None  # stored before: redo
    fresh.put("run", key, {"x": 2})
    assert fresh.get("run", key) == {"x": 2}  # stored by this session: reuse
    assert RunStore(tmp_path).get("run", key) == {"x": 2}


def test_context_trains_once_and_resumes(tmp_path: Path, data, count_training: list[str]) -> None:
    def context(fresh: bool = False) -> Context:
        return Context(c1_training, "smoke", data, tmp_path, RunStore(tmp_path, fresh=fresh))

    first = context().train(SPEC)
    assert len(count_training) == 1
    again = context().train(SPEC)
    assert len(count_training) == 1  # resumed: read from the store
    assert again.to_json() == first.to_json()
    ctx = context(fresh=True)
    redone = ctx.train(SPEC)
    ctx.train(SPEC)
    assert len(count_training) == 2  # --fresh trains again, once
    assert redone.test_accuracy == first.test_accuracy  # same seed, same result


def run_files(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}


def test_cli_resume_and_fresh(tmp_path: Path, count_training: list[str]) -> None:
    runner = CliRunner()
    args = ["lab", "--profile", "smoke", "--only", "C1", "--data", "gaussians", "--out", str(tmp_path)]
    assert runner.invoke(app, args).exit_code == 0
    trained = len(count_training)
    assert trained == 4  # two arms of the MLP and two of the conv net, one seed
    before = run_files(tmp_path)
    assert len(before) == 4
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(count_training) == trained and run_files(tmp_path) == before
    assert runner.invoke(app, [*args, "--fresh"]).exit_code == 0
    assert len(count_training) == 2 * trained
    after = run_files(tmp_path)
    assert after.keys() == before.keys() and all(after[k] != before[k] for k in before)


def test_interrupt_keeps_finished_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = experiment.train
    calls: list[str] = []

    def interrupted_on_second(spec, data, on_progress=None):
        calls.append(spec.label())
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(spec, data, on_progress)

    monkeypatch.setattr(experiment, "train", interrupted_on_second)
    runner = CliRunner()
    args = ["lab", "--profile", "smoke", "--only", "C1", "--data", "gaussians", "--out", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 130
    assert "run the same command again to resume" in " ".join(result.output.split())
    assert len(run_files(tmp_path)) == 1 and temporaries(tmp_path) == []
    assert not (tmp_path / "results.json").exists()
    monkeypatch.setattr(experiment, "train", lambda spec, data, on_progress=None: calls.append(spec.label()) or real(spec, data, on_progress))
    assert runner.invoke(app, args).exit_code == 0
    assert len(calls) == 5  # the interrupted run and the two never started, not the first one
    assert len(run_files(tmp_path)) == 4


def test_corrupt_stored_run_is_reported_and_counts_as_missing(tmp_path: Path) -> None:
    key = RunStore.key(SPEC.to_json(), "data")
    store = RunStore(tmp_path)
    path = store.put("run", key, {"x": 1})
    for content in [b'{"x": 1', b"", b"\xff\xfe", b"[1, 2]"]:  # truncated, empty, not UTF-8, not an object
        path.write_bytes(content)
        with pytest.warns(RuntimeWarning, match=rf"{path}: unreadable stored run .*training it again"):
            assert store.get("run", key) is None
    path.write_text('{"x": 1}')
    messages: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the callback replaces the warning
        assert RunStore(tmp_path, on_corrupt=messages.append).get("run", key, parse=lambda d: d["y"]) is None
    assert len(messages) == 1 and "KeyError" in messages[0] and str(path) in messages[0]


def squash(text: str) -> str:
    """``text`` without whitespace: rich wraps long paths anywhere."""
    return "".join(text.split())


def test_context_retrains_a_run_file_of_another_layout(tmp_path: Path, data, count_training: list[str]) -> None:
    first = Context(c1_training, "smoke", data, tmp_path, RunStore(tmp_path)).train(SPEC)
    (path,) = (tmp_path / "runs").glob("*.json")
    path.write_text('{"spec": {}, "loss": [1.0]}')  # valid JSON, not a RunResult
    with pytest.warns(RuntimeWarning, match=rf"{path}: unreadable stored run \(TypeError"):
        again = Context(c1_training, "smoke", data, tmp_path, RunStore(tmp_path)).train(SPEC)
    assert len(count_training) == 2 and again.test_accuracy == first.test_accuracy


def test_cli_retrains_a_truncated_run_file(tmp_path: Path, count_training: list[str]) -> None:
    runner = CliRunner()
    args = ["lab", "--profile", "smoke", "--only", "C1", "--data", "gaussians", "--out", str(tmp_path)]
    assert runner.invoke(app, args).exit_code == 0
    files = sorted((tmp_path / "runs").glob("*.json"))
    first = json.loads(files[0].read_text())
    files[0].write_text(files[0].read_text()[:40])  # what a full disk or a killed copy leaves
    (files[1].with_name("unrelated.json")).write_text("not json")  # not a key of this run: never read
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert squash(f"warning: {files[0]}: unreadable stored run (JSONDecodeError") in squash(result.output)
    assert len(count_training) == 5  # four runs (two arms of the MLP and of the conv net), then the corrupt one again
    retrained = json.loads(files[0].read_text())
    assert retrained == {**first, "seconds": retrained["seconds"]}  # the same run again (only its time differs)


def lab(out: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["lab", "--profile", "smoke", "--data", "gaussians", "--out", str(out), *args])
    return result.exit_code, squash(result.output)


def report_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and "runs" not in p.parts}


def test_another_report_in_the_folder_is_kept(tmp_path: Path, count_training: list[str]) -> None:
    assert lab(tmp_path, "--only", "C1")[0] == 0
    first = report_files(tmp_path)
    assert {"results.json", "index.html", "figures/C1_accuracy.png"} <= set(first)
    trained = len(count_training)
    # other claims: refused before any training, with what to do; the first report is untouched
    code, output = lab(tmp_path, "--only", "C4")
    assert code == 2
    assert squash(f"error: {tmp_path} holds the report of another run (claims C1, profile smoke, data gaussians); "
                  "this run (claims C4, profile smoke, data gaussians) would replace it. Nothing was run: use another "
                  "--out to keep both; report all of them in one run with --only C1 --only C4") in output
    assert squash("or add --replace to overwrite it") in output
    assert report_files(tmp_path) == first and len(count_training) == trained
    # another profile or data set with the same claims: refused too
    assert lab(tmp_path, "--only", "C1", "--profile", "quick")[0] == 2
    result = CliRunner().invoke(app, ["lab", "--profile", "smoke", "--data", "digits", "--only", "C1", "--out", str(tmp_path)])
    assert result.exit_code == 2 and squash("data digits") in squash(result.output)
    assert report_files(tmp_path) == first and len(count_training) == trained
    # the suggested command reports both claims, reusing C1's runs
    assert lab(tmp_path, "--only", "C1", "--only", "C4")[0] == 0
    assert len(count_training) == trained
    assert [c["id"] for c in json.loads((tmp_path / "results.json").read_text())["claims"]] == ["C1", "C4"]
    # --replace overwrites it, and deletes the old report's figures and tables that the new one does not list
    code, output = lab(tmp_path, "--only", "C4", "--replace")
    assert code == 0, output
    assert [c["id"] for c in json.loads((tmp_path / "results.json").read_text())["claims"]] == ["C4"]
    files = set(report_files(tmp_path))
    assert not any(f.startswith(("figures/C1_", "data/C1_")) for f in files) and "figures/C4_scale.png" in files
    assert len(list((tmp_path / "runs").glob("*.json"))) == 4  # the run store keeps C1's runs (MLP and conv net, two arms each)


def test_out_naming_a_file_stops_before_training(tmp_path: Path, count_training: list[str]) -> None:
    path = tmp_path / "report.html"
    path.write_text("mine")
    code, output = lab(path, "--only", "C1")
    assert code == 2 and squash(f"error: --out {path} is a file; expected a folder") in output
    code, output = lab(path / "sub", "--only", "C1")
    assert code == 2 and squash(f"cannot create the output folder {path / 'sub'}") in output
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "runs").write_text("x")
    code, output = lab(tmp_path / "out", "--only", "C1")
    assert code == 2 and squash(f"{tmp_path / 'out' / 'runs'} is a file; expected the lab's runs/ folder") in output
    assert path.read_text() == "mine" and count_training == []


def test_unreadable_results_or_foreign_index_is_kept(tmp_path: Path, count_training: list[str]) -> None:
    (tmp_path / "results.json").write_text('{"claims": [')
    code, output = lab(tmp_path, "--only", "C4")
    assert code == 2 and squash(f"{tmp_path / 'results.json'} cannot be read as a lab report (JSONDecodeError") in output
    assert squash("--replace to overwrite it") in output
    (tmp_path / "results.json").unlink()
    (tmp_path / "index.html").write_text("<html>my page</html>")
    code, output = lab(tmp_path, "--only", "C4")
    assert code == 2 and squash("index.html exists but") in output and squash("holds something other than a lab report") in output
    assert (tmp_path / "index.html").read_text() == "<html>my page</html>"
    assert lab(tmp_path, "--only", "C4", "--replace")[0] == 0
    assert "my page" not in (tmp_path / "index.html").read_text()


def test_replace_never_deletes_outside_the_report_folders(tmp_path: Path) -> None:
    outside = tmp_path / "keep.png"
    outside.write_bytes(b"png")
    out = tmp_path / "out"
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "C9_old.png").write_bytes(b"old")
    claim = {"id": "C9", "figures": ["../keep.png", "figures/C9_old.png", "/etc/hostname"], "tables": []}
    (out / "results.json").write_text(json.dumps({"profile": "smoke", "data": {"name": "gaussians"}, "claims": [claim]}))
    assert lab(out, "--only", "C4", "--replace")[0] == 0
    assert outside.read_bytes() == b"png" and not (out / "figures" / "C9_old.png").exists()


def test_prepare_is_the_same_check_for_the_python_api(tmp_path: Path) -> None:
    assert prepare(tmp_path / "new", ["C1"], "smoke", "gaussians") is None
    (tmp_path / "new" / "results.json").write_text(json.dumps({"profile": "smoke", "data": {"name": "gaussians"},
                                                               "claims": [{"id": "C1"}, {"id": "C2"}]}))
    assert prepare(tmp_path / "new", ["C2", "C1", "C5"], "smoke", "gaussians")["claims"][0]["id"] == "C1"  # extends it
    with pytest.raises(OutputError, match=r"claims C1, C2, .*this run \(claims C2, .*--only C1 --only C2 "):
        prepare(tmp_path / "new", ["C2"], "smoke", "gaussians")


def write_idx(path: Path, a: np.ndarray) -> None:
    path.write_bytes(bytes([0, 0, 0x08, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes())


def test_bad_data_stops_before_training_with_exit_2(tmp_path: Path, count_training: list[str]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    write_idx(data / "train-images-idx3-ubyte", rng.integers(0, 256, (40, 4, 4), dtype=np.uint8))
    write_idx(data / "train-labels-idx1-ubyte", rng.integers(0, 10, 40, dtype=np.uint8))
    write_idx(data / "t10k-images-idx3-ubyte", rng.integers(0, 256, (5, 4, 4), dtype=np.uint8))
    write_idx(data / "t10k-labels-idx1-ubyte", rng.integers(0, 10, 5, dtype=np.uint8))
    out = tmp_path / "out"
    runner = CliRunner()
    args = ["lab", "--profile", "smoke", "--only", "A1", "--only", "C1", "--data", "mnist", "--data-dir", str(data), "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert squash(f"error: IDX files in {data}: 40 training examples, fewer than A1's batch_size 60 in the smoke "
                  "profile; expected at least 60 training examples") in squash(result.output)
    write_idx(data / "t10k-images-idx3-ubyte", np.zeros((0, 4, 4), dtype=np.uint8))
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and squash("expected at least one image") in squash(result.output)
    assert count_training == [] and not (out / "results.json").exists()
