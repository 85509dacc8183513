"""`batchnorm bench`: the command runs, its JSON holds what the table shows, and the
summary's targets are computed from the rows (no timing is asserted)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from batchnorm import bench
from batchnorm.cli import app


def _row(name: str, group: str, native: float, ours: float, bound: float) -> dict:
    return {"name": name, "group": group, "op": "train", "native_ms": native, "ours_ms": ours,
            "bound_ms": bound, "speedup": native / ours}


def test_summary_targets_from_rows():
    rows = [
        _row("a", "resnet50", 4.0, 2.0, 1.0),   # 2.0x, 2.0x the bound, 4.0x at the bound
        _row("b", "resnet50", 3.0, 1.0, 1.0),   # 3.0x, 1.0x, 3.0x
        _row("c", "resnet50", 2.0, 2.0, 1.0),   # 1.0x, 2.0x, 2.0x
        _row("d", "tiny", 1.0, 2.0, 0.5),       # not a ResNet-50 row: 0.5x, the slowest
    ]
    s = bench.summarise(rows)
    assert s["resnet50_median_speedup"] == pytest.approx(2.0)
    assert s["resnet50_median_time_over_bound"] == pytest.approx(2.0)
    assert s["resnet50_median_speedup_at_bound"] == pytest.approx(3.0)
    assert s["slowest_case"] == {"name": "d", "op": "train", "speedup": 0.5}


def test_summary_without_resnet_rows_has_no_targets():
    s = bench.summarise([_row("d", "tiny", 1.0, 2.0, 0.5)])
    assert "resnet50_median_speedup" not in s
    assert s["slowest_case"]["name"] == "d"


def test_bench_command_writes_rows_and_summary(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        app, ["bench", "--cases", "tiny", "--reps", "2", "--json", str(out), "--markdown"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    rows = data["rows"]
    expected = [c for c in bench.default_cases(False) if c.group == "tiny"]
    assert [(r["name"], r["op"]) for r in rows] == [(c.name, c.op) for c in expected]
    for r in rows:
        assert r["native_ms"] > 0 and r["ours_ms"] > 0 and r["bound_ms"] > 0
        assert r["speedup"] == pytest.approx(r["native_ms"] / r["ours_ms"])
        assert r["pct_of_bound"] == pytest.approx(100 * r["bound_ms"] / r["ours_ms"])
        assert r["reps"] == 2
    assert data["summary"] == json.loads(json.dumps(bench.summarise(rows)))
    assert data["machine"]["cores"] >= 1
    assert "| shape | layout |" in result.output  # the --markdown table


def test_bench_command_rejects_unknown_cases(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--cases", "nosuchgroup", "--reps", "1"])
    assert result.exit_code == 2
    assert "no case matches --cases 'nosuchgroup'" in result.output
