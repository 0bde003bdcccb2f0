"""The user's view of runs: `adaptkit runs`, `adaptkit report` (and the page in Chromium)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

import adaptkit
from adaptkit.cli import main
from adaptkit.errors import RunError
from adaptkit.report import write_report
from adaptkit.runs import find_runs, read_run
from tests.conftest import tiny_vit_spec


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    spec = tiny_vit_spec(root)
    spec["output"] = {"dir": str(root / "tiny")}
    adaptkit.run(spec, log=lambda *_: None)
    return root


def test_runs_lists_key_metrics(finished_run, capsys):
    (run,) = find_runs(finished_run)
    assert run.status == "done" and run.name == "tiny"
    assert run.components == "vit + [lora] -> classification on digits"
    metrics = run.key_metrics()
    assert 0 <= metrics["test_accuracy"] <= 1 and "trainable_%" in metrics
    assert main(["runs", str(finished_run), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed[0]["metrics"]["test_accuracy"] == metrics["test_accuracy"]
    assert main(["runs", str(finished_run)]) == 0
    assert "test_accuracy" in capsys.readouterr().out


def test_runs_errors(tmp_path):
    with pytest.raises(RunError, match="no such directory"):
        find_runs(tmp_path / "nothing")
    with pytest.raises(RunError, match="not a run directory"):
        read_run(tmp_path)
    assert main(["report", str(tmp_path)]) == 2


def test_report_is_self_contained(finished_run):
    page = write_report(finished_run / "tiny")
    text = page.read_text()
    assert text.count("data:image/png;base64,") >= 3  # curves + two confusion matrices
    assert "src=\"http" not in text and "<link" not in text
    assert "test" in text and "lora" in text and "classification" in text
    metrics = json.loads((finished_run / "tiny" / "metrics.json").read_text())
    assert f"{metrics['test']['accuracy']:.4g}" in text


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian package chromium)")
def test_report_renders_in_headless_chromium(finished_run, tmp_path):
    page = write_report(finished_run / "tiny", tmp_path / "report.html")
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(flags + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "<table>" in dom.stdout and "tiny" in dom.stdout
    shot = tmp_path / "shot.png"
    done = subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1000,1400", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.stat().st_size > 10_000
