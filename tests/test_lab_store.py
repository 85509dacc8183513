"""The run store: resuming skips finished runs, --fresh redoes them, writes are atomic,
and an interrupted lab keeps every run it finished."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

import batchnorm.lab.experiment as experiment
from batchnorm.cli import app
from batchnorm.lab.data import load
from batchnorm.lab.experiment import Context
from batchnorm.lab.experiments import c1_training
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
