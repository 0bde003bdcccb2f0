"""Bad input to the generative components (ddpm_unet, unclip, stylegan2, text_to_image,
clip_stylegan_edit, latent_seeds) and to `adaptkit generate` / `adaptkit edit`: one clear
message naming the flag, file or YAML path, exit status 2, and nothing already saved damaged."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
import yaml

import adaptkit
from adaptkit.cli import main
from tests.cli_helpers import altered_copy, digest, user_error
from adaptkit.errors import AdaptkitError, CheckpointError, CompatibilityError, SpecError

CLASS_UNET = {"name": "ddpm_unet", "model": "ddpm_unet_tiny", "conditioning": "class", "num_classes": 10}
STAGES = {"prior": {"model": "unclip_prior_tiny"}, "decoder": {"model": "unclip_decoder_tiny"}}
GENERATOR = {"name": "stylegan2", "model": "stylegan2_tiny_8", "style_dim": 16, "n_mlp": 2, "channels": {4: 16, 8: 16}}
QUIET = {"log": lambda *_: None}


class Pickled:
    """An arbitrary object: a torch file holding one needs pickle, which adaptkit refuses."""


def diffusion_spec(out, backbone, methods, data="digits", **task):
    return {
        "name": "hardening", "seed": 0, "backbone": copy.deepcopy(backbone), "methods": methods,
        "task": {"name": "text_to_image", "preview": 0, "steps": 2, **task}, "data": {"name": data},
        "train": {"max_steps": 1, "batch_size": 8, "progress": False}, "output": {"dir": str(out)},
    }


def edit_spec(out, methods=(), **task):
    return {
        "name": "edit", "seed": 0, "backbone": dict(GENERATOR), "methods": list(methods),
        "task": {"name": "clip_stylegan_edit", "prompt": "a digit eight", "neutral": "a digit three", "steps": 2,
                 "relevance_images": 4, "invert_steps": 2, "strip_sources": 1, **task},
        "data": {"name": "latent_seeds", "train": 4, "val": 2, "test": 2},
        "train": {"max_steps": 1, "batch_size": 2, "progress": False, "eval_every": 100},
        "output": {"dir": str(out)},
    }


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data))
    return path




@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One-step runs: a class-conditional DDPM, an unCLIP decoder, a classification ViT."""
    tmp = tmp_path_factory.mktemp("generative")
    ddpm = adaptkit.run(diffusion_spec(tmp / "ddpm", CLASS_UNET, [{"name": "lora", "rank": 2, "targets": ["attn.q"]}]), **QUIET)
    decoder = adaptkit.run(diffusion_spec(tmp / "decoder", {"name": "unclip", "stage": "decoder", **copy.deepcopy(STAGES)},
                                          [{"name": "lora", "rank": 2, "tower": "decoder", "targets": ["attn.q"]}],
                                          data="digits_captions"), **QUIET)
    vit = adaptkit.run({"name": "vit", "backbone": {"name": "vit", "model": "vit_tiny_digits"}, "methods": [{"name": "lora", "rank": 2}],
                        "task": {"name": "classification"}, "data": {"name": "digits"},
                        "train": {"max_steps": 1, "batch_size": 8, "progress": False}, "output": {"dir": str(tmp / "vit")}}, **QUIET)
    return {"ddpm": ddpm.output_dir, "decoder": decoder.output_dir, "vit": vit.output_dir, "tmp": tmp}


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("pictures")
    Image.new("L", (8, 8), 40).save(folder / "gray8.png")
    Image.new("RGB", (32, 32), (10, 200, 30)).save(folder / "rgb32.png")  # square: resized, with a note
    Image.new("L", (13, 5)).save(folder / "wide.png")
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(folder / "transparent.png")
    Image.new("RGBA", (8, 8), (9, 9, 9, 255)).save(folder / "opaque_rgba.png")
    Image.new("I;16", (8, 8)).save(folder / "deep.png")
    (folder / "text.png").write_text("not an image")
    (folder / "empty.png").write_bytes(b"")
    return folder


# ----------------------------------------------------------------------------- generate: flags
@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--guidance", "nan"], "--guidance must be a finite number"),
        (["--guidance", "-1"], "--guidance must be at least 0"),
        (["--eta", "1.5"], "--eta must be between 0 and 1"),
        (["--eta", "-0.1"], "--eta must be between 0 and 1"),
        (["--seed", "-1"], "--seed must be >= 0"),
        (["--steps", "5000"], "more sampling steps than the 1000 timesteps"),
        (["--device", "tpu"], "--device 'tpu'"),
        (["--scale", "100000"], "--scale 100000"),
        (["--prompt", "a cat"], "unknown class 'a cat'"),
        (["--image", "{pictures}/gray8.png"], "class-conditional; it takes classes, not images"),
        (["task.stepz=3"], "task.stepz: unknown key (did you mean 'steps'?)"),
    ],
)
def test_generate_refuses_bad_flags_and_writes_nothing(runs, pictures, tmp_path, capsys, flags, fragment):
    out = tmp_path / "grid.png"
    flags = [f.replace("{pictures}", str(pictures)) for f in flags]
    condition = [] if any(f in flags for f in ("--prompt", "--image")) else ["--class", "3"]
    user_error(capsys, ["generate", runs["ddpm"], *condition, *flags, "--num", "1", "--out", out], fragment)
    assert not out.exists() and not (tmp_path / "grid").exists()


def test_task_sampling_settings_that_cannot_work_fail_before_training(tmp_path):
    with pytest.raises(CompatibilityError, match="task: steps 5000: more sampling steps than the 1000"):
        adaptkit.build(diffusion_spec(tmp_path, CLASS_UNET, [], steps=5000))
    with pytest.raises(SpecError, match="task.guidance_scale"):
        adaptkit.load_spec(diffusion_spec(tmp_path, CLASS_UNET, [], guidance_scale=float("inf")))


def test_generate_on_runs_that_cannot_generate(runs, tmp_path, capsys):
    user_error(capsys, ["generate", runs["vit"], "--out", tmp_path / "a.png"], "task 'classification' does not generate images")
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(runs["ddpm"] / "spec.yaml", half / "spec.yaml")  # started, never finished
    user_error(capsys, ["generate", half, "--out", tmp_path / "b.png"], "no adapter.safetensors")
    user_error(capsys, ["generate", tmp_path / "nowhere", "--out", tmp_path / "c.png"], "no such run directory")
    edit = write_yaml(tmp_path / "edit.yaml", edit_spec(tmp_path / "e"))
    user_error(capsys, ["generate", edit, "--out", tmp_path / "d.png"], "task 'clip_stylegan_edit' does not generate images")


# ----------------------------------------------------------------------------- generate: outputs
def test_generate_never_overwrites_or_spills_into_a_run(runs, tmp_path, capsys):
    run_files = digest(runs["ddpm"])
    # --out next to the run would put the single images into the run directory itself
    user_error(capsys, ["generate", runs["ddpm"], "--class", "3", "--num", "1", "--steps", "1",
                        "--out", runs["ddpm"].parent / "ddpm.png", "--overwrite"], "holds an adaptkit run")
    assert digest(runs["ddpm"]) == run_files and not (runs["ddpm"].parent / "ddpm.png").exists()
    out = tmp_path / "grid.png"
    args = ["generate", runs["ddpm"], "--class", "3", "--num", "2", "--steps", "1", "--out", out]
    assert main([str(a) for a in args]) == 0
    first = out.read_bytes()
    user_error(capsys, args + ["--seed", "5"], "already exist", "--overwrite")
    assert out.read_bytes() == first
    assert main([str(a) for a in args + ["--seed", "5", "--overwrite"]]) == 0
    assert out.read_bytes() != first and sorted(p.name for p in (tmp_path / "grid").iterdir()) == ["000.png", "001.png"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind
    (tmp_path / "file").write_text("x")
    user_error(capsys, ["generate", runs["ddpm"], "--class", "3", "--out", tmp_path / "file" / "g.png"], "is a file, not a directory")
    user_error(capsys, ["generate", runs["ddpm"], "--class", "3", "--out", tmp_path / "g.jpg"], "ending in .png")


# ----------------------------------------------------------------------------- generate: images and conditions
@pytest.mark.parametrize(
    "name, fragment",
    [
        ("missing.png", "file not found"),
        ("text.png", "cannot read the image"),
        ("empty.png", "cannot read the image"),
        ("wide.png", "is 13x5 but the model takes 8x8"),
        ("transparent.png", "transparent pixels"),
        ("deep.png", "16-bit or float"),
        ("", "not a file"),
    ],
)
def test_generate_refuses_images_it_cannot_take(runs, pictures, tmp_path, capsys, name, fragment):
    user_error(capsys, ["generate", runs["decoder"], "--image", pictures / name, "--num", "1", "--steps", "1",
                        "--out", tmp_path / "v.png"], "--image", fragment)
    assert not (tmp_path / "v.png").exists()


def test_generate_resizes_a_square_image_and_says_so(runs, pictures, tmp_path, capsys):
    for name in ("rgb32.png", "opaque_rgba.png"):
        out = tmp_path / f"{name}.png"
        assert main(["generate", str(runs["decoder"]), "--image", str(pictures / name), "--num", "1", "--steps", "1", "--out", str(out)]) == 0
        assert out.exists()
    assert "note: --image" in capsys.readouterr().out


def test_conditions_of_the_wrong_kind(runs, tmp_path, capsys):
    user_error(capsys, ["generate", runs["decoder"], "--class", "cat", "--num", "1", "--out", tmp_path / "a.png"], "unknown class 'cat'")
    user_error(capsys, ["generate", runs["ddpm"], "--class", "3", "--prompt", "3", "--out", tmp_path / "b.png"], "one kind of condition")


# ----------------------------------------------------------------------------- weight files
def test_diffusers_directories_and_files_that_are_damaged(tmp_path, capfd):
    from safetensors.torch import save_file

    unet = adaptkit.build(diffusion_spec(tmp_path, {"name": "ddpm_unet", "model": "ddpm_unet_tiny"}, [])).backbone.unet
    unet.save_pretrained(tmp_path / "good")
    state = {k: v.contiguous() for k, v in unet.state_dict().items()}
    first = next(iter(state))

    def damaged(name, change):
        return altered_copy(tmp_path / "good", tmp_path / name, change)

    weights = "diffusion_pytorch_model.safetensors"
    cases = {
        damaged("cfg_list", lambda f: (f / "config.json").write_text("[1, 2]")): "must hold a JSON object",
        damaged("cfg_broken", lambda f: (f / "config.json").write_text("{")): "not readable JSON",
        damaged("truncated", lambda f: (f / weights).write_bytes((f / weights).read_bytes()[:300])): "cannot load the diffusers model",
        damaged("no_weights", lambda f: (f / weights).unlink()): "cannot load the diffusers model",
    }
    save_file({**state, first: torch.full_like(state[first], float("nan"))}, tmp_path / "nan.safetensors")
    save_file({k: (v.long() if v.is_floating_point() else v) for k, v in state.items()}, tmp_path / "ints.safetensors")
    cases[tmp_path / "nan.safetensors"] = "NaN or infinite"
    cases[tmp_path / "ints.safetensors"] = "expects floating point"

    pickled = damaged("pickled", lambda f: (f / weights).unlink())
    torch.save({"weight": Pickled()}, pickled / "diffusion_pytorch_model.bin")
    cases[pickled] = "cannot load the diffusers model"
    capfd.readouterr()
    for path, fragment in cases.items():
        spec = diffusion_spec(tmp_path, {"name": "ddpm_unet", "model": "ddpm_unet_tiny", "pretrained": str(path)}, [])
        with pytest.raises(CheckpointError, match=fragment) as caught:
            adaptkit.build(spec)
        assert "backbone.pretrained" in str(caught.value)
    assert "An error occurred" not in capfd.readouterr().err  # diffusers' own log lines stay quiet


def test_stylegan2_files_of_the_wrong_layout_size_or_kind(tmp_path):
    from adaptkit.checkpoint import save_tensors
    from adaptkit_plugins.stylegan.generator import native_generator_state

    spec = edit_spec(tmp_path)
    state = native_generator_state(adaptkit.build(spec).backbone.generator)
    save_tensors(tmp_path / "g.safetensors", state)
    torch.save({"g_ema": state}, tmp_path / "rosinality.pt")
    blob = (tmp_path / "rosinality.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(blob[: len(blob) // 2])
    tampered = bytearray((tmp_path / "g.safetensors").read_bytes())
    tampered[-3] ^= 0xFF
    (tmp_path / "tampered.safetensors").write_bytes(bytes(tampered))

    torch.save({"g_ema": state, "args": Pickled()}, tmp_path / "pickled.pt")  # a pickle-only object: refused, never run
    torch.save({"g": state}, tmp_path / "non_ema.pt")

    def build(pretrained, **backbone):
        s = copy.deepcopy(spec)
        s["backbone"].update(pretrained=str(pretrained), **backbone)
        return adaptkit.build(s)

    build(tmp_path / "rosinality.pt")  # the good ones load
    build(tmp_path / "non_ema.pt", checkpoint_key="g")
    for path, fragment in [("truncated.pt", "not a weights-only torch file"), ("pickled.pt", "not a weights-only torch file"),
                           ("tampered.safetensors", "recorded hash"), ("missing.pt", "file not found"),
                           ("non_ema.pt", "set backbone.checkpoint_key")]:
        with pytest.raises(CheckpointError, match=fragment):
            build(tmp_path / path)
    with pytest.raises(CheckpointError, match="style_dim 16"):  # the file's own configuration is named
        build(tmp_path / "rosinality.pt", style_dim=32)


def test_unclip_stage_weights_that_are_damaged_or_of_the_other_stage(runs, tmp_path):
    adapter = runs["decoder"] / "adapter.safetensors"
    blob = adapter.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(blob[: len(blob) // 2])
    tampered = bytearray(blob)
    tampered[-3] ^= 0xFF
    (tmp_path / "tampered.safetensors").write_bytes(bytes(tampered))

    def build(stage, **weights):
        stages = copy.deepcopy(STAGES)
        for name, path in weights.items():
            stages[name]["pretrained"] = str(path)
        return adaptkit.build(diffusion_spec(tmp_path, {"name": "unclip", "stage": stage, **stages}, [], data="digits_captions"))

    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        build("prior", decoder=tmp_path / "truncated.safetensors")
    with pytest.raises(CheckpointError, match="recorded hash"):
        build("prior", decoder=tmp_path / "tampered.safetensors")
    with pytest.raises(CheckpointError, match="backbone.prior.pretrained"):
        build("decoder", prior=adapter)


# ----------------------------------------------------------------------------- edit
@pytest.fixture(scope="module")
def edit_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("edit")
    return write_yaml(tmp / "edit.yaml", edit_spec(tmp / "run"))


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--alphas", ","], "--alphas: expected comma-separated finite numbers"),
        (["--alphas", "1,nan"], "--alphas: expected comma-separated finite numbers"),
        (["--seed", "-2"], "--seed must be >= 0"),
        (["--image", "{pictures}/transparent.png"], "transparent pixels"),
        (["--image", "{pictures}/wide.png"], "is 13x5 but the model takes 8x8"),
        (["--image", "{pictures}/text.png"], "cannot read the image"),
        (["--w", "{tmp}/nan_w.safetensors"], "finite floating-point"),
        (["--mode", "generator"], "train it first"),
        (["task.truncation=2"], "task.truncation"),
        (["task.beta=-1", "--mode", "global"], "task.beta"),
    ],
)
def test_edit_refuses_bad_flags_and_writes_nothing(edit_file, pictures, tmp_path, capsys, flags, fragment):
    from safetensors.torch import save_file

    save_file({"w": torch.full((16,), float("nan"))}, str(tmp_path / "nan_w.safetensors"))
    flags = [f.replace("{pictures}", str(pictures)).replace("{tmp}", str(tmp_path)) for f in flags]
    out = tmp_path / "edit.png"
    err = user_error(capsys, ["edit", edit_file, *flags, "--out", out], fragment)
    if fragment.startswith("task."):
        assert str(edit_file) in err  # the YAML file the path belongs to
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_edit_of_runs_of_other_tasks_or_unfinished(runs, edit_file, tmp_path, capsys):
    for run, task in ((runs["ddpm"], "text_to_image"), (runs["vit"], "classification")):
        user_error(capsys, ["edit", run, "--out", tmp_path / "a.png"], "needs a spec whose task is clip_stylegan_edit", f"'{task}'")
    half = tmp_path / "half"
    half.mkdir()
    write_yaml(half / "spec.yaml", edit_spec(tmp_path / "nada", [{"name": "lora", "rank": 2, "targets": ["conv"]}], mode="generator"))
    user_error(capsys, ["edit", half, "--out", tmp_path / "b.png"], "has no adapter.safetensors")


def test_edit_keeps_existing_outputs_unless_overwrite(edit_file, tmp_path, capsys):
    out = tmp_path / "edit.png"
    args = ["edit", str(edit_file), "--out", str(out)]
    assert main(args + ["--seed", "1"]) == 0
    before = digest(tmp_path)
    user_error(capsys, args + ["--seed", "2"], "already exist", "--overwrite")
    assert digest(tmp_path) == before
    assert main(args + ["--overwrite", "--seed", "2"]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["sources"] == ["seed 2"]
    user_error(capsys, ["edit", str(edit_file), "--out", str(tmp_path / "edit.jpg")], "ending in .png")


def test_latent_seeds_and_edit_spec_values_out_of_range(tmp_path):
    for change, path in [({"data": {"name": "latent_seeds", "train": 0}}, "data.train"),
                         ({"data": {"name": "latent_seeds", "trian": 4}}, "did you mean 'train'"),
                         ({"task": {**edit_spec(tmp_path)["task"], "steps": 0}}, "task.steps"),
                         ({"task": {**edit_spec(tmp_path)["task"], "mode": "globl"}}, "task.mode"),
                         ({"backbone": {**GENERATOR, "modle": "x"}}, "did you mean 'model'")]:
        with pytest.raises(AdaptkitError, match=path):
            adaptkit.load_spec({**edit_spec(tmp_path), **change})
