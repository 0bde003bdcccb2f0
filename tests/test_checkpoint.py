"""Adapter checkpoints: round trip, metadata, damaged files, wrong base, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch

import adaptkit
from adaptkit.checkpoint import load_tensors, load_weights, read_metadata, save_tensors
from adaptkit.errors import CheckpointError
from tests.conftest import tiny_vit_spec


class PickledObject:
    """Anything but a tensor: weights_only loading must refuse it."""


@pytest.fixture
def trained(tmp_path):
    spec = tiny_vit_spec(tmp_path)
    model = adaptkit.build(spec)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    path = adaptkit.save_adapter(model, tmp_path / "adapter.safetensors")
    return spec, model, path


def test_round_trip_reproduces_outputs(trained, tmp_path):
    spec, model, path = trained
    fresh = adaptkit.build(spec)
    x = torch.randn(4, 1, 8, 8)
    model.eval(), fresh.eval()
    assert not torch.equal(fresh.logits(x), model.logits(x))
    metadata = adaptkit.load_adapter(fresh, path)
    assert torch.equal(fresh.logits(x), model.logits(x))
    assert json.loads(metadata["spec"])["methods"][0]["name"] == "lora"
    assert metadata["adaptkit_version"] == adaptkit.__version__
    assert metadata["base_fingerprint"] == model.adaptkit.base_fingerprint


def test_adapter_holds_only_trained_tensors(trained):
    _, model, path = trained
    tensors, _ = load_tensors(path)
    assert set(tensors) == set(adaptkit.trainable_state(model))
    assert path.stat().st_size < 60_000  # KBs, not the whole model


def test_wrong_base_is_refused(trained, tmp_path):
    spec, _, path = trained
    other = adaptkit.build({**spec, "seed": 1})  # another random base
    with pytest.raises(CheckpointError, match="trained on other base weights"):
        adaptkit.load_adapter(other, path)


def test_adapter_of_another_spec_is_refused(trained, tmp_path):
    spec, _, path = trained
    other = adaptkit.build({**spec, "methods": [{"name": "lora", "rank": 4}]})
    with pytest.raises(CheckpointError, match="has shape"):
        adaptkit.load_adapter(other, path, check_base=False)
    full = adaptkit.build({**spec, "methods": [{"name": "full", "targets": ["head"]}]})
    with pytest.raises(CheckpointError, match="tensors this model does not have"):
        adaptkit.load_adapter(full, path, check_base=False)


def test_truncated_and_tampered_files_are_refused(trained, tmp_path):
    _, model, path = trained
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="damaged or truncated|not a readable"):
        load_tensors(truncated)
    tampered = tmp_path / "tampered.safetensors"
    body = bytearray(data)
    body[-3] ^= 0xFF
    tampered.write_bytes(bytes(body))
    with pytest.raises(CheckpointError, match="do not match the file's recorded hash"):
        adaptkit.load_adapter(model, tampered)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError):
        read_metadata(garbage)
    with pytest.raises(CheckpointError, match="file not found"):
        load_tensors(tmp_path / "missing.safetensors")


def test_failed_write_leaves_the_previous_file_intact(tmp_path):
    path = save_tensors(tmp_path / "a.safetensors", {"x": torch.ones(3)})
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_tensors(path, {"x": "not a tensor"})  # type: ignore[dict-item]
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_torch_files_load_weights_only(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    assert torch.equal(load_weights(tmp_path / "ok.pt")["w"], torch.ones(2))

    torch.save({"w": PickledObject()}, tmp_path / "pickle.pt")
    with pytest.raises(CheckpointError, match="weights-only"):
        load_weights(tmp_path / "pickle.pt")


def test_pretrained_backbone_from_an_adaptkit_run(tmp_path):
    """A full-fine-tuned run's adapter file is a complete base for the next run."""
    spec = tiny_vit_spec(tmp_path, methods=[{"name": "full"}])
    model = adaptkit.build(spec)
    path = adaptkit.save_adapter(model, tmp_path / "full.safetensors")
    spec2 = tiny_vit_spec(tmp_path, methods=[{"name": "lora", "rank": 2}])
    spec2["backbone"] = {"name": "vit", "model": "vit_tiny_digits", "pretrained": str(path)}
    spec2["data"] = {"name": "digits", "classes": [5, 6, 7]}
    adapted = adaptkit.build(spec2)
    for key, value in model.backbone.net.state_dict().items():
        assert torch.equal(adapted.backbone.net.state_dict()[key], value), key
    assert adapted.head.out_features == 3
    lora_file = adaptkit.save_adapter(adapted, tmp_path / "lora.safetensors")
    spec2["backbone"]["pretrained"] = str(lora_file)
    with pytest.raises(CheckpointError, match="looks like an adapter file"):
        adaptkit.build(spec2)
