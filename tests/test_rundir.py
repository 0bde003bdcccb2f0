"""RunDir, the one reader and writer of a run directory: finding a run from its directory or its
adapter file, its spec and adapter, run.json written whole or not at all, and the statuses."""

from __future__ import annotations

import json
import pathlib
import signal

import pytest
import yaml

from adaptkit.errors import RunError, SpecError
from adaptkit.rundir import RunDir, Terminated
from tests.conftest import tiny_vit_spec


@pytest.fixture
def saved_run(tmp_path):
    """A run directory written the way imports and combinations write one (spec.yaml, adapter, run.json)."""
    from adaptkit.builder import build
    from adaptkit.native import save_run
    from adaptkit.spec import load_spec

    model = build(load_spec(tiny_vit_spec(tmp_path)))
    assert save_run(model, tmp_path / "saved", "saved") == ["spec.yaml", "adapter.safetensors", "run.json"]
    return tmp_path / "saved"


def test_a_trained_run_reads_the_same_from_its_directory_and_its_adapter_file(saved_run):
    by_directory = RunDir.trained(saved_run)
    by_adapter = RunDir.trained(saved_run / "adapter.safetensors")
    assert by_directory.is_run and not by_adapter.is_run
    (spec, adapter), (spec_again, adapter_again) = by_directory.spec_and_adapter(), by_adapter.spec_and_adapter()
    assert adapter == adapter_again == saved_run / "adapter.safetensors"
    assert spec.to_dict()["methods"] == spec_again.to_dict()["methods"] == [spec.methods[0].model_dump(mode="json")]
    assert spec.methods[0].rank == 2 and spec.fingerprint() == spec_again.fingerprint()
    marker = by_directory.read_marker()
    assert marker["status"] == "saved" and marker["spec_fingerprint"] == spec.fingerprint()


def test_a_run_whose_spec_yaml_is_gone_is_read_from_its_adapter(saved_run):
    (saved_run / "spec.yaml").unlink()
    with pytest.raises(RunError, match="no spec.yaml"):
        RunDir.locate(saved_run, need_adapter=True)
    spec, _ = RunDir.trained(saved_run).spec_and_adapter()
    assert spec.methods[0].rank == 2


def test_locate_says_what_a_command_was_given(saved_run, tmp_path):
    spec_file = tmp_path / "edit_me.yaml"
    spec_file.write_text(yaml.safe_dump({k: v for k, v in tiny_vit_spec(tmp_path).items() if k != "name"}))
    given = RunDir.locate(spec_file, need_adapter=True)  # a spec file has no adapter to need
    assert (given.spec_file, given.adapter, given.is_run) == (spec_file, None, False)
    assert given.load_spec(["methods.0.rank=3"]).name == "edit_me"  # named after its file
    assert given.load_spec(["methods.0.rank=3"]).methods[0].rank == 3
    with pytest.raises(SpecError) as error:
        given.load_spec(["train.lr=-1"])
    assert error.value.source == str(spec_file)  # the message names the file
    (saved_run / "adapter.safetensors").unlink()
    assert RunDir.locate(saved_run, need_adapter=False).adapter is None
    with pytest.raises(RunError, match="no adapter.safetensors yet"):
        RunDir.locate(saved_run, need_adapter=True)
    with pytest.raises(RunError, match="no such run directory"):
        RunDir.locate(tmp_path / "missing", need_adapter=False)
    with pytest.raises(RunError, match="a spec, not a trained run"):
        RunDir.trained(spec_file)


def test_run_json_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    run = RunDir.at(tmp_path)
    run.write_marker({"spec_fingerprint": "abc", "status": "running"})
    before = run.marker_file.read_bytes()
    original = pathlib.Path.write_text

    def disk_full(self, text, *args, **kwargs):
        original(self, text[: len(text) // 2], *args, **kwargs)  # half of it reaches the disk
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space"):
        run.set_status("done", key_metrics={"val_accuracy": 0.5})
    monkeypatch.undo()
    assert run.marker_file.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]  # no temp file left behind


def test_statuses_from_running_to_stopped_to_resumed_to_done(tmp_path):
    run = RunDir.at(tmp_path / "run")
    run.path.mkdir()
    run.mark_running("name: x\n", {"name": "x", "spec_fingerprint": "abc"})
    first = run.read_marker()
    assert first["status"] == "running" and first["started"] and (run.path / "spec.yaml").read_text() == "name: x\n"

    run.mark_stopped(Terminated(signal.SIGTERM))
    assert {k: run.read_marker()[k] for k in ("status", "reason")} == {"status": "interrupted", "reason": "SIGTERM"}
    run.mark_stopped(KeyboardInterrupt())
    assert run.read_marker()["reason"] == "SIGINT"
    run.mark_stopped(ValueError("the loss is nan"))
    assert {k: run.read_marker()[k] for k in ("status", "reason")} == {"status": "failed", "reason": "ValueError: the loss is nan"}
    run.mark_stopped(RunError("out of disk"))
    assert run.read_marker()["reason"] == "out of disk"  # adaptkit's own errors are for people: no class name

    stopped = run.read_marker()
    run.mark_running("name: x\n", {"name": "x", "spec_fingerprint": "abc"}, previous=stopped)  # a resume
    resumed = run.read_marker()
    assert resumed["status"] == "running" and "reason" not in resumed and "finished" not in resumed
    assert resumed["started"] == first["started"]  # still the run that started then

    done = run.set_status("done", finished="later", key_metrics={"val_accuracy": 0.5})
    assert done == run.read_marker() == {**resumed, "status": "done", "finished": "later", "key_metrics": {"val_accuracy": 0.5}}
    assert json.loads(run.marker_file.read_text())["status"] == "done"


def test_a_run_json_adaptkit_did_not_write_is_refused(tmp_path):
    run = RunDir.at(tmp_path)
    assert run.read_marker() is None
    run.marker_file.write_text('{"status": "done"}')
    with pytest.raises(RunError, match="not a run.json adaptkit wrote"):
        run.read_marker()
