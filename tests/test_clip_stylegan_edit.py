"""Task ``clip_stylegan_edit`` with a tiny random generator and the tiny CLIP, and ``adaptkit edit``."""

from __future__ import annotations

import json

import pytest
import torch

import adaptkit
from adaptkit.cli import main
from adaptkit.errors import AdaptkitError, RunError, SpecError

GENERATOR = {"name": "stylegan2", "model": "stylegan2_tiny_8", "style_dim": 16, "n_mlp": 2, "channels": {4: 16, 8: 16}}
PROMPT, NEUTRAL = "a handwritten digit eight", "a handwritten digit three"


def edit_spec(tmp_path, methods=(), **task) -> dict:
    return {
        "name": "edit",
        "seed": 0,
        "backbone": dict(GENERATOR),
        "methods": list(methods),
        "task": {"name": "clip_stylegan_edit", "prompt": PROMPT, "neutral": NEUTRAL, "steps": 25,
                 "relevance_images": 4, "invert_steps": 30, "strip_sources": 2, **task},
        "data": {"name": "latent_seeds", "train": 16, "val": 4, "test": 4},
        "train": {"max_steps": 2, "batch_size": 4, "progress": False, "eval_every": 100},
        "output": {"dir": str(tmp_path / "run")},
    }


def no_gradients(model, *modules) -> bool:
    return all(p.grad is None for m in modules for p in m.parameters())


def test_latent_edit_raises_similarity_within_the_distance_bound(tmp_path):
    model = adaptkit.build(edit_spec(tmp_path, max_distance=2.0))
    result = model.edit(seeds=[0, 1, 2])
    before, after = torch.tensor(result.metrics["clip_before"]), torch.tensor(result.metrics["clip_after"])
    assert (after > before).all(), (before, after)
    assert all(d <= 2.0 + 1e-4 for d in result.metrics["latent_distance"])
    assert result.w_edit.shape == (3, model.backbone.n_latent, 16)
    assert result.strip.shape[:2] == (3, len(result.alphas))
    # only the latent was optimised: nothing in the model received a gradient
    assert no_gradients(model, model.backbone, model.guide)
    assert not any(p.requires_grad for p in model.parameters())


def test_latent_edit_in_w_space_and_l2_keeps_it_closer(tmp_path):
    loose = adaptkit.build(edit_spec(tmp_path, space="w", l2_lambda=0.0)).edit(seeds=[4, 5])
    tight = adaptkit.build(edit_spec(tmp_path, space="w", l2_lambda=1.0)).edit(seeds=[4, 5])
    assert loose.w_edit.shape == (2, 16)
    assert all(t < u for t, u in zip(tight.metrics["latent_distance"], loose.metrics["latent_distance"]))


def test_global_direction_edit(tmp_path):
    model = adaptkit.build(edit_spec(tmp_path, mode="global", alpha=3.0, beta=0.05))
    result = model.edit(seeds=[0, 1])
    assert 0 < result.info["channels_moved"] <= result.info["channels_total"]
    direction = model.text_direction()
    before = model.guide.image_features(result.before) @ direction
    after = model.guide.image_features(result.after) @ direction
    assert (after > before).all()
    assert no_gradients(model, model.backbone, model.guide)


def test_generator_mode_trains_only_the_method(tmp_path):
    spec = edit_spec(tmp_path, methods=[{"name": "lora", "rank": 2, "targets": ["conv"], "tower": "synthesis"}], mode="generator")
    model = adaptkit.build(spec)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora." in n and n.startswith("backbone.generator.") for n in trainable)
    batch = {"seeds": torch.arange(4)}
    out = model.training_step(batch)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name
    # a few steps of the directional loss move the adapted images along the text direction
    seeds = {"seeds": torch.arange(100, 108)}
    with torch.no_grad():
        start = model.training_step(seeds).loss.item()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for step in range(15):
        opt.zero_grad()
        model.training_step({"seeds": torch.arange(step * 4, step * 4 + 4)}).loss.backward()
        opt.step()
    with torch.no_grad():
        assert model.training_step(seeds).loss.item() < start
    result = model.edit(seeds=[100, 101])
    assert result.strip.shape[1] == len(result.alphas)
    torch.testing.assert_close(result.strip[:, 0], result.before, atol=1e-5, rtol=1e-4)  # alpha 0 = the source generator
    torch.testing.assert_close(result.strip[:, result.alphas.index(1.0)], result.after, atol=1e-5, rtol=1e-4)


def test_latent_mode_with_methods_is_refused_when_run(tmp_path):
    spec = edit_spec(tmp_path, methods=[{"name": "lora", "rank": 2}])
    with pytest.raises(RunError, match="use mode: generator"):
        adaptkit.run(spec, log=lambda *_: None)


def test_sources_seed_w_and_inverted_image_agree(tmp_path):
    model = adaptkit.build(edit_spec(tmp_path, steps=3))
    by_seed = model.edit(seeds=[7])
    by_w = model.edit(w=by_seed.w_source)
    torch.testing.assert_close(by_w.before, by_seed.before)
    by_w_single = model.edit(w=by_seed.w_source[0, 0])  # one W vector, broadcast to W+
    torch.testing.assert_close(by_w_single.before, by_seed.before)
    inverted = model.edit(images=by_seed.before)
    start = (model.render(model.backbone.generator.broadcast(model.mean_latent())) - by_seed.before).pow(2).mean()
    assert inverted.info["inversion_mse"] < start.item()


def test_run_in_latent_mode_evaluates_and_writes_strips(tmp_path):
    result = adaptkit.run(edit_spec(tmp_path), log=lambda *_: None)
    test = result.metrics["test"]
    assert test["clip_after"] > test["clip_before"] and test["count"] == 4
    for name in ("edit_test.png", "edit_alpha_test.png", "edit_test.json"):
        assert (result.output_dir / name).exists(), name


def write_yaml(path, data) -> str:
    import yaml

    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_cli_edit_writes_png_json_and_latents(tmp_path, capsys):
    spec = write_yaml(tmp_path / "edit.yaml", edit_spec(tmp_path))
    out = tmp_path / "out" / "edit.png"
    out.parent.mkdir()
    code = main(["edit", spec, "--prompt", "a handwritten digit zero", "--seed", "3", "--seed", "4",
                 "--alphas", "0,1,2", "--out", str(out), "task.steps=10"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "a handwritten digit zero" in printed.out and "CLIP similarity" in printed.out
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["prompt"] == "a handwritten digit zero" and report["alphas"] == [0.0, 1.0, 2.0]
    assert len(report["per_source"]["clip_after"]) == 2
    assert out.exists() and (out.parent / "edit_w.safetensors").exists()
    # the saved latent is a source for the next edit
    again = tmp_path / "again.png"
    assert main(["edit", spec, "--w", str(out.parent / "edit_w.safetensors"), "--out", str(again), "task.steps=2"]) == 0


def test_cli_edit_of_a_generator_mode_run(tmp_path, capsys):
    spec = edit_spec(tmp_path, methods=[{"name": "lora", "rank": 2, "targets": ["conv"]}], mode="generator")
    spec_file = write_yaml(tmp_path / "nada.yaml", spec)
    assert main(["edit", spec_file, "--out", str(tmp_path / "x.png")]) == 2
    assert "train it first" in capsys.readouterr().err
    assert main(["run", spec_file]) == 0
    capsys.readouterr()
    assert main(["edit", str(tmp_path / "run"), "--seed", "1", "--out", str(tmp_path / "nada.png")]) == 0
    assert (tmp_path / "nada.png").exists()


def test_bad_input_errors(tmp_path, capsys):
    with pytest.raises(SpecError, match="give neutral too"):
        adaptkit.load_spec(edit_spec(tmp_path, mode="global", neutral=None))
    with pytest.raises(SpecError, match="cannot guide edits"):
        adaptkit.load_spec(edit_spec(tmp_path, clip={"name": "stylegan2"}))
    with pytest.raises(SpecError, match="task.clip.*model"):
        adaptkit.load_spec(edit_spec(tmp_path, clip={"name": "clip", "modle": "x"}))
    with pytest.raises(SpecError, match="template"):
        adaptkit.load_spec(edit_spec(tmp_path, templates=["no placeholder"]))
    bad_data = edit_spec(tmp_path)
    bad_data["data"] = {"name": "digits"}
    with pytest.raises(AdaptkitError, match="latent_seeds"):
        adaptkit.build(bad_data)
    model = adaptkit.build(edit_spec(tmp_path))
    with pytest.raises(AdaptkitError, match="a saved w must be"):
        model.edit(w=torch.zeros(2, 3, 16))
    with pytest.raises(AdaptkitError, match="exactly one source"):
        model.edit(seeds=[1], w=torch.zeros(16))
    # the command line: one clear message, exit status 2
    gan = write_yaml(tmp_path / "gan.yaml", {**edit_spec(tmp_path), "task": {"name": "stylegan2"}, "data": {"name": "digits"}})
    assert main(["edit", gan, "--out", str(tmp_path / "a.png")]) == 2
    assert "needs a spec whose task is clip_stylegan_edit" in capsys.readouterr().err
    spec = write_yaml(tmp_path / "edit.yaml", edit_spec(tmp_path))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    assert main(["edit", spec, "--image", str(tmp_path / "broken.png"), "--out", str(tmp_path / "b.png")]) == 2
    assert "cannot read the image" in capsys.readouterr().err
    assert main(["edit", spec, "--w", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "c.png")]) == 2
    assert "file not found" in capsys.readouterr().err
    assert main(["edit", spec, "--alphas", "1,x", "--out", str(tmp_path / "d.png")]) == 2
    assert "--alphas" in capsys.readouterr().err
