"""Bad input to export / import / merge / combine: one clear message, exit status 2, and no
saved run or output directory damaged (refused unless --overwrite, staged, never the input)."""

from __future__ import annotations

import json
import shutil

import pytest

import adaptkit
from adaptkit.cli import main
from tests.cli_helpers import altered_copy, digest, user_error

QUIET = {"log": lambda *_: None}


def vit_run(out, methods, backbone=None):
    return adaptkit.run({
        "name": out.name, "seed": 0, "backbone": backbone or {"name": "vit", "model": "vit_tiny_digits"}, "methods": methods,
        "task": {"name": "classification"}, "data": {"name": "digits"},
        "train": {"max_steps": 1, "batch_size": 8, "progress": False}, "output": {"dir": str(out)},
    }, **QUIET).output_dir




@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interop")
    return {
        "a": vit_run(tmp / "lora_a", [{"name": "lora", "rank": 2}]),
        "b": vit_run(tmp / "lora_b", [{"name": "lora", "rank": 4}]),
        "prefix": vit_run(tmp / "prefix", [{"name": "prefix", "length": 2}]),
        "swin": vit_run(tmp / "swin", [{"name": "lora", "rank": 2}], {"name": "swin", "model": "swin_tiny_digits"}),
        "tmp": tmp,
    }


@pytest.fixture
def damaged(runs, tmp_path):
    """Copies of run a with its adapter truncated and with one byte flipped."""
    truncated, tampered = tmp_path / "truncated", tmp_path / "tampered"
    shutil.copytree(runs["a"], truncated)
    shutil.copytree(runs["a"], tampered)
    blob = (runs["a"] / "adapter.safetensors").read_bytes()
    (truncated / "adapter.safetensors").write_bytes(blob[: len(blob) // 2])
    flipped = bytearray(blob)
    flipped[-5] ^= 0xFF
    (tampered / "adapter.safetensors").write_bytes(bytes(flipped))
    return truncated, tampered


# ----------------------------------------------------------------------------- the inputs
@pytest.mark.parametrize("command", ["export", "merge"])
def test_runs_that_cannot_leave_say_why(runs, damaged, tmp_path, capsys, command):
    truncated, tampered = damaged
    out = tmp_path / "out"
    user_error(capsys, [command, runs["prefix"], out], "method 'prefix'")
    user_error(capsys, [command, truncated, out], "not a readable safetensors file")
    user_error(capsys, [command, tampered, out], "recorded hash")
    user_error(capsys, [command, tmp_path / "nowhere", out], "file not found")
    spec = tmp_path / "spec.yaml"
    shutil.copy(runs["a"] / "spec.yaml", spec)
    user_error(capsys, [command, spec, out], "a spec, not a trained run")
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(runs["a"] / "spec.yaml", half / "spec.yaml")
    user_error(capsys, [command, half, out], "no adapter.safetensors")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_combine_refuses_adapters_of_other_bases_and_bad_weights(runs, damaged, tmp_path, capsys):
    out = tmp_path / "mix"
    user_error(capsys, ["combine", out, runs["a"], runs["swin"]], "trained on another base model", "backbone.name: 'swin'")
    user_error(capsys, ["combine", out, runs["a"], runs["prefix"]], "method 'prefix' cannot be switched")
    user_error(capsys, ["combine", out, runs["a"], runs["b"], "--weights", "nan", "1"], "--weights must be a finite number")
    user_error(capsys, ["combine", out, runs["a"], runs["b"], "--weights", "0", "0"], "all weights are 0")
    user_error(capsys, ["combine", out, runs["a"], runs["b"], "--weights", "1"], "1 weights for 2 runs")
    user_error(capsys, ["combine", out, runs["a"], runs["b"], "--how", "svd", "--rank", "0"], "--rank must be > 0")
    user_error(capsys, ["combine", out, runs["a"], runs["b"], "--head", "3"], "--head")
    user_error(capsys, ["combine", out, runs["a"], damaged[1]], "recorded hash")
    assert not out.exists()


def test_import_refuses_what_is_not_a_peft_directory(runs, tmp_path, capsys):
    assert main(["export", str(runs["a"]), str(tmp_path / "peft")]) == 0
    capsys.readouterr()

    def variant(name, change):
        return altered_copy(tmp_path / "peft", tmp_path / name, change)

    weights = "adapter_model.safetensors"
    cases = [
        (variant("no_config", lambda f: (f / "adapter_config.json").unlink()), "no adapter_config.json"),
        (variant("list_config", lambda f: (f / "adapter_config.json").write_text("[1]")), "expected a JSON object"),
        (variant("broken_config", lambda f: (f / "adapter_config.json").write_text("{")), "not valid JSON"),
        (variant("truncated", lambda f: (f / weights).write_bytes((f / weights).read_bytes()[:100])), "not a readable safetensors file"),
        (runs["a"], "no adapter_config.json"),
    ]
    for source, fragment in cases:
        user_error(capsys, ["import", source, tmp_path / "imported"], fragment)
    user_error(capsys, ["import", tmp_path / "peft", tmp_path / "imported", "--spec", runs["swin"] / "spec.yaml"], "other base weights")
    user_error(capsys, ["import", tmp_path / "peft", tmp_path / "imported", "--spec", tmp_path / "nope.yaml"], "file not found")
    assert not (tmp_path / "imported").exists()


# ----------------------------------------------------------------------------- the outputs
@pytest.mark.parametrize(
    "args",
    [
        ["export", "{a}", "{a}"],
        ["merge", "{a}", "{a}/merged"],
        ["combine", "{a}", "{a}", "{b}"],
        ["export", "{a}/adapter.safetensors", "{a}"],
    ],
)
def test_an_output_is_never_the_run_it_reads(runs, capsys, args):
    before = digest(runs["a"])
    args = [a.replace("{a}", str(runs["a"])).replace("{b}", str(runs["b"])) for a in args]
    user_error(capsys, [*args, "--overwrite"], "that is where the input")
    assert digest(runs["a"]) == before


def test_an_existing_output_is_refused_then_replaced_only_with_overwrite(runs, tmp_path, capsys):
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("my notes")
    user_error(capsys, ["merge", runs["a"], keep], "is not empty", "--overwrite")
    assert main(["merge", str(runs["a"]), str(keep), "--overwrite"]) == 0  # other files stay
    assert (keep / "notes.txt").read_text() == "my notes" and (keep / "model.safetensors").exists()
    # a folder of one's own that merely holds a spec.yaml is written into, never replaced whole
    project = tmp_path / "project"
    project.mkdir()
    (project / "spec.yaml").write_text("my spec")
    (project / "train.py").write_text("print('mine')")
    assert main(["merge", str(runs["a"]), str(project), "--overwrite"]) == 0
    assert (project / "train.py").exists() and (project / "spec.yaml").read_text() == "my spec"
    # a directory holding another run is replaced whole: none of the old run's files survive
    other = tmp_path / "other_run"
    shutil.copytree(runs["b"], other)
    user_error(capsys, ["combine", other, runs["a"], runs["b"]], "holds an adaptkit run")
    assert (other / "metrics.json").exists()
    assert main(["combine", str(other), str(runs["a"]), str(runs["b"]), "--overwrite"]) == 0
    assert sorted(p.name for p in other.iterdir()) == ["adapter.safetensors", "run.json", "spec.yaml"]
    assert json.loads((other / "run.json").read_text())["status"] == "combined"
    (tmp_path / "file").write_text("x")
    user_error(capsys, ["export", runs["a"], tmp_path / "file"], "not a directory")


def test_a_failure_while_writing_leaves_the_output_as_it_was(runs, tmp_path, capsys, monkeypatch):
    import adaptkit.peft_format as peft_format
    from adaptkit.errors import CompatibilityError

    out = tmp_path / "peft"
    assert main(["export", str(runs["a"]), str(out)]) == 0
    before = digest(out)

    def half_then_fail(model, directory, include_base=False):
        (directory / "adapter_config.json").write_text("{}")
        raise CompatibilityError("simulated failure half-way through the export")

    monkeypatch.setattr(peft_format, "export_peft", half_then_fail)
    user_error(capsys, ["export", runs["b"], out, "--overwrite"], "simulated failure")
    assert digest(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the staging folder is gone


def test_import_refuses_malformed_config_values_and_factors(runs, tmp_path, capsys):
    import torch

    from adaptkit.checkpoint import load_tensors, save_tensors

    assert main(["export", str(runs["a"]), str(tmp_path / "peft")]) == 0
    capsys.readouterr()

    def with_config(name, **changes):
        def change(folder):
            config = json.loads((folder / "adapter_config.json").read_text())
            (folder / "adapter_config.json").write_text(json.dumps({**config, **changes}))
        return altered_copy(tmp_path / "peft", tmp_path / name, change)

    def flat_factor(folder):
        path = folder / "adapter_model.safetensors"
        tensors, metadata = load_tensors(path)
        key = next(k for k in sorted(tensors) if k.endswith("lora_A.weight"))
        save_tensors(path, {**tensors, key: tensors[key].flatten()}, metadata)

    def stray_head_tensor(folder):
        path = folder / "adapter_model.safetensors"
        tensors, metadata = load_tensors(path)
        save_tensors(path, {**tensors, "base_model.model.head.scale": torch.ones(3)}, metadata)

    cases = [
        (with_config("alpha_text", lora_alpha="eight"), "lora_alpha"),
        (with_config("alpha_zero", lora_alpha=0), "lora_alpha"),
        (with_config("dropout", lora_dropout=1.5), "lora_dropout"),
        (with_config("pattern_list", alpha_pattern=[1]), "alpha_pattern"),
        (with_config("pattern_regex", alpha_pattern={"blocks.(": 2}), "alpha_pattern"),
        (with_config("pattern_zero", alpha_pattern={"qkv": 0}), "alpha_pattern"),
        (with_config("save_text", modules_to_save="head"), "modules_to_save"),
        (altered_copy(tmp_path / "peft", tmp_path / "flat", flat_factor), "lora_A"),
        (altered_copy(tmp_path / "peft", tmp_path / "stray", stray_head_tensor), "head.scale"),
    ]
    for source, fragment in cases:
        user_error(capsys, ["import", source, tmp_path / "imported"], fragment)
    assert not (tmp_path / "imported").exists()
