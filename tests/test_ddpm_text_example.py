"""examples/ddpm_text_digits.yaml: the GLIDE-style text-conditioned DDPM a user runs after clip_pretrain_digits."""

from __future__ import annotations

from pathlib import Path

import pytest

import adaptkit
from adaptkit.cli import main as cli
from adaptkit.errors import AdaptkitError

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "ddpm_text_digits.yaml"
#: the example's model at test size: the tiny cross-attention UNet and an untrained CLIP (no run needed)
TINY = ["backbone.model=ddpm_unet_cross_tiny", "backbone.text_encoder={model: clip_tiny_digits}", "task.preview=0", "task.steps=2"]


def test_the_example_validates_on_a_fresh_clone(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no runs/clip_pretrain_digits here: validating does not need it
    assert cli(["validate", str(EXAMPLE)]) == 0
    assert "ok" in capsys.readouterr().out


def test_building_before_the_clip_run_says_which_file_is_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AdaptkitError, match="runs/clip_pretrain_digits/adapter.safetensors"):
        adaptkit.build(adaptkit.load_spec(EXAMPLE, [f"output.dir={tmp_path / 'run'}"]))


def test_the_example_trains_the_unet_on_captions_and_leaves_the_text_tower_frozen(tmp_path):
    model = adaptkit.build(adaptkit.load_spec(EXAMPLE, [*TINY, f"output.dir={tmp_path / 'run'}"]), keep_data=True)
    trainable = {name.split(".")[1] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"unet"}
    assert model.backbone.conditioning == "text" and model.backbone.cross

    batch = model.adaptkit.data.train.batch(range(4))
    assert all(isinstance(c, str) and c for c in batch["captions"])
    model.training_step(batch).loss.backward()
    frozen_text = [p for name, p in model.named_parameters() if name.startswith("backbone.text.")]
    assert frozen_text and all(p.grad is None for p in frozen_text)

    images, rows = model.eval().generate(prompts=["a handwritten digit seven"], num=2, seed=0)
    assert images.shape == (2, 1, 8, 8) and rows == ["a handwritten digit seven"]
