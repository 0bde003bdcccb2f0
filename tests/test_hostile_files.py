"""Hostile and damaged files: a stored spec is a mapping (never a path to open), metadata is hashed
with the tensors, YAML cannot exhaust memory or the stack, and NaN or infinite weights are refused
where weights are read and where they are written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import save_file

import adaptkit
from adaptkit.checkpoint import load_tensors, read_metadata, save_tensors
from adaptkit.cli import main
from tests.cli_helpers import user_error
from tests.conftest import tiny_vit_spec

QUIET = {"log": lambda *_: None}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    spec = tiny_vit_spec(tmp)
    spec["methods"] = [{"name": "lora", "rank": 2, "alpha": 4.0}]
    spec["train"].update({"max_steps": 2, "eval_every": 2})
    return adaptkit.run(spec, **QUIET).output_dir


def rewrite_metadata(source, target, change):
    """Copy a run and rewrite its adapter's metadata with ``change(metadata)``, keeping the recorded hashes."""
    shutil.copytree(source, target)
    adapter = target / "adapter.safetensors"
    tensors, metadata = load_tensors(adapter)
    change(metadata)
    save_file(tensors, str(adapter), metadata=metadata)
    return target


# ----------------------------------------------------------------------------- stored specs
@pytest.mark.parametrize("stored", ["path", '"{not json', "[1, 2]", "null", '"a string"'])
def test_an_adapters_stored_spec_must_be_a_mapping(lora_run, tmp_path, capsys, stored):
    if stored == "path":  # a path to a real spec is never opened (nor /dev/zero, which never ends)
        stored = json.dumps(str(lora_run / "spec.yaml"))
    shutil.copy(lora_run / "adapter.safetensors", tmp_path / "adapter.safetensors")
    tensors, metadata = load_tensors(tmp_path / "adapter.safetensors")
    save_tensors(tmp_path / "adapter.safetensors", tensors, {**metadata, "spec": stored})  # hashed: only the spec is wrong
    user_error(capsys, ["merge", tmp_path / "adapter.safetensors", tmp_path / "out"], "spec")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stored", ["path", [1, 2], None])
def test_adaptkit_json_spec_must_be_a_mapping(lora_run, tmp_path, capsys, stored):
    exported = tmp_path / "exported"
    assert main(["export", str(lora_run), str(exported)]) == 0
    info = json.loads((exported / "adaptkit.json").read_text())
    info["spec"] = str(lora_run / "spec.yaml") if stored == "path" else stored
    (exported / "adaptkit.json").write_text(json.dumps(info))
    user_error(capsys, ["import", exported, tmp_path / "imported"], "adaptkit.json", "mapping")
    (exported / "adaptkit.json").write_text("[1, 2]")
    user_error(capsys, ["import", exported, tmp_path / "imported"], "adaptkit.json", "JSON object")


# ----------------------------------------------------------------------------- the hash covers the metadata
def test_a_changed_alpha_in_the_metadata_is_refused(lora_run, tmp_path, capsys):
    def flip_alpha(metadata):
        spec = json.loads(metadata["spec"])
        spec["methods"][0]["alpha"] = 5.0
        metadata["spec"] = json.dumps(spec)

    tampered = rewrite_metadata(lora_run, tmp_path / "tampered", flip_alpha)
    (tampered / "spec.yaml").write_text(yaml.safe_dump(json.loads(read_metadata(tampered / "adapter.safetensors")["spec"])))
    user_error(capsys, ["merge", tampered, tmp_path / "out"], "recorded hash")
    user_error(capsys, ["merge", tampered / "adapter.safetensors", tmp_path / "out"], "recorded hash")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- YAML
def write(tmp_path, text):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


def base_yaml(tmp_path, extra=""):
    spec = tiny_vit_spec(tmp_path)
    return yaml.safe_dump(spec) + extra


def test_an_alias_bomb_is_refused(tmp_path, capsys):
    levels = "".join(f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 10))
    text = base_yaml(tmp_path).replace("backbone:\n", "backbone:\n  kwargs:\n    l0: &l0 [lol]\n" + levels.replace("  l", "    l"), 1)
    path = write(tmp_path, text)
    user_error(capsys, ["validate", path], "alias")
    user_error(capsys, ["run", path], "alias")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kwargs, fragment", [("&x [*x]", "loop"), ("&x {a: *x}", "loop"), ('"\x07"', "unacceptable character")])
def test_alias_loops_and_control_characters_are_refused(tmp_path, capsys, kwargs, fragment):
    path = write(tmp_path, base_yaml(tmp_path).replace("backbone:\n", f"backbone:\n  kwargs: {kwargs}\n", 1))
    user_error(capsys, ["validate", path], fragment)
    user_error(capsys, ["validate", write(tmp_path, base_yaml(tmp_path)), f"backbone.kwargs={kwargs}"], "backbone.kwargs")


def test_a_small_alias_still_works(tmp_path, capsys):
    text = base_yaml(tmp_path).replace("backbone:\n", "backbone:\n  kwargs: &kw {}\n", 1) + "description: &d shared\n"
    assert main(["validate", str(write(tmp_path, text))]) == 0


def test_a_spec_file_over_the_size_limit_is_refused(tmp_path, capsys):
    path = write(tmp_path, base_yaml(tmp_path) + "#" + "x" * (2 << 20) + "\n")
    user_error(capsys, ["validate", path], "larger than 1 MB")


@pytest.mark.parametrize("text", ["[" * 5000 + "]" * 5000, "a: " + "{a: " * 200 + "1" + "}" * 200, "- " * 300 + "1"])
def test_deep_nesting_is_a_clear_error(tmp_path, capsys, text):
    user_error(capsys, ["validate", write(tmp_path, text)], "nested deeper than")


def test_duplicate_keys_are_refused(tmp_path, capsys):
    text = base_yaml(tmp_path) + "seed: 3\n"  # tiny_vit_spec has seed: 0 already
    user_error(capsys, ["validate", write(tmp_path, text)], "duplicate key 'seed'", "line")
    nested = base_yaml(tmp_path).replace("train:\n", "train:\n  lr: 0.1\n  lr: 0.2\n", 1)
    user_error(capsys, ["validate", write(tmp_path, nested)], "duplicate key 'lr'")


def test_a_merge_key_is_not_a_duplicate(tmp_path, capsys):
    spec = tiny_vit_spec(tmp_path)
    del spec["train"]
    text = yaml.safe_dump(spec).replace("backbone:\n", "backbone:\n  kwargs: &kw {depth: 1}\n", 1)
    text += "train:\n  max_steps: 3\n  <<: {progress: false}\n"
    assert main(["validate", str(write(tmp_path, text))]) == 0, capsys.readouterr().err
    user_error(capsys, ["validate", write(tmp_path, text + "  max_steps: 4\n")], "duplicate key 'max_steps'")


# ----------------------------------------------------------------------------- non-finite weights
@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    spec = tiny_vit_spec(tmp)
    spec["methods"] = [{"name": "full"}]
    spec["train"].update({"max_steps": 1, "eval_every": 1})
    return adaptkit.run(spec, **QUIET).output_dir


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_pretrained_weights_are_refused(full_run, tmp_path, capsys, value):
    tensors, metadata = load_tensors(full_run / "adapter.safetensors")
    first = next(k for k, t in tensors.items() if t.is_floating_point())
    broken = {**tensors, first: torch.full_like(tensors[first], value)}
    save_file(broken, str(tmp_path / "weights.safetensors"))
    torch.save({k.removeprefix("backbone.net."): v for k, v in broken.items()}, tmp_path / "weights.pt")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_vit_spec(tmp_path)))
    for weights in ("weights.safetensors", "weights.pt"):
        user_error(capsys, ["run", spec, "--dry-run", f"backbone.pretrained={tmp_path / weights}"], "backbone.pretrained", "NaN or infinite", weights)


def test_a_non_finite_adapter_is_neither_merged_nor_written(lora_run, tmp_path, capsys):
    from adaptkit.native import load_trained, merge_to_native, save_native
    from adaptkit.errors import CheckpointError

    broken = tmp_path / "broken"
    shutil.copytree(lora_run, broken)
    tensors, metadata = load_tensors(broken / "adapter.safetensors")
    first = next(iter(tensors))
    save_file({**tensors, first: torch.full_like(tensors[first], float("nan"))}, str(broken / "adapter.safetensors"), metadata={
        k: v for k, v in metadata.items() if not k.startswith("adaptkit.")})
    user_error(capsys, ["merge", broken, tmp_path / "out"], "NaN or infinite")
    assert not (tmp_path / "out").exists()

    model = load_trained(lora_run)  # a finite adapter whose merge overflows
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("lora_a", "lora_b")):
                p.fill_(1e30)  # finite factors whose product is not
    result = merge_to_native(model)
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        save_native(model, result, tmp_path / "overflowed")
    assert not (tmp_path / "overflowed").exists()
