"""The lab end to end on the "smoke" profile: the command runs every experiment, writes a
results.json with the documented schema and an index.html that loads in headless
Chromium with every figure and no console error."""

from __future__ import annotations

import csv
import json
import re
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from typer.testing import CliRunner

from batchnorm.cli import app
from batchnorm.lab.experiment import verdict
from batchnorm.lab.experiments import MODULES, all_experiments

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The smoke lab on the default data (MNIST-1D), run once for this module: (folder, output)."""
    out = tmp_path_factory.mktemp("lab")
    result = CliRunner().invoke(app, ["lab", "--profile", "smoke", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, result.output


def strict_json(path: Path) -> dict:
    def refuse(constant: str) -> None:
        raise ValueError(f"{path} holds {constant}: not strict JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_results_schema(lab: tuple[Path, str]) -> None:
    out, _ = lab
    r = strict_json(out / "results.json")
    assert r["profile"] == "smoke"
    assert r["data"]["name"] == "mnist1d" and r["data"]["train"] == 4000 and r["data"]["features"] == 40
    assert {"python", "torch", "batchnorm", "numpy"} <= r["versions"].keys()
    assert r["seconds"] > 0 and r["command"].startswith("batchnorm lab")
    assert r["indicative"] is True and len(r["data"]["sha256"]) == 64
    assert r["commit"] is None or len(r["commit"]["sha"]) == 40
    assert r["image_data"]["name"] == "digits" and r["image_data"]["image_shape"] == [1, 8, 8]  # the conv arms' images
    assert [c["id"] for c in r["claims"]] == [e.ID for e in all_experiments()]
    for c in r["claims"]:
        assert {"id", "title", "verdict", "summary", "metrics", "figures", "evidence", "paper", "kind"} <= c.keys()
        assert c["verdict"] == verdict(c["evidence"])
        for e in c["evidence"]:
            assert {"condition", "estimate", "low", "high", "threshold", "holds"} <= e.keys()
        assert c["summary"] and isinstance(c["metrics"], dict) and c["metrics"]
        assert c["figures"], f"{c['id']} has no figure"
        for f in c["figures"]:
            assert (out / f).read_bytes()[:8] == PNG_MAGIC
            assert imread(out / f).shape[0] > 100  # decodes to a real image
        for t in c["tables"]:
            rows = list(csv.reader((out / t).read_text().splitlines()))
            assert len(rows) > 1 and all(len(row) == len(rows[0]) for row in rows)
    c1 = next(c for c in r["claims"] if c["id"] == "C1")
    for key in ("final_test_accuracy_bn", "final_test_accuracy_no_bn", "conv_final_test_accuracy_bn"):
        assert 0 <= c1["metrics"][key] <= 1
    assert {c["id"] for c in r["claims"] if c["kind"] == "check"} == {"A1", "A2", "C4"}


def test_summary_table_and_report_path(lab: tuple[Path, str]) -> None:
    out, output = lab
    text = " ".join(output.split())
    assert "Report:" in text and "index.html" in text
    for e in all_experiments():
        assert e.ID in text


def test_every_experiment_follows_the_interface() -> None:
    experiments = all_experiments()
    assert len(experiments) == len(MODULES) and len({e.ID for e in experiments}) == len(experiments)
    for e in experiments:
        assert e.TITLE and e.CLAIM and e.EXPECTATION and callable(e.run)
        assert e.__doc__ and e.ID in e.__doc__.split()[0]  # opens with the claim
        profiles = {p: getattr(e.Config, p)() for p in ("quick", "full", "smoke")}
        assert profiles["full"].seeds >= 5 and profiles["quick"].seeds >= 1


def open_in_chromium(page: Path, screenshot: Path) -> tuple[str, str]:
    """Load ``page`` in headless Chromium: its DOM after the scripts ran, and Chromium's log."""
    profile = screenshot.parent / "chromium-profile"
    cmd = [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
           "--virtual-time-budget=5000", "--window-size=1280,2400", f"--screenshot={screenshot}",
           "--dump-dom", page.resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, done.stderr


def page_problems(dom: str, log: str, figures: int) -> list[str]:
    """What went wrong when the page loaded: console messages, script errors, missing figures."""
    problems = [line for line in log.splitlines() if ":CONSOLE" in line]  # the report logs nothing
    check = re.search(r'<p id="self-check" data-status="(\w+)" data-images="(\d+)/(\d+)">([^<]*)', dom)
    if check is None:
        return [*problems, "the self-check did not run"]
    status, loaded, total, text = check.groups()
    if status != "ok" or int(loaded) != figures or int(total) != figures:
        problems.append(f"self-check: {text} (expected {figures} figures)")
    return problems


requires_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)")


@requires_chromium
def test_report_loads_in_chromium(lab: tuple[Path, str]) -> None:
    out, _ = lab
    figures = sum(len(c["figures"]) for c in strict_json(out / "results.json")["claims"])
    screenshot = out / "screenshot.png"
    dom, log = open_in_chromium(out / "index.html", screenshot)
    assert page_problems(dom, log, figures) == []
    png = screenshot.read_bytes()
    assert png[:8] == PNG_MAGIC
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (1280, 2400)
    assert np.asarray(imread(screenshot)).std() > 0.01  # not a blank page


@requires_chromium
def test_chromium_check_sees_a_broken_page(lab: tuple[Path, str], tmp_path: Path) -> None:
    """The check above can fail: a missing figure and a console error are both reported."""
    out, _ = lab
    html = (out / "index.html").read_text()
    broken = re.sub(r'src="data:image/png;base64,[^"]*"', 'src="figures/missing.png"', html, count=1)
    broken = broken.replace("</body>", '<script>console.error("deliberate");</script></body>')
    page = tmp_path / "broken.html"
    page.write_text(broken)
    figures = broken.count("<img ")
    problems = page_problems(*open_in_chromium(page, tmp_path / "broken.png"), figures)
    assert any("deliberate" in p for p in problems)
    assert any("image failed to load" in p for p in problems)


def write_idx(path: Path, a: np.ndarray) -> None:
    path.write_bytes(bytes([0, 0, 0x08, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes())


def write_cifar(folder: Path, rng: np.random.Generator) -> None:
    folder.mkdir()
    for name, n in [*((f"data_batch_{i}.bin", 60) for i in range(1, 6)), ("test_batch.bin", 50)]:
        records = rng.integers(0, 256, (n, 1 + 3 * 32 * 32), dtype=np.uint8)
        records[:, 0] = rng.integers(0, 10, n)
        (folder / name).write_bytes(records.tobytes())


@pytest.mark.parametrize("name", ["mnist", "cifar10", "digits"])
def test_every_claim_runs_on_image_data_conv_arms_included(tmp_path: Path, name: str) -> None:
    """Every claim on small MNIST / CIFAR-10 files written here (and on the embedded digits):
    the conv-net arms train on those images themselves."""
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    if name == "mnist":
        write_idx(data / "train-images-idx3-ubyte", rng.integers(0, 256, (300, 28, 28), dtype=np.uint8))
        write_idx(data / "train-labels-idx1-ubyte", rng.integers(0, 10, 300, dtype=np.uint8))
        write_idx(data / "t10k-images-idx3-ubyte", rng.integers(0, 256, (50, 28, 28), dtype=np.uint8))
        write_idx(data / "t10k-labels-idx1-ubyte", rng.integers(0, 10, 50, dtype=np.uint8))
    elif name == "cifar10":
        write_cifar(data / "cifar-10-batches-bin", rng)
    out = tmp_path / "out"
    args = ["lab", "--profile", "smoke", "--data", name, "--out", str(out)]
    result = CliRunner().invoke(app, args + (["--data-dir", str(data)] if name != "digits" else []))
    assert result.exit_code == 0, result.output
    r = strict_json(out / "results.json")
    shape = {"mnist": [1, 28, 28], "cifar10": [3, 32, 32], "digits": [1, 8, 8]}[name]
    assert r["data"]["name"] == name and r["data"]["image_shape"] == shape and r["image_data"] is None
    assert [c["id"] for c in r["claims"]] == [e.ID for e in all_experiments()]
    assert all(c["verdict"] == verdict(c["evidence"]) for c in r["claims"])
    c1 = next(c for c in r["claims"] if c["id"] == "C1")
    assert f"Conv net on {name}" in c1["summary"]


@pytest.mark.parametrize(("args", "message"), [
    (["--only", "Z9"], "unknown claim IDs ['Z9']"),
    (["--data", "mnist"], "--data-dir"),
    (["--data", "imagenet"], "expected one of mnist1d"),
    (["--profile", "slow"], "expected one of quick, full, smoke"),
    (["--seeds", "0"], "expected at least 1"),
])
def test_bad_options_say_what_was_expected(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["lab", "--out", str(tmp_path), *args])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())


def test_commit_outside_a_checkout_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from batchnorm.lab import results

    here = results.commit()
    assert here is None or (len(here["sha"]) == 40 and isinstance(here["dirty"], bool))

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(results.subprocess, "run", no_git)
    monkeypatch.delenv(results.COMMIT_ENV, raising=False)
    assert results.commit() is None
    monkeypatch.setenv(results.COMMIT_ENV, "ab" * 20)
    assert results.commit() == {"sha": "ab" * 20, "dirty": None, "from": results.COMMIT_ENV}


def test_report_shows_conditions_paper_and_captions(lab: tuple[Path, str]) -> None:
    from markupsafe import escape

    out, _ = lab
    html = (out / "index.html").read_text()
    r = strict_json(out / "results.json")
    assert "indicative" in html and "How a verdict is made" in html
    assert html.count("<th>Condition</th>") == len(r["claims"])
    for c in r["claims"]:
        for e in c["evidence"]:
            assert escape(e["reason"]) in html
        for p in c["paper"]:
            assert escape(p["paper"]) in html
        for caption in c["captions"]:
            assert escape(caption) in html
    assert "none (one seed)" in html  # the smoke profile's findings have no interval
