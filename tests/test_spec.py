"""Specs: typed objects, YAML, every error with its path, overrides, schema."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import adaptkit
from adaptkit.errors import SpecError
from adaptkit.spec import apply_overrides, json_schema, parse_value
from adaptkit_plugins.timm.vit import VitParams
from adaptkit_plugins.data.digits import DigitsParams
from adaptkit_plugins.methods.lora import LoraParams
from adaptkit_plugins.tasks.classification import ClassificationParams

BASE = {
    "backbone": {"name": "vit", "model": "vit_tiny_digits"},
    "methods": [{"name": "lora", "rank": 4}],
    "task": "classification",
    "data": {"name": "digits"},
}


def problems(data, overrides=None):
    with pytest.raises(SpecError) as info:
        adaptkit.load_spec(data, overrides)
    return info.value.problems


def test_python_objects_and_dicts_give_the_same_spec():
    typed = adaptkit.RunSpec(
        backbone=VitParams(model="vit_tiny_digits"), methods=[LoraParams(rank=4)],
        task=ClassificationParams(), data=DigitsParams(),
    )
    loaded = adaptkit.load_spec(BASE)
    assert typed.to_dict() == loaded.to_dict()
    assert isinstance(loaded.methods[0], LoraParams) and loaded.methods[0].rank == 4
    assert adaptkit.RunSpec(**BASE).to_dict() == loaded.to_dict()


def test_yaml_round_trip(tmp_path):
    spec = adaptkit.load_spec(BASE)
    path = tmp_path / "x.yaml"
    path.write_text(spec.to_yaml())
    again = adaptkit.load_spec(path)
    assert again.name == "x"
    assert again.model_dump(exclude={"name"}) == spec.model_dump(exclude={"name"})


def test_out_of_range_value_has_its_yaml_path():
    (problem,) = problems({**BASE, "methods": [{"name": "lora", "rank": 0}]})
    assert problem == "methods[0].rank: Input should be greater than 0"


def test_unknown_key_suggests_the_right_one():
    (problem,) = problems({**BASE, "methods": [{"name": "lora", "rnak": 4}]})
    assert problem.startswith("methods[0].rnak: unknown key (did you mean 'rank'?)")
    (problem,) = problems({**BASE, "train": {"lr": 1e-3, "epoch": 3}})
    assert problem.startswith("train.epoch: unknown key (did you mean 'epochs'?)")


def test_unknown_plugin_suggests_and_lists():
    (problem,) = problems({**BASE, "backbone": {"name": "vitt"}})
    assert problem.startswith("backbone.name: unknown backbone 'vitt' (did you mean 'vit'?)")


def test_all_problems_are_reported_at_once():
    found = problems({**BASE, "methods": [{"name": "lroa"}], "train": {"batch_size": -1}, "data": {"name": "digits", "classes": [3, 3]}})
    assert any(p.startswith("methods[0].name: unknown method 'lroa'") for p in found)
    assert any(p.startswith("train.batch_size:") for p in found)
    assert any(p.startswith("data.classes:") for p in found)


def test_missing_sections_and_wrong_types():
    found = problems({"backbone": "vit"})
    assert "task: required but missing" in found and "data: required but missing" in found
    (problem,) = problems({**BASE, "methods": "lora"})
    assert problem.startswith("methods: expected a list")
    (problem,) = problems({**BASE, "train": {"grad_accum": 3, "batch_size": 64}})
    assert "not divisible by grad_accum 3" in problem


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(SpecError, match="nope.yaml: file not found"):
        adaptkit.load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("backbone: [unclosed\n")
    with pytest.raises(SpecError, match=r"bad.yaml: line \d+, column \d+: not valid YAML"):
        adaptkit.load_spec(bad)
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="expected a mapping at the top level"):
        adaptkit.load_spec(tmp_path / "list.yaml")


def test_overrides():
    spec = adaptkit.load_spec(BASE, ["train.lr=1e-3", "methods.0.rank=2", "methods[0].targets=[attn.q, attn.v]", "data.classes=[5,6]", "seed=7"])
    assert spec.train.lr == 1e-3 and spec.seed == 7
    assert spec.methods[0].rank == 2 and spec.methods[0].targets == ["attn.q", "attn.v"]
    assert spec.data.classes == [5, 6]
    assert adaptkit.load_spec(BASE, ["task.label_smoothing=0.1"]).task.label_smoothing == 0.1
    with pytest.raises(SpecError, match="index 3 is out of range"):
        apply_overrides(BASE, ["methods.3=lora"])
    with pytest.raises(SpecError, match="must look like key.path=value"):
        apply_overrides(BASE, ["train.lr"])
    assert parse_value("1e-3") == 1e-3 and parse_value("true") is True and parse_value("abc") == "abc"
    assert parse_value("null") is None and parse_value("[1, 2]") == [1, 2]


def test_schema_covers_every_registered_component():
    schema = json_schema()
    text = json.dumps(schema)
    for name in adaptkit.registry().names("method"):
        assert f'"{name}"' in text
    assert "rank" in text and "label_smoothing" in text
    assert schema["title"] == "adaptkit RunSpec"


def test_listing_and_validating_never_import_heavy_libraries(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(adaptkit.load_spec(BASE).to_yaml())
    code = (
        "import sys\n"
        "from adaptkit.cli import main\n"
        f"assert main(['validate', {str(path)!r}]) == 0\n"
        "assert main(['plugins', '--json']) == 0\n"
        "assert main(['schema']) == 0\n"
        "heavy = [m for m in ('torch', 'timm', 'open_clip', 'diffusers', 'sklearn', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
