"""Plugins observe a run through the training-lifecycle hooks; loggers are such plugins, picked
by ``train.loggers``; plugins add their own commands through ``adaptkit_commands``."""

from __future__ import annotations

import importlib
import json
import sys

import pytest
import yaml

import adaptkit
from adaptkit import hookimpl
from adaptkit.cli import main
from adaptkit.errors import PluginError, SpecError
from adaptkit.registry import Registry
from tests.cli_helpers import user_error
from tests.conftest import tiny_vit_spec

registry_module = importlib.import_module("adaptkit.registry")  # (adaptkit.registry the attribute is the function)


class Recorder:
    """A third-party observer: remembers every lifecycle call it gets."""

    __name__ = "recorder_plugin"

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    @hookimpl
    def adaptkit_train_start(self, run):
        self.calls.append(("start", run.total_steps, run.start_step, run.spec.name))

    @hookimpl
    def adaptkit_train_step(self, step, logs):
        self.calls.append(("step", step, sorted(logs)))

    @hookimpl
    def adaptkit_evaluate(self, step, record):
        self.calls.append(("evaluate", step, "val_accuracy" in record and record["step"] == step))

    @hookimpl
    def adaptkit_train_end(self, status):
        self.calls.append(("end", status))


@pytest.fixture
def with_plugins(monkeypatch):
    """Make the process-wide registry the built-ins plus the given plugin objects."""
    def install(*plugins):
        reg = Registry(plugins=list(plugins), entry_points=False)
        monkeypatch.setattr(registry_module, "_default", reg)
        return reg
    return install


def test_the_built_in_loggers_and_the_default_ones():
    reg = Registry(entry_points=False)
    assert [r.name for r in reg.loggers()] == ["jsonl", "mlflow", "progress_bar", "tensorboard"]
    assert reg.default_loggers == ["jsonl", "progress_bar"]


def test_a_plugin_observes_every_step_evaluation_start_and_end(tmp_path, with_plugins):
    recorder = Recorder()
    with_plugins(recorder)
    adaptkit.run(tiny_vit_spec(tmp_path), log=lambda *_: None)
    assert recorder.calls[0] == ("start", 6, 0, "tiny")
    steps = [c for c in recorder.calls if c[0] == "step"]
    assert [c[1] for c in steps] == [1, 2, 3, 4, 5, 6]
    assert all(c[2] == ["loss", "lr", "samples_per_second"] for c in steps)
    assert [c for c in recorder.calls if c[0] == "evaluate"] == [("evaluate", 3, True), ("evaluate", 6, True)]
    assert recorder.calls[-1] == ("end", "finished")
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 2  # the default jsonl logger


def test_a_failed_run_ends_with_status_failed(tmp_path, with_plugins, monkeypatch):
    from adaptkit.errors import RunError
    from adaptkit.train import Trainer

    recorder = Recorder()
    with_plugins(recorder)

    def diverge(self, *args, **kwargs):
        raise RunError("the training loss became nan at step 1")

    monkeypatch.setattr(Trainer, "_optimizer_step", diverge)
    with pytest.raises(RunError):
        adaptkit.run(tiny_vit_spec(tmp_path), log=lambda *_: None)
    assert recorder.calls[0][0] == "start" and recorder.calls[-1] == ("end", "failed")


def test_a_third_party_observer_that_raises_is_reported_and_the_run_goes_on(tmp_path, with_plugins, capsys):
    class Broken:
        __name__ = "broken_observer"

        @hookimpl
        def adaptkit_evaluate(self):
            raise ValueError("boom")

    reg = with_plugins(Broken())
    result = adaptkit.run(tiny_vit_spec(tmp_path), log=lambda *_: None)
    assert result.metrics["test"]["count"] > 0
    assert any("broken_observer" in str(f) and "ValueError: boom" in str(f) for f in reg.failures)
    assert "warning: plugin 'broken_observer'" in capsys.readouterr().err


def test_tensorboard_logger_writes_the_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    spec = tiny_vit_spec(tmp_path)
    spec["train"]["loggers"] = ["jsonl", "tensorboard"]
    adaptkit.run(spec, log=lambda *_: None)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in events.Scalars("val/accuracy")] == [3, 6]
    jsonl = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in events.Scalars("val/accuracy")] == pytest.approx([r["val_accuracy"] for r in jsonl])


def test_without_jsonl_no_metrics_jsonl_is_written(tmp_path):
    spec = tiny_vit_spec(tmp_path)
    spec["train"]["loggers"] = []
    adaptkit.run(spec, log=lambda *_: None)
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and (tmp_path / "run" / "metrics.json").exists()


def test_mlflow_without_its_package_is_one_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if the optional extra were not installed
    spec = tiny_vit_spec(tmp_path)
    spec["train"]["loggers"] = ["jsonl", "mlflow"]
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    user_error(capsys, ["run", path], "mlflow is an optional extra", "pip install 'adaptkit[mlflow]'")


def test_an_unknown_logger_is_a_spec_error_with_a_suggestion(tmp_path):
    spec = tiny_vit_spec(tmp_path)
    spec["train"]["loggers"] = ["jsonl", "tensorbord"]
    with pytest.raises(SpecError, match=r"train.loggers\[1\]: unknown logger 'tensorbord' \(did you mean 'tensorboard'\?\)"):
        adaptkit.load_spec(spec)


def test_a_plugin_adds_a_command_with_its_flags(with_plugins, capsys):
    class Greeter:
        __name__ = "greeter_plugin"

        @hookimpl
        def adaptkit_commands(self, commands):
            p = commands.add("greet", main=lambda args: print(f"hello {args.who}") or 0, help="say hello")
            p.add_argument("--who", default="world")

    with_plugins(Greeter())
    assert main(["greet", "--who", "plugins"]) == 0
    assert capsys.readouterr().out == "hello plugins\n"


def test_the_edit_command_comes_from_the_stylegan_family(capsys):
    with pytest.raises(SystemExit) as info:
        main(["edit", "--help"])
    assert info.value.code == 0 and "--prompt" in capsys.readouterr().out
    import argparse

    from adaptkit.commands import Commands

    owners: dict[str, str] = {}
    registry_module.registry().add_commands(Commands(argparse.ArgumentParser().add_subparsers(), owners=owners))
    assert owners["edit"] == "adaptkit_plugins.stylegan.edit_command"


def test_a_command_name_taken_twice_names_both(with_plugins):
    class Clash:
        __name__ = "clash_plugin"

        @hookimpl
        def adaptkit_commands(self, commands):
            commands.add("edit", main=lambda args: 0, help="mine")

    with_plugins(Clash())
    from adaptkit.cli import parser

    with pytest.raises(PluginError, match="command 'edit' is added twice") as info:
        parser()
    assert "'adaptkit_plugins.stylegan.edit_command'" in str(info.value) and "'clash_plugin'" in str(info.value)


def test_a_task_with_part_of_the_training_state_protocol_is_refused():
    from adaptkit.builder import check_training_state

    class HalfEma:
        def extra_state(self):
            return {}

        def load_extra_state(self, tensors):
            pass

    with pytest.raises(PluginError, match="task 'half': its model has extra_state, load_extra_state but not finish_training"):
        check_training_state(HalfEma(), "half")

    class WholeEma(HalfEma):
        def finish_training(self):
            pass

    check_training_state(WholeEma(), "whole")  # all three: fine
