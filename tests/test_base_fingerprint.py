"""The base-weight fingerprint: hashed once per weights file, cached, invalidated when the file changes."""

from __future__ import annotations

import os

import pytest
import adaptkit
import adaptkit.checkpoint as checkpoint
from safetensors.torch import load_file, save, save_file
from adaptkit.errors import CheckpointError
from tests.conftest import tiny_vit_spec


@pytest.fixture
def counted(monkeypatch, tmp_path):
    """Count the full hashes of base weights; each test gets its own empty cache."""
    monkeypatch.setenv("ADAPTKIT_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    real = checkpoint.fingerprint

    def counting(state):
        calls.append(len(state))
        return real(state)

    monkeypatch.setattr(checkpoint, "fingerprint", counting)
    return calls


def _base_file(tmp_path, seed: int) -> str:
    """The tiny ViT's base weights of ``seed`` as a local safetensors file (timm's names)."""
    model = adaptkit.build({**tiny_vit_spec(tmp_path), "seed": seed, "methods": []})
    state = {k[len("backbone.net."):]: v for k, v in model.state_dict().items() if k.startswith("backbone.net.")}
    path = tmp_path / f"base{seed}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))  # as timm writes it: no adaptkit hashes
    return str(path)


def _spec(tmp_path, weights: str) -> dict:
    return tiny_vit_spec(tmp_path, backbone={"name": "vit", "model": "vit_tiny_digits", "pretrained": weights})


def test_fingerprint_is_hashed_once_per_file_and_equals_the_full_hash(tmp_path, counted):
    weights = _base_file(tmp_path, 0)
    counted.clear()
    first = adaptkit.build(_spec(tmp_path, weights))
    assert len(counted) == 1
    second = adaptkit.build(_spec(tmp_path, weights))
    assert len(counted) == 1  # read from the cache
    assert first.adaptkit.base_fingerprint == second.adaptkit.base_fingerprint
    plain = adaptkit.build({**_spec(tmp_path, weights), "methods": []})
    assert first.adaptkit.base_fingerprint == checkpoint.fingerprint(plain.backbone.base_state_dict())


def test_cache_is_invalidated_when_the_file_changes(tmp_path, counted):
    weights = _base_file(tmp_path, 0)
    other = _base_file(tmp_path, 1)
    model = adaptkit.build(_spec(tmp_path, weights))
    path = adaptkit.save_adapter(model, tmp_path / "adapter.safetensors")
    before = model.adaptkit.base_fingerprint
    os.replace(other, weights)  # same path, other weights
    counted.clear()
    changed = adaptkit.build(_spec(tmp_path, weights))
    assert len(counted) == 1  # hashed afresh
    assert changed.adaptkit.base_fingerprint != before
    with pytest.raises(CheckpointError, match="trained on other base weights"):
        adaptkit.load_adapter(changed, path)


def test_rewritten_in_place_with_the_same_size_is_rehashed(tmp_path, counted):
    weights = _base_file(tmp_path, 0)
    before = adaptkit.build(_spec(tmp_path, weights)).adaptkit.base_fingerprint
    size = os.path.getsize(weights)
    tensors = load_file(weights)
    tensors["cls_token"] += 1
    with open(weights, "r+b") as handle:  # the same file (inode), rewritten in place
        handle.write(save(tensors))
    assert os.path.getsize(weights) == size
    counted.clear()
    after = adaptkit.build(_spec(tmp_path, weights)).adaptkit.base_fingerprint
    assert len(counted) == 1 and after != before


def test_params_and_builds_without_files_are_not_cached(tmp_path, counted):
    weights = _base_file(tmp_path, 0)
    counted.clear()
    adaptkit.build(_spec(tmp_path, weights))
    adaptkit.build(tiny_vit_spec(tmp_path, backbone={"name": "vit", "model": "vit_tiny_digits", "pretrained": weights,
                                                     "drop_path_rate": 0.1}))
    assert len(counted) == 2  # other params: another entry
    adaptkit.build(tiny_vit_spec(tmp_path))
    adaptkit.build(tiny_vit_spec(tmp_path))
    assert len(counted) == 4  # random weights: hashed every time


def test_unwritable_cache_still_builds(tmp_path, monkeypatch, counted):
    weights = _base_file(tmp_path, 0)
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    monkeypatch.setenv("ADAPTKIT_CACHE_DIR", str(blocker))
    model = adaptkit.build({**_spec(tmp_path, weights), "methods": []})
    assert model.adaptkit.base_fingerprint == checkpoint.fingerprint(model.backbone.base_state_dict())


def test_a_weights_file_is_checked_for_nan_once_until_it_changes(tmp_path, monkeypatch):
    """A big base is not read whole at every build to look for NaN: a file found finite is
    remembered by path, size, inode and mtime; a changed file (same size, NaN now) is refused."""
    import torch

    monkeypatch.setenv("ADAPTKIT_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.ones(3)}, str(path))
    checked = []
    original = checkpoint.refuse_non_finite
    monkeypatch.setattr(checkpoint, "refuse_non_finite", lambda tensors, where: checked.append(where) or original(tensors, where))
    checkpoint.load_weights(path)
    checkpoint.load_weights(path)
    assert checked == [path]
    save_file({"w": torch.tensor([1.0, float("nan"), 1.0])}, str(path))
    with pytest.raises(CheckpointError, match="NaN"):
        checkpoint.load_weights(path)
    with pytest.raises(CheckpointError, match="NaN"):  # and still refused: only a finite file is remembered
        checkpoint.load_weights(path)
