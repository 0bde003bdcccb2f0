"""The ``autoencoder`` task: stage 1 of latent diffusion (the pipeline's VAE), on the tiny sd_tiny preset.

It trains the VAE and nothing else, estimates the latents' scaling factor, and ``adaptkit merge``
writes a pipeline folder (the scaling factor in vae/config.json) that diffusers and the
``sd_pipeline`` backbone load for stage 2."""

from __future__ import annotations

import json

import pytest
import torch

import adaptkit
from adaptkit.builder import build
from adaptkit.cli import main as cli
from adaptkit.errors import CompatibilityError
from adaptkit.native import merge_to_native
from adaptkit.runner import load_run


def spec_of(task=None, methods=({"name": "full", "tower": "vae"},), steps=6, **backbone):
    return {"name": "vae", "seed": 0, "backbone": {"name": "sd_pipeline", "model": "sd_tiny", **backbone},
            "methods": list(methods), "task": {"name": "autoencoder", "preview": 2, **(task or {})},
            "data": {"name": "digits"},
            "train": {"max_steps": steps, "batch_size": 16, "eval_every": steps, "lr": 3e-3, "weight_decay": 0.0, "progress": False}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("ae") / "run"
    spec = adaptkit.load_spec(spec_of(), [f"output.dir={out}"])
    base = build(spec)
    before = {k: v.clone() for k, v in base.backbone.state_dict().items()}
    result = adaptkit.run(spec, log=lambda *_: None)
    return out, result, (before, base.eval())


def test_only_the_vae_trains_and_its_loss_falls(trained):
    out, result, (before, base) = trained
    after = result.model.backbone.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("vae.") for k in changed)
    assert any(k.startswith("vae.decoder.") for k in changed) and any(k.startswith("vae.encoder.") for k in changed)
    images = torch.stack(_val_images(out))
    errors = [float((model.reconstruct(images) - images).pow(2).mean()) for model in (base, result.model.eval())]
    assert errors[1] < 0.8 * errors[0]
    assert (out / "reconstructions.png").is_file()
    assert 0 < result.metrics["val"]["reconstruction"] and result.metrics["val"]["psnr"] > 0


def test_scaling_factor_is_one_over_the_latents_std(trained):
    out, result, _ = trained
    model = result.model.eval()
    scale = model.latent_scale.factor
    assert scale != float(model.backbone.vae.config.scaling_factor)  # estimated, not the preset's
    images = next(iter(torch.utils.data.DataLoader(_val_images(out), batch_size=64)))
    with torch.no_grad():
        latents = model.backbone.vae.encode(images).latent_dist.sample(generator=torch.Generator().manual_seed(0))
    # a running estimate over the (few) training steps: near, not equal to, one batch's
    assert scale == pytest.approx(1 / float(latents.std()), rel=0.35)
    reloaded = load_run(out)
    assert reloaded.latent_scale.factor == scale


def _val_images(out):
    """64 real digits at the tiny pipeline's input (16x16 RGB in [-1, 1]), as the data source makes them."""
    from adaptkit_plugins.data.digits import load_digit_images
    from adaptkit_plugins.data.image_samples import fit_images

    images, _, _ = load_digit_images(None)
    return list(fit_images(images[-64:], (16, 16), 3))


def test_merge_writes_a_pipeline_folder_with_the_trained_vae_and_its_scaling_factor(trained, tmp_path):
    import diffusers

    out, result, _ = trained
    assert cli(["merge", str(out), str(tmp_path / "pipe")]) == 0
    config = json.loads((tmp_path / "pipe" / "vae" / "config.json").read_text())
    assert config["scaling_factor"] == pytest.approx(result.model.latent_scale.factor)
    assert not (tmp_path / "pipe" / "task_modules.safetensors").exists()
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(tmp_path / "pipe"))
    for name, tensor in result.model.backbone.vae.state_dict().items():
        assert torch.equal(pipe.vae.state_dict()[name], tensor), name
    stage2 = build(adaptkit.load_spec({
        "name": "unet", "seed": 0, "backbone": {"name": "sd_pipeline", "pretrained": str(tmp_path / "pipe")},
        "methods": [{"name": "full", "tower": "unet"}], "task": {"name": "text_to_image", "preview": 0, "steps": 2},
        "data": {"name": "digits"}}))
    assert stage2.backbone.vae.config.scaling_factor == pytest.approx(config["scaling_factor"])
    assert not any(p.requires_grad for p in stage2.backbone.vae.parameters())


def test_a_given_scaling_factor_is_kept_and_not_trained():
    model = build(adaptkit.load_spec(spec_of({"scaling_factor": 0.25})))
    assert model.latent_scale.factor == 0.25 and not model.latent_scale.value.requires_grad
    native = merge_to_native(model)
    assert native.model.vae.config.scaling_factor == 0.25


def test_tower_all_means_the_vae_on_this_task():
    model = build(adaptkit.load_spec(spec_of(methods=[{"name": "full", "tower": "all"}])))
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("backbone.vae.") or n.startswith("latent_scale.") for n in trained)


@pytest.mark.parametrize("spec, message", [
    (spec_of(methods=[{"name": "full", "tower": "unet"}]), "has no tower 'unet'; towers: vae"),
    ({**spec_of(), "backbone": {"name": "ddpm_unet", "model": "ddpm_unet_8"}}, "task 'autoencoder' needs a backbone with autoencode"),
    ({**spec_of(), "task": {"name": "text_to_image"}}, "has no tower 'vae'"),
])
def test_clear_errors(spec, message):
    with pytest.raises(CompatibilityError, match=message):
        build(adaptkit.load_spec(spec))


def test_a_resumed_run_goes_on_averaging_the_scaling_factor(tmp_path):
    """The running estimate's state is checkpointed: a run stopped after step 3 and resumed ends
    with the factor of an uninterrupted run (not one restarted from the first batch after resume)."""
    from tests.conftest import crash_run_after

    whole = adaptkit.run(adaptkit.load_spec(spec_of(), [f"output.dir={tmp_path / 'whole'}", "train.checkpoint_every=3"]),
                         log=lambda *_: None)
    stopped = adaptkit.load_spec(spec_of(), [f"output.dir={tmp_path / 'stopped'}", "train.checkpoint_every=3"])
    crash_run_after(3, lambda: adaptkit.run(stopped, log=lambda *_: None))
    resumed = adaptkit.run(adaptkit.load_spec(spec_of(), [f"output.dir={tmp_path / 'stopped'}", "train.checkpoint_every=3",
                                                          "train.resume=true"]), log=lambda *_: None)
    assert resumed.model.latent_scale.factor == pytest.approx(whole.model.latent_scale.factor, rel=1e-5)
