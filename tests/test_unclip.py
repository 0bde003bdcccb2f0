"""Text conditioning through CLIP (GLIDE-style ddpm_unet) and the unclip backbone (prior + decoder)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import adaptkit
from adaptkit.cli import main as cli
from adaptkit.errors import CheckpointError, CompatibilityError, SpecError
from tests.cli_helpers import torchrun

TEXT_UNET = {"name": "ddpm_unet", "model": "ddpm_unet_cross_tiny", "conditioning": "text", "text_encoder": {"model": "clip_tiny_digits"}}
TINY_STAGES = {"prior": {"model": "unclip_prior_tiny"}, "decoder": {"model": "unclip_decoder_tiny"}}


def unclip(stage, **stages):
    backbone = {"name": "unclip", "stage": stage, **copy.deepcopy(TINY_STAGES)}
    for name, extra in stages.items():
        backbone[name].update(extra)
    return backbone


def spec(tmp_path, backbone, methods=(), data="digits_captions", **train):
    return {
        "name": "tiny_text",
        "backbone": copy.deepcopy(backbone),
        "methods": list(methods),
        "task": {"name": "text_to_image", "preview": 0, "steps": 2},
        "data": {"name": data},
        "train": {"max_steps": 2, "batch_size": 8, "progress": False, **train},
        "output": {"dir": str(tmp_path / "run")},
    }


def built(tmp_path, backbone, methods=(), **kwargs):
    return adaptkit.build(spec(tmp_path, backbone, methods, **kwargs), keep_data=True)


def captioned_batch(model, n=4):
    return model.adaptkit.data.train.batch(range(n))


# ------------------------------------------------------------------------- GLIDE-style text conditioning
def test_text_condition_is_the_token_states_with_a_padding_mask(tmp_path):
    model = built(tmp_path, TEXT_UNET)
    cond = model.backbone.condition(prompts=["seven", "a photo of the digit seven."])
    assert cond["context"].shape == (2, 16, 64)
    lengths = cond["mask"].sum(dim=1).tolist()
    assert lengths[0] < lengths[1] and lengths[0] == 3  # start, "seven", end
    assert model.backbone.unet.config.cross_attention_dim == 64  # follows the text width


def test_system_prompt_rewrites_the_prompts_the_denoiser_sees(tmp_path):
    templated = built(tmp_path, TEXT_UNET, [{"name": "system_prompt", "templates": ["a handwritten {label}."]}])
    plain = built(tmp_path, TEXT_UNET)
    a = templated.backbone.condition(prompts=["7"])
    b = plain.backbone.condition(prompts=["a handwritten 7."])
    c = plain.backbone.condition(prompts=["7"])
    assert torch.equal(a["context"], b["context"]) and not torch.equal(a["context"], c["context"])


@pytest.mark.parametrize("tower, text_trains", [("unet", False), ("text", True)])
def test_the_text_tower_is_frozen_unless_a_method_adapts_it(tmp_path, tower, text_trains):
    model = built(tmp_path, TEXT_UNET, [{"name": "lora", "rank": 2, "tower": tower}])
    model.training_step(captioned_batch(model)).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    text = [g for n, g in grads.items() if n.startswith("backbone.text.")]
    assert bool(text) == text_trains
    assert all(g is not None for g in grads.values())  # every LoRA tensor is reached (B gets a gradient; A once B moves)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if n.endswith("lora_b"))


def test_text_models_generate_from_prompts_and_refuse_images(tmp_path):
    model = built(tmp_path, TEXT_UNET).eval()
    images, rows = model.generate(prompts=["a handwritten digit seven", "nine"], num=2, steps=2)
    assert images.shape == (4, 1, 8, 8) and rows == ["a handwritten digit seven", "nine"]
    with pytest.raises(CompatibilityError, match="image variations need an unclip backbone"):
        model.generate(images=torch.zeros(1, 1, 8, 8), num=1, steps=1)


def test_a_bad_text_encoder_spec_names_its_path(tmp_path):
    with pytest.raises(SpecError, match="text_encoder.modle"):
        adaptkit.load_spec(spec(tmp_path, {**TEXT_UNET, "text_encoder": {"modle": "clip_tiny_digits"}}))


# ------------------------------------------------------------------------- unclip
def test_the_prior_stage_learns_scaled_clip_image_embeddings_from_text(tmp_path):
    model = built(tmp_path, unclip("prior"), [{"name": "full", "tower": "prior"}])
    backbone = model.backbone
    batch = captioned_batch(model)
    target = backbone.target(batch)
    assert target.shape == (4, 64)
    assert torch.allclose(target.norm(dim=1), torch.full((4,), math.sqrt(64)), atol=1e-4)
    model.training_step(batch).loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(n.startswith("backbone.prior.") for n in trained)
    assert set(model.surface.towers) == {"prior", "text"}


def test_the_decoder_stage_denoises_images_given_their_embedding(tmp_path):
    model = built(tmp_path, unclip("decoder"), [{"name": "full", "tower": "decoder"}], data="digits")
    batch = model.adaptkit.data.train.batch(range(4))
    assert torch.equal(model.backbone.target(batch), batch["images"])
    cond = model.backbone.condition(images=batch["images"])
    assert cond["image_embed"].shape == (4, 64)
    null = model.backbone.denoiser.null_condition(4)
    assert torch.equal(null["image_embed"], torch.zeros(4, 64))
    model.training_step(batch).loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert "backbone.image_proj.weight" in trained and all(n.startswith(("backbone.decoder.", "backbone.image_proj.")) for n in trained)
    assert set(model.surface.towers) == {"decoder"}


def test_stage_validation_names_the_missing_tower(tmp_path):
    problems = adaptkit.registry()
    from adaptkit.compat import check_spec

    loaded = adaptkit.load_spec(spec(tmp_path, unclip("decoder"), [{"name": "lora", "tower": "prior"}]))
    assert any("no tower 'prior'" in p for p in check_spec(loaded, problems))


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory):
    """Two-step prior and decoder runs; the decoder run names the prior run's weights."""
    tmp = tmp_path_factory.mktemp("unclip")
    prior = adaptkit.run(spec(tmp / "p", unclip("prior"), [{"name": "full", "tower": "prior"}]), log=lambda *_: None)
    weights = str(prior.output_dir / "adapter.safetensors")
    decoder = adaptkit.run(spec(tmp / "d", unclip("decoder", prior={"pretrained": weights}), [{"name": "full", "tower": "decoder"}]),
                           log=lambda *_: None)
    return prior, decoder


def test_generation_runs_text_prior_decoder_and_image_variations(stage_runs):
    prior_run, decoder_run = stage_runs
    model = decoder_run.model.eval()
    trained_prior = prior_run.model.backbone.prior.state_dict()
    assert all(torch.equal(v, model.backbone.prior.state_dict()[k]) for k, v in trained_prior.items())
    images, rows = model.generate(prompts=["a handwritten digit seven"], num=3, steps=2, seed=1)
    again, _ = model.generate(prompts=["a handwritten digit seven"], num=3, steps=2, seed=1)
    assert images.shape == (3, 1, 8, 8) and torch.equal(images, again)
    source = decoder_run.model.adaptkit.data.test.batch(range(2))["images"]
    variations, rows = model.generate(images=source, num=2, steps=2)
    assert variations.shape == (4, 1, 8, 8) and rows == ["image 0", "image 1"]


def test_an_untrained_stage_is_a_clear_error(stage_runs):
    prior_run, _ = stage_runs
    with pytest.raises(CompatibilityError, match="backbone.decoder.pretrained"):
        prior_run.model.eval().generate(prompts=["seven"], num=1, steps=1)


def test_generate_cli_makes_variations_of_an_image_file(stage_runs, tmp_path, capsys):
    from PIL import Image

    _, decoder_run = stage_runs
    Image.new("L", (8, 8), 40).save(tmp_path / "source.png")
    out = tmp_path / "variations.png"
    assert cli(["generate", str(decoder_run.output_dir), "--image", str(tmp_path / "source.png"), "--num", "2", "--steps", "2", "--out", str(out)]) == 0
    assert out.exists() and len(list((tmp_path / "variations").glob("*.png"))) == 2
    assert "row: source.png" in capsys.readouterr().out


def test_a_stage_file_of_the_wrong_stage_is_refused(stage_runs, tmp_path):
    prior_run, _ = stage_runs
    with pytest.raises(CheckpointError, match="backbone.decoder.pretrained"):
        built(tmp_path, unclip("prior", decoder={"pretrained": str(prior_run.output_dir / "adapter.safetensors")}))


@pytest.mark.slow
def test_ddp_trains_a_stage_whose_model_holds_unused_parameters(tmp_path):
    """PriorTransformer's clip_mean / clip_std never take part in a step: DDP must tolerate them."""
    ddp = spec(tmp_path, unclip("prior"), [{"name": "full", "tower": "prior"}], max_steps=2)
    done = torchrun(tmp_path, ddp)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "x2" in done.stdout and (tmp_path / "run" / "adapter.safetensors").exists()


def test_each_unclip_stage_checks_its_own_sampling_steps_against_its_schedule(tmp_path):
    # generation runs the prior with backbone.prior.steps and the decoder with the task's (or --steps) steps
    few = {"noise_schedule": {"num_train_timesteps": 40}}  # the prior samples with 25 steps by default
    model = built(tmp_path, unclip("decoder", prior=few))
    assert model.sampler_settings(steps=50).steps == 50  # the decoder's 1000 timesteps allow it
    with pytest.raises(CompatibilityError, match="steps 1001: more sampling steps than the 1000"):
        model.sampler_settings(steps=1001)
    with pytest.raises(CompatibilityError, match="backbone.prior.steps 50: more sampling steps than the 40"):
        built(tmp_path, unclip("decoder", prior={**few, "steps": 50}))
