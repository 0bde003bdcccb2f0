"""A build with the base left on the meta device (train.strategy fsdp): the same model once filled in,
and what the task and methods create does not depend on how the base was made."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from adaptkit.builder import build
from adaptkit.deferred import fill_whole, is_deferred
from adaptkit.distributed import DistInfo
from adaptkit.errors import CheckpointError
from adaptkit.spec import TrainSpec
from adaptkit.train import Trainer

CASES = {
    "vit_lora": ("vit", "vit_tiny_digits", [{"name": "lora", "rank": 2}]),
    "vit_prefix": ("vit", "vit_tiny_digits", [{"name": "prefix"}]),
    "swin_lora": ("swin", "swin_tiny_digits", [{"name": "lora", "rank": 2}]),
    "clip_lora": ("clip", "clip_tiny_digits", [{"name": "lora", "rank": 2}]),
}


def spec_for(backbone: str, model: str, methods: list) -> dict:
    task, data = ({"name": "zero_shot"}, {"name": "digits", "classes": [0, 1]}) if backbone == "clip" else ({"name": "classification"}, {"name": "digits"})
    return {"name": "deferred", "seed": 3, "backbone": {"name": backbone, "model": model}, "methods": methods,
            "task": task, "data": data}


def with_weights_file(spec: dict, tmp_path, change=None) -> dict:
    """``spec`` pointing at a safetensors file of its backbone's (random) base weights."""
    state = {k: v.contiguous().clone() for k, v in build({**spec, "methods": []}).backbone.state_dict().items()}
    if change:
        change(state)
    path = tmp_path / "base.safetensors"
    save_file(state, str(path))
    return {**spec, "backbone": {**spec["backbone"], "pretrained": str(path)}}


def trained(model) -> dict:
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_deferred_build_fills_in_to_the_whole_build(tmp_path, monkeypatch, case):
    spec = with_weights_file(spec_for(*CASES[case]), tmp_path)
    monkeypatch.setenv("ADAPTKIT_CACHE_DIR", str(tmp_path / "cache_whole"))
    whole = build(spec)
    monkeypatch.setenv("ADAPTKIT_CACHE_DIR", str(tmp_path / "cache_deferred"))  # the fingerprint hashed from the file, lazily
    deferred = build(spec, defer_base=True)
    assert is_deferred(deferred) and "left on the meta device" in deferred.adaptkit.base_build
    assert all(p.is_meta for p in deferred.backbone.parameters() if not p.requires_grad)
    assert deferred.adaptkit.base_fingerprint == whole.adaptkit.base_fingerprint
    a, b = trained(whole), trained(deferred)
    assert sorted(a) == sorted(b) and a and not any(t.is_meta for t in b.values())
    for name, value in a.items():
        assert torch.equal(b[name], value), name
    fill_whole(deferred)
    assert not is_deferred(deferred)
    whole_state, filled = whole.state_dict(), deferred.state_dict()
    assert sorted(whole_state) == sorted(filled)
    for name, value in whole_state.items():
        assert torch.equal(filled[name], value), name


def test_what_trains_does_not_depend_on_how_the_base_was_made(tmp_path):
    """Heads and LoRA factors draw from their own seed after the backbone: the same values over a
    random base and over one read from a file (which draws nothing from the generator)."""
    spec = spec_for(*CASES["vit_lora"])
    random_base, file_base = build(spec), build(with_weights_file(spec, tmp_path))
    a, b = trained(random_base), trained(file_base)
    assert sorted(a) == sorted(b) and a
    for name, value in a.items():
        assert torch.equal(b[name], value), name
    other_seed = trained(build({**spec, "seed": 4}))
    assert any(not torch.equal(other_seed[name], value) for name, value in a.items())


def test_a_base_that_cannot_wait_on_the_meta_device_is_built_whole_saying_why(tmp_path):
    random_base = build(spec_for(*CASES["vit_lora"]), defer_base=True)
    assert not is_deferred(random_base)
    assert random_base.adaptkit.base_build.startswith("every process built the whole model (")
    assert "is not read from a safetensors weights file" in random_base.adaptkit.base_build
    ddpm = {"name": "ddpm", "seed": 0, "backbone": {"name": "ddpm_unet", "model": "ddpm_unet_tiny"}, "methods": [{"name": "lora", "rank": 2}],
            "task": {"name": "text_to_image", "preview": 0}, "data": {"name": "digits"}}
    build({**ddpm, "methods": []}).backbone.unet.save_pretrained(str(tmp_path / "unet"), safe_serialization=False)
    pickled = build({**ddpm, "backbone": {**ddpm["backbone"], "pretrained": str(tmp_path / "unet")}}, defer_base=True)
    assert not is_deferred(pickled)
    assert pickled.adaptkit.base_build == (f"every process built the whole model (the backbone cannot be created on the meta device: "
                                           f"{tmp_path / 'unet'} holds no diffusion_pytorch_model.safetensors to read by rows)")


def test_a_deferred_weight_holding_nan_is_refused_when_read(tmp_path):
    def poison(state):
        state["net.blocks.0.attn.qkv.weight"][0, 0] = float("nan")

    spec = with_weights_file(spec_for(*CASES["vit_lora"]), tmp_path, poison)
    with pytest.raises(CheckpointError, match="NaN"):
        build(spec)
    deferred = build(spec, defer_base=True)  # the header alone is read at build
    with pytest.raises(CheckpointError, match="NaN"):
        fill_whole(deferred)


def test_a_deferred_model_trained_without_torchrun_is_read_whole_first(tmp_path):
    spec = with_weights_file(spec_for(*CASES["vit_lora"]), tmp_path)
    model = build(spec, keep_data=True, defer_base=True)
    trainer = Trainer(model, model.adaptkit.data, TrainSpec(max_steps=1, progress=False), seed=0, lr=1e-3, weight_decay=0.0,
                      output_dir=tmp_path / "run", device=torch.device("cpu"), dist=DistInfo(), log=lambda line: None)
    prepared = trainer._prepare_model()
    assert not is_deferred(prepared)
    assert torch.equal(prepared.backbone.net.blocks[0].attn.qkv.weight, build(spec).backbone.net.blocks[0].attn.qkv.weight)
    assert all(p.requires_grad for _, p in trainer.trainable) and dict(trainer.trainable).keys() == trained(prepared).keys()


def assert_fills_in_to(whole, deferred) -> None:
    assert is_deferred(deferred) and deferred.adaptkit.base_fingerprint == whole.adaptkit.base_fingerprint
    fill_whole(deferred)
    a, b = whole.state_dict(), deferred.state_dict()
    assert sorted(a) == sorted(b) and a
    for name, value in a.items():
        assert torch.equal(b[name], value), name


def test_a_pipeline_folder_waits_on_the_meta_device_part_by_part(tmp_path):
    """sd_pipeline: the UNet, VAE and CLIP text encoder of a diffusers pipeline folder are each built
    from their config and read from their own safetensors file; a text encoder kept as a pickle
    (pytorch_model.bin) is built whole, saying so."""
    from adaptkit_plugins.diffusion.tiny_pipeline import write_tiny_pipeline

    folder = write_tiny_pipeline(tmp_path / "pipe", seed=0)
    spec = {"name": "sd", "seed": 0, "backbone": {"name": "sd_pipeline", "pretrained": str(folder)},
            "methods": [{"name": "lora", "rank": 2, "tower": "all", "targets": ["attn.q", "attn.v"]}],
            "task": {"name": "text_to_image", "preview": 0}, "data": {"name": "digits_captions"}}
    deferred = build(spec, defer_base=True)
    assert deferred.adaptkit.base_build == ("base weights left on the meta device; each process reads its shard of "
                                            "unet/diffusion_pytorch_model.safetensors, vae/diffusion_pytorch_model.safetensors, "
                                            "text_encoder/model.safetensors")
    assert deferred.backbone.native_attention == build(spec).backbone.native_attention
    assert_fills_in_to(build(spec), deferred)

    from safetensors.torch import load_file

    text = folder / "text_encoder"
    torch.save(load_file(str(text / "model.safetensors")), str(text / "pytorch_model.bin"))
    (text / "model.safetensors").unlink()
    pickled = build(spec, defer_base=True)
    assert not is_deferred(pickled)
    assert pickled.adaptkit.base_build.endswith(f"{text} holds no model.safetensors to read by rows)")


def test_unclip_waits_on_the_meta_device_when_every_part_has_a_file(tmp_path):
    """unclip: the CLIP and both stages read from their files (a stage file holds backbone.prior.* or
    backbone.decoder.*, as a stage run's adapter does)."""
    tiny = {"name": "unclip", "stage": "decoder", "prior": {"model": "unclip_prior_tiny"}, "decoder": {"model": "unclip_decoder_tiny"}}
    spec = {"name": "unclip", "seed": 0, "backbone": tiny, "methods": [{"name": "lora", "rank": 2, "tower": "decoder"}],
            "task": {"name": "text_to_image", "preview": 0}, "data": {"name": "digits_captions"}}
    state = {k: v.contiguous().clone() for k, v in build({**spec, "methods": []}).backbone.state_dict().items()}
    save_file({k[len("clip.net."):]: v for k, v in state.items() if k.startswith("clip.")}, str(tmp_path / "clip.safetensors"))
    for stage, own in (("prior", ("prior.", "token_proj.")), ("decoder", ("decoder.", "image_proj."))):
        save_file({f"backbone.{k}": v for k, v in state.items() if k.startswith(own)}, str(tmp_path / f"{stage}.safetensors"))
    files = {"clip": {"pretrained": str(tmp_path / "clip.safetensors")},
             "prior": {**tiny["prior"], "pretrained": str(tmp_path / "prior.safetensors")},
             "decoder": {**tiny["decoder"], "pretrained": str(tmp_path / "decoder.safetensors")}}
    spec["backbone"] = {**tiny, **files}
    deferred = build(spec, defer_base=True)
    assert "each process reads its shard of clip.safetensors, prior.safetensors, decoder.safetensors" in deferred.adaptkit.base_build
    assert_fills_in_to(build(spec), deferred)
