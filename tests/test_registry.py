"""Registry: built-ins from registry.yaml, entry points, broken plugins, clashes, hooks."""

from __future__ import annotations

import pytest

from adaptkit import Registry
from adaptkit.errors import PluginError
from tests.plugin_fixtures import GOOD_PLUGIN, make_distribution, on_path


def test_builtins_are_registered():
    reg = Registry(entry_points=False)
    assert {"vit"} <= set(reg.names("backbone"))
    assert {"full", "lora"} <= set(reg.names("method"))
    assert "classification" in reg.names("task")
    assert {"digits", "image_folder"} <= set(reg.names("data"))
    assert reg.get("method", "lora").provider == "adaptkit_plugins.methods.lora"
    assert [r.name for r in reg.find("method", "l*")] == ["lora"]
    assert reg.preset("vit_tiny_digits").backbone == "vit"


def test_unknown_component_suggests_the_closest_name():
    reg = Registry(entry_points=False)
    with pytest.raises(PluginError, match=r"unknown method 'lroa' \(did you mean 'lora'\?\)"):
        reg.get("method", "lroa")


def test_entry_point_plugin_from_a_package(tmp_path):
    make_distribution(tmp_path, "bias-only", "bias_only_plugin", GOOD_PLUGIN.format(name="bias_only"))
    with on_path(tmp_path, "bias_only_plugin"):
        reg = Registry()
        record = reg.get("method", "bias_only")
    assert record.provider == "bias_only_plugin"
    assert reg.source(record.provider) == "package bias-only"
    assert record.summary.startswith("train only the biases")
    assert not reg.failures


def test_broken_plugin_is_reported_and_the_rest_work(tmp_path):
    make_distribution(tmp_path, "broken-pkg", "broken_plugin", "import does_not_exist_anywhere\n")
    with on_path(tmp_path, "broken_plugin"):
        reg = Registry()
    assert [f.plugin for f in reg.failures] == ["broken_plugin"]
    assert "package broken-pkg" in str(reg.failures[0])
    assert "ModuleNotFoundError" in str(reg.failures[0])
    assert "lora" in reg.names("method")


def test_a_hook_raising_is_isolated(tmp_path):
    source = "from adaptkit import hookimpl\n@hookimpl\ndef adaptkit_methods():\n    raise RuntimeError('boom')\n"
    make_distribution(tmp_path, "raising", "raising_plugin", source)
    with on_path(tmp_path, "raising_plugin"):
        reg = Registry()
    assert "adaptkit_methods() raised RuntimeError: boom" in str(reg.failures[0])
    assert "lora" in reg.names("method")


def test_misspelled_hook_fails_the_plugin(tmp_path):
    source = "from adaptkit import hookimpl\n@hookimpl\ndef adaptkit_method():\n    return []\n"
    make_distribution(tmp_path, "typo", "typo_plugin", source)
    with on_path(tmp_path, "typo_plugin"):
        reg = Registry()
    (failure,) = reg.failures
    assert failure.plugin == "typo_plugin"
    assert "unknown hook" in failure.error and "did you mean 'adaptkit_methods'" in failure.error


def test_name_clash_names_both_providers(tmp_path):
    make_distribution(tmp_path, "clash", "clash_plugin", GOOD_PLUGIN.format(name="lora"))
    with on_path(tmp_path, "clash_plugin"):
        with pytest.raises(PluginError) as info:
            Registry()
    message = str(info.value)
    assert "method 'lora' is registered twice" in message
    assert "adaptkit_plugins.methods.lora" in message and "clash_plugin" in message


def test_record_whose_params_do_not_pin_the_name_is_refused(tmp_path):
    source = GOOD_PLUGIN.format(name="pinned").replace('name: Literal["pinned"] = "pinned"', "")
    make_distribution(tmp_path, "unpinned", "unpinned_plugin", source)
    with on_path(tmp_path, "unpinned_plugin"):
        reg = Registry()
    assert "must declare name: Literal['pinned']" in str(reg.failures[0])
    assert "pinned" not in reg.names("method")
