"""DreamBooth in the text_to_image task: instance captions, class images, the prior-preservation loss."""

from __future__ import annotations

import pytest
import torch

import adaptkit
from adaptkit.checkpoint import load_tensors
from adaptkit.errors import AdaptkitError, CompatibilityError, DataError
from adaptkit_plugins.diffusion import _dreambooth_impl
from adaptkit_plugins.diffusion._dreambooth_impl import CLASS_IMAGES_FILE
from tests.conftest import crash_run_after

INSTANCE, CLASS = "a photo of sks digit", "a photo of a digit"


def spec(tmp_path, task=None, methods=None, **train):
    return {
        "name": "dreambooth", "seed": 0,
        "backbone": {"name": "ddpm_unet", "model": "ddpm_unet_cross_tiny", "conditioning": "text",
                     "text_encoder": {"model": "clip_tiny_digits"}},
        "methods": methods if methods is not None else [{"name": "lora", "tower": "unet", "rank": 2}],
        "task": {"name": "text_to_image", "instance_prompt": INSTANCE, "prior_preservation": True, "class_prompt": CLASS,
                 "num_class_images": 4, "condition_dropout": 0.0, "preview": 0, "steps": 2, **(task or {})},
        "data": {"name": "digits", "classes": [7, 1]},
        "train": {"max_steps": 2, "batch_size": 4, **train},
        "output": {"dir": str(tmp_path / "run")},
    }


def instance_batch(model):
    batch = model.adaptkit.data.train.batch(range(4))
    generator = torch.Generator().manual_seed(3)
    batch["timesteps"] = torch.randint(0, model.num_timesteps, (4,), generator=generator)
    batch["noise"] = torch.randn(batch["images"].shape, generator=generator)
    return batch


def loss_with(model, batch, **task):
    model.params = model.dreambooth.params = model.params.model_copy(update=task)
    torch.manual_seed(11)  # the class images' draw, timesteps and noise
    return model.training_step(batch).loss.item()


def test_every_image_is_captioned_with_the_instance_prompt(tmp_path):
    model = adaptkit.build(spec(tmp_path), keep_data=True)
    model.dreambooth.ensure_class_images(model)  # sampling them conditions the model too
    seen = []
    original = model.backbone.condition
    model.backbone.condition = lambda **kw: seen.append(kw["prompts"]) or original(**kw)
    model.training_step(instance_batch(model))
    assert seen == [[INSTANCE] * 4, [CLASS] * 4]  # the instance batch, then as many class images


def test_the_prior_loss_is_added_with_its_weight(tmp_path):
    model = adaptkit.build(spec(tmp_path), keep_data=True)
    batch = instance_batch(model)
    plain = adaptkit.build(spec(tmp_path, task={"prior_preservation": False, "class_prompt": None, "num_class_images": 100}),
                           keep_data=True)
    instance_only = loss_with(plain, batch)
    weights = {w: loss_with(model, batch, prior_loss_weight=w) for w in (0.0, 1.0, 2.5)}
    assert weights[0.0] == pytest.approx(instance_only, rel=1e-6)
    class_loss = weights[1.0] - weights[0.0]
    assert class_loss > 0
    assert weights[2.5] == pytest.approx(weights[0.0] + 2.5 * class_loss, rel=1e-5)


@pytest.mark.slow
def test_class_images_are_sampled_once_and_reused_on_resume(tmp_path, monkeypatch):
    whole = adaptkit.run(spec(tmp_path / "whole", max_steps=3))
    calls = []
    sample = _dreambooth_impl.sample_class_images
    monkeypatch.setattr(_dreambooth_impl, "sample_class_images", lambda *a: calls.append(a[1:]) or sample(*a))
    crash_run_after(1, lambda: adaptkit.run(spec(tmp_path, max_steps=3, checkpoint_every=1)))
    assert calls == [(CLASS, 4, 0)]
    stored = tmp_path / "run" / CLASS_IMAGES_FILE
    images = load_tensors(stored)[0]["images"]
    assert images.shape == (4, 1, 8, 8) and images.abs().max() <= 1.0
    resumed = adaptkit.run(spec(tmp_path, max_steps=3, checkpoint_every=1, resume=True))
    assert len(calls) == 1  # read back, not sampled again from the model that trained since
    adapter = lambda run: load_tensors(run.output_dir / "adapter.safetensors")[0]  # noqa: E731
    for name, value in adapter(whole).items():
        assert torch.equal(value, adapter(resumed)[name]), name
    with pytest.raises(DataError, match="sampled with .*'a photo of a digit'.*delete the file"):
        _dreambooth_impl.read_class_images(stored, {"class_prompt": "a photo of a number", "num_class_images": "4", "seed": "0"})


def test_class_images_come_from_the_base_model(tmp_path):
    model = adaptkit.build(spec(tmp_path, methods=[{"name": "lora", "tower": "unet", "rank": 2}]), keep_data=True)
    with torch.no_grad():  # a LoRA that changes the model: switched off while sampling
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.5)
    images = model.dreambooth.ensure_class_images(model)
    base = adaptkit.build(spec(tmp_path, methods=[]))
    expected, _ = base.generate(prompts=[CLASS], num=4, seed=0)
    torch.testing.assert_close(images, expected.clamp(-1, 1))


@pytest.mark.slow
def test_lora_dreambooth_runs_end_to_end(tmp_path):
    result = adaptkit.run(spec(tmp_path, task={"preview": 1}, max_steps=3))
    assert (result.output_dir / "adapter.safetensors").is_file() and (result.output_dir / "samples.png").is_file()
    loaded = adaptkit.load_trained(result.output_dir)
    images, rows = loaded.generate(prompts=[INSTANCE], num=2, seed=0)
    assert images.shape == (2, 1, 8, 8) and rows == [INSTANCE] and torch.isfinite(images).all()


@pytest.mark.parametrize(("task", "message"), [
    ({"class_prompt": None}, "prior_preservation needs class_prompt"),
    ({"instance_prompt": None}, "prior_preservation needs instance_prompt"),
    ({"prior_preservation": False}, "class_prompt, num_class_images only apply with prior_preservation: true"),
    ({"prior_loss_weight": -1}, "prior_loss_weight"),
])
def test_bad_dreambooth_options_are_named(tmp_path, task, message):
    with pytest.raises(AdaptkitError, match=message):
        adaptkit.build(spec(tmp_path, task=task))


def test_instance_prompts_need_a_text_conditioned_model(tmp_path):
    bad = spec(tmp_path, task={"prior_preservation": False, "class_prompt": None, "num_class_images": 100})
    bad["backbone"] = {"name": "ddpm_unet", "model": "ddpm_unet_tiny", "conditioning": "class", "num_classes": 2}
    with pytest.raises(CompatibilityError, match="instance_prompt: DreamBooth captions every image, but this model is conditioned on 'class'"):
        adaptkit.build(bad)


@pytest.mark.slow
@pytest.mark.parametrize("example", ["textual_inversion_digits.yaml", "dreambooth_lora_digits.yaml"])
def test_the_examples_run_at_test_size(tmp_path, example):
    from pathlib import Path

    tiny = ["backbone.model=ddpm_unet_cross_tiny", "backbone.pretrained=null", "backbone.text_encoder={model: clip_tiny_digits}",
            "task.steps=2", "task.preview=1", "train.max_steps=2", "train.batch_size=4", f"output.dir={tmp_path / 'run'}"]
    if example.startswith("dreambooth"):
        tiny.append("task.num_class_images=2")
    path = Path(__file__).resolve().parent.parent / "examples" / example
    result = adaptkit.run(adaptkit.load_spec(path, tiny))
    assert (result.output_dir / "samples.png").is_file()
    assert (result.output_dir / CLASS_IMAGES_FILE).is_file() == example.startswith("dreambooth")
