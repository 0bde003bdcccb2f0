"""One bad plugin cannot take the tool down: a hook returning the wrong thing, a generator that
raises, a plugin calling sys.exit at import, a factory that raises: each is reported naming the
plugin, and every command (`plugins`, `validate`, `run`) keeps working."""

from __future__ import annotations

import pytest
import yaml

from adaptkit import Registry
from adaptkit.cli import main
from adaptkit.registry import registry
from tests.cli_helpers import user_error
from tests.conftest import tiny_vit_spec
from tests.plugin_fixtures import GOOD_PLUGIN, make_distribution, on_path

HOOK = "from adaptkit import hookimpl, MethodRecord\n@hookimpl\ndef adaptkit_methods():\n{body}\n"
RECORD = GOOD_PLUGIN.format(name="bias_only").split("@hookimpl")[0]

FAULTS = {
    "returns_int": HOOK.format(body="    return 42"),
    "returns_string": HOOK.format(body="    return 'lora'"),
    "returns_one_record": RECORD + HOOK.format(
        body="    return MethodRecord(name='bias_only', params=BiasOnlyParams, factory=apply_bias_only, summary='x')"),
    "raising_generator": HOOK.format(body="    yield from []\n    raise RuntimeError('generator boom')"),
    "exits_at_import": "import sys\nsys.exit(0)\n",
    "exits_in_hook": HOOK.format(body="    raise SystemExit(3)"),
}
EXPECTED = {
    "returns_int": "returned int, expected a list of records",
    "returns_string": "returned str, expected a list of records",
    "returns_one_record": "returned MethodRecord, expected a list of records",
    "raising_generator": "raised RuntimeError: generator boom",
    "exits_at_import": "import failed: SystemExit: it called sys.exit(0)",
    "exits_in_hook": "raised SystemExit: it called sys.exit(3)",
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_faulty_plugin_is_reported_by_name_and_skipped(tmp_path, capsys, fault):
    module = f"{fault}_plugin"
    make_distribution(tmp_path, fault.replace("_", "-"), module, FAULTS[fault])
    with on_path(tmp_path, module):
        reg = Registry()
        assert [f.plugin for f in reg.failures] == [module], reg.failures
        assert EXPECTED[fault] in str(reg.failures[0]) and f"package {fault.replace('_', '-')}" in str(reg.failures[0])
        assert "lora" in reg.names("method")
        registry(refresh=True)
        try:
            assert main(["plugins"]) == 0
            out = capsys.readouterr()
            assert module in out.out + out.err
            spec = tmp_path / "spec.yaml"
            spec.write_text(yaml.safe_dump(tiny_vit_spec(tmp_path)))
            assert main(["validate", str(spec)]) == 0
            assert "ok: " in capsys.readouterr().out
        finally:
            registry(refresh=True)


FACTORY_RAISES = GOOD_PLUGIN.format(name="broken_method").replace(
    "    from adaptkit.method import AppliedMethod\n", "    raise ZeroDivisionError('factory boom')\n")


def test_a_third_party_factory_that_raises_is_named(tmp_path, capsys):
    make_distribution(tmp_path, "broken-factory", "broken_factory_plugin", FACTORY_RAISES)
    spec = tiny_vit_spec(tmp_path)
    spec["methods"] = [{"name": "broken_method"}]
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    with on_path(tmp_path, "broken_factory_plugin"):
        registry(refresh=True)
        try:
            user_error(capsys, ["run", path, "--dry-run"], "method 'broken_method'", "broken_factory_plugin",
                       "package broken-factory", "ZeroDivisionError: factory boom")
            user_error(capsys, ["run", path], "broken_factory_plugin")
        finally:
            registry(refresh=True)
    assert not (tmp_path / "run").exists()


def test_a_built_in_factory_that_raises_is_a_bug_naming_the_plugin(tmp_path, capsys, monkeypatch):
    from dataclasses import replace

    reg = registry()
    lora = reg.get("method", "lora")

    def boom(*args):
        raise ZeroDivisionError("built-in boom")

    monkeypatch.setitem(reg._records["method"], "lora", replace(lora, factory=boom))
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(tiny_vit_spec(tmp_path)))
    assert main(["run", str(path), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "method 'lora' (plugin adaptkit_plugins.methods.lora, built-in)" in err and "internal error" in err
