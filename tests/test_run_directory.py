"""A run directory is a transaction: a later command never damages a saved run, one writer at a
time (a lock naming its pid), statuses for failed and interrupted runs, leftovers of a killed run
cleaned up, files that follow the umask."""

from __future__ import annotations

import json
import os
import signal
import stat

import pytest
import yaml

import adaptkit
from adaptkit.cli import main
from adaptkit.errors import RunError
from adaptkit.rundir import RunLock
from adaptkit.train import Trainer
from tests.cli_helpers import digest, user_error
from tests.conftest import tiny_vit_spec

QUIET = {"log": lambda *_: None}


def spec_file(tmp_path, name="spec.yaml", **train):
    spec = tiny_vit_spec(tmp_path)
    spec["train"].update({"max_steps": 4, "eval_every": 2, "checkpoint_every": 2, **train})
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture
def finished(tmp_path):
    """A finished run (with its checkpoint) and the spec file that made it."""
    path = spec_file(tmp_path)
    assert main(["run", str(path)]) == 0
    return path, tmp_path / "run"


def fail_at_step(monkeypatch, step, error=None):
    """Make training raise ``error`` (a RunError by default) when it saves the checkpoint of ``step``."""
    original = Trainer._save_state

    def failing(self, optimizer, done, *args):
        if done == step:
            raise error or RunError(f"simulated failure at step {done}")
        original(self, optimizer, done, *args)

    monkeypatch.setattr(Trainer, "_save_state", failing)


def siblings(run):
    return sorted(p.name for p in run.parent.iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------- overwrite
def test_an_overwrite_that_cannot_build_leaves_the_old_run_intact(finished, capsys):
    path, run = finished
    before = digest(run)
    assert "checkpoint/state.safetensors" in before
    user_error(capsys, ["run", path, "--overwrite", "backbone.pretrained=/nonexistent.safetensors"], "nonexistent")
    assert digest(run) == before and not siblings(run)


def test_an_overwrite_that_fails_in_training_leaves_the_old_run_intact(finished, capsys, monkeypatch):
    path, run = finished
    before = digest(run)
    fail_at_step(monkeypatch, 2)
    user_error(capsys, ["run", path, "--overwrite", "methods.0.rank=3"], "simulated failure at step 2")
    assert digest(run) == before and not siblings(run)


def test_an_overwrite_replaces_the_run_whole(finished, capsys):
    path, run = finished
    (run / "stale.txt").write_text("a file of the old run")
    assert main(["run", str(path), "--overwrite", "methods.0.rank=3"]) == 0
    spec = yaml.safe_load((run / "spec.yaml").read_text())
    metadata = adaptkit.checkpoint.read_metadata(run / "adapter.safetensors")
    assert spec["methods"][0]["rank"] == 3 == json.loads(metadata["spec"])["methods"][0]["rank"]
    assert json.loads((run / "run.json").read_text())["status"] == "done"
    assert not (run / "stale.txt").exists() and not siblings(run)


# ----------------------------------------------------------------------------- resume
def test_a_resume_of_a_damaged_checkpoint_leaves_run_json_alone(finished, capsys):
    path, run = finished
    state = run / "checkpoint" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:-40])
    before = digest(run)
    user_error(capsys, ["run", path, "train.resume=true"], "state.safetensors")
    assert digest(run) == before
    assert json.loads((run / "run.json").read_text())["key_metrics"]


def test_a_damaged_checkpoint_metadata_key_is_a_user_error(finished, capsys):
    from adaptkit.checkpoint import load_tensors, save_tensors

    path, run = finished
    state = run / "checkpoint" / "state.safetensors"
    tensors, metadata = load_tensors(state)
    for key, value in [("step", "abc"), ("history", "{not json"), ("param_names", "null"), ("loss_sum", None)]:
        damaged = {k: v for k, v in metadata.items() if not k.startswith("adaptkit.")}
        if value is None:
            del damaged[key]
        else:
            damaged[key] = value
        save_tensors(state, tensors, damaged)
        user_error(capsys, ["run", path, "train.resume=true"], "state.safetensors", key)
    assert json.loads((run / "run.json").read_text())["status"] == "done"


# ----------------------------------------------------------------------------- one writer
def test_a_second_run_into_a_locked_directory_is_refused_naming_the_pid(tmp_path, capsys):
    path = spec_file(tmp_path)
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    try:
        user_error(capsys, ["run", path], "in use", f"pid {os.getpid()}")
        user_error(capsys, ["run", path, "--overwrite"], f"pid {os.getpid()}")
    finally:
        lock.release()
    assert not (tmp_path / "run").exists()
    assert main(["run", str(path)]) == 0
    assert not siblings(tmp_path / "run")  # the lock file goes with its holder


def test_a_released_lock_can_be_taken_again(tmp_path):
    first = RunLock(tmp_path / "run")
    first.acquire()
    with pytest.raises(RunError, match=f"pid {os.getpid()}"):
        RunLock(tmp_path / "run").acquire()
    first.release()
    second = RunLock(tmp_path / "run")
    second.acquire()
    second.release()


# ----------------------------------------------------------------------------- not a run
def test_run_refuses_a_folder_of_the_users_files(tmp_path, capsys):
    path = spec_file(tmp_path)
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "spec.yaml").write_text("mine\n")
    (folder / "metrics.json").write_text("{}\n")
    before = digest(folder)
    user_error(capsys, ["run", path], "not empty", "not an adaptkit run")
    user_error(capsys, ["run", path, "--overwrite"], "not an adaptkit run")
    assert digest(folder) == before


def test_a_malformed_run_json_is_a_user_error(tmp_path, capsys):
    path = spec_file(tmp_path)
    folder = tmp_path / "run"
    folder.mkdir()
    for text in ("[1, 2]", "{not json", "null"):
        (folder / "run.json").write_text(text)
        user_error(capsys, ["run", path], "run.json")
        user_error(capsys, ["run", path, "--overwrite"], "run.json")
        user_error(capsys, ["runs", tmp_path], "run.json")
        user_error(capsys, ["report", folder], "run.json")


# ----------------------------------------------------------------------------- statuses
def test_a_failed_run_says_so_in_run_json(tmp_path, capsys, monkeypatch):
    path = spec_file(tmp_path)
    fail_at_step(monkeypatch, 4)
    user_error(capsys, ["run", path], "simulated failure at step 4")
    marker = json.loads((tmp_path / "run" / "run.json").read_text())
    assert marker["status"] == "failed" and "simulated failure at step 4" in marker["reason"]
    assert (tmp_path / "run" / "checkpoint" / "state.safetensors").exists()  # resumable from step 2


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raising KeyboardInterrupt, as in any foreground Python process. A shell starts a
    background job (`pytest ... &` in a script) with SIGINT ignored, and Python then keeps it
    ignored: without this, how pytest was started decided whether the run saw the signal."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_run_says_so_in_run_json(tmp_path, capsys, monkeypatch, signum, code, ctrl_c_raises):
    path = spec_file(tmp_path)
    original = Trainer._save_state

    def signalled(self, optimizer, done, *args):
        original(self, optimizer, done, *args)
        if done == 2:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(Trainer, "_save_state", signalled)
    assert main(["run", str(path)]) == code
    assert "interrupted" in capsys.readouterr().err
    marker = json.loads((tmp_path / "run" / "run.json").read_text())
    assert marker["status"] == "interrupted" and signal.Signals(signum).name in marker["reason"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back
    monkeypatch.setattr(Trainer, "_save_state", original)
    assert main(["run", str(path), "train.resume=true"]) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["resumed_from_step"] == 2


def test_leftovers_of_a_killed_run_are_cleaned_at_the_next_start(tmp_path, monkeypatch):
    path = spec_file(tmp_path)
    fail_at_step(monkeypatch, 4, KeyboardInterrupt())
    assert main(["run", str(path)]) == 130
    run = tmp_path / "run"
    leftovers = [run / "checkpoint" / ".state.safetensors.x1y2.tmp", run / ".adapter.safetensors.x3y4.tmp", run / ".run.json.tmp"]
    for leftover in leftovers:
        leftover.write_bytes(b"")  # what SIGKILL leaves between creating and renaming
    monkeypatch.undo()
    assert main(["run", str(path), "train.resume=true"]) == 0
    assert not any(p.exists() for p in leftovers)


# ----------------------------------------------------------------------------- modes
def test_outputs_follow_the_umask(tmp_path, monkeypatch):
    old = os.umask(0o022)
    try:
        path = spec_file(tmp_path)
        assert main(["run", str(path)]) == 0
        assert main(["export", str(tmp_path / "run"), str(tmp_path / "exported")]) == 0
    finally:
        os.umask(old)
    run = tmp_path / "run"
    for file in [run / "adapter.safetensors", run / "checkpoint" / "state.safetensors", run / "run.json", run / "metrics.json"]:
        assert stat.S_IMODE(file.stat().st_mode) == 0o644, file
    for folder in [run, run / "checkpoint", tmp_path / "exported"]:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder


def test_a_run_whose_spec_and_adapter_disagree_is_refused(finished, tmp_path, capsys):
    _, run = finished
    mixed = tmp_path / "mixed"
    import shutil

    shutil.copytree(run, mixed)
    spec = yaml.safe_load((mixed / "spec.yaml").read_text())
    spec["methods"][0]["alpha"] = 5.0  # what an interrupted overwrite used to leave: a new spec beside the old adapter
    (mixed / "spec.yaml").write_text(yaml.safe_dump(spec))
    user_error(capsys, ["merge", mixed, tmp_path / "out"], "disagree on methods", "different runs")
    spec["methods"][0]["alpha"] = json.loads(adaptkit.checkpoint.read_metadata(run / "adapter.safetensors")["spec"])["methods"][0]["alpha"]
    spec["data"]["shift"] = 1  # another machine's data settings: still the same adapter
    (mixed / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert main(["merge", str(mixed), str(tmp_path / "out")]) == 0
