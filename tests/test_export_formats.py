"""Export formats are plugins (the ``adaptkit_export_formats`` hook): the core's export and import
commands know none by name; registry.yaml names the default one."""

from __future__ import annotations

import types

import pytest

from adaptkit import hookimpl
from adaptkit.errors import PluginError
from adaptkit.records import ExportFormatRecord
from adaptkit.registry import Registry


def format_plugin(name: str, calls: list) -> types.SimpleNamespace:
    def write(model, directory, *, include_base=False):
        calls.append((model, directory, include_base))
        (directory / "weights.bin").write_bytes(b"x")
        return ["weights.bin"]

    @hookimpl
    def adaptkit_export_formats():
        return [ExportFormatRecord(name=name, write=write, summary=f"{name} files")]

    return types.SimpleNamespace(__name__=f"plugin_{name}", adaptkit_export_formats=adaptkit_export_formats)


def test_the_built_in_formats_register_through_the_hook_and_peft_is_the_default():
    reg = Registry(entry_points=False)
    assert {"peft", "diffusers"} <= {record.name for record in reg.export_formats()}
    assert reg.default_export_format == "peft"
    assert reg.export_format("diffusers").read is not None
    with pytest.raises(PluginError, match=r"unknown export format 'pef' \(did you mean 'peft'\?\); registered formats: diffusers, peft"):
        reg.export_format("pef")


def test_a_third_party_format_is_offered_and_called_by_the_export_command(tmp_path, monkeypatch):
    import importlib

    from adaptkit.cli import main as cli

    calls: list = []
    reg = Registry(entry_points=False, plugins=[format_plugin("onnx", calls)])
    monkeypatch.setattr(importlib.import_module("adaptkit.registry"), "_default", reg)
    monkeypatch.setattr(importlib.import_module("adaptkit.native"), "load_trained", lambda source: "the model")
    run = tmp_path / "run"
    run.mkdir()
    assert cli(["export", str(run), str(tmp_path / "out"), "--format", "onnx"]) == 0
    assert [(model, include) for model, _, include in calls] == [("the model", False)]
    assert (tmp_path / "out" / "weights.bin").is_file()


def test_a_format_registered_twice_names_both_providers():
    with pytest.raises(PluginError, match="export format 'peft' is registered twice: by '[^']+' and by '[^']+'; uninstall") as error:
        Registry(entry_points=False, plugins=[format_plugin("peft", [])])
    assert "'adaptkit_plugins.exports.peft'" in str(error.value) and "'plugin_peft'" in str(error.value)
