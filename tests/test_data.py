"""Data sources: the bundled digits and image folders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import adaptkit
from adaptkit.errors import DataError
from tests.conftest import tiny_vit_spec


def bundle(tmp_path, data, backbone=None):
    spec = tiny_vit_spec(tmp_path, data=data)
    if backbone:
        spec["backbone"] = backbone
    return adaptkit.build(spec, keep_data=True).adaptkit.data


def test_digits_split_sizes_and_range(tmp_path):
    data = bundle(tmp_path, {"name": "digits"})
    assert (len(data.train), len(data.val), len(data.test)) == (1257, 270, 270)
    images = data.train.batch(range(len(data.train)))["images"]
    assert images.shape[1:] == (1, 8, 8) and images.min() == -1 and images.max() == 1
    assert data.info.class_names == [str(i) for i in range(10)]


def test_digits_class_filter_relabels_in_order(tmp_path):
    data = bundle(tmp_path, {"name": "digits", "classes": [9, 5]})
    assert data.info.num_classes == 2 and data.info.class_names == ["9", "5"]
    assert set(data.train.tensors["labels"].tolist()) == {0, 1}


def test_digits_resize_channels_and_shots(tmp_path):
    data = bundle(tmp_path, {"name": "digits", "shots": 4}, backbone={"name": "vit", "model": "vit_tiny_32"})
    assert data.train.batch(range(4))["images"].shape[1:] == (3, 32, 32)
    assert np.bincount(data.train.tensors["labels"].numpy()).tolist() == [4] * 10


def test_shift_augmentation_is_per_sample_and_seeded(tmp_path):
    data = bundle(tmp_path, {"name": "digits", "shift": 1})
    batch = data.train.batch(range(8))
    rand = torch.rand(8, data.augment_dims, generator=torch.Generator().manual_seed(0))
    a, b = data.augment(batch, rand), data.augment(batch, rand)
    assert torch.equal(a["images"], b["images"])
    assert a["images"].shape == batch["images"].shape


def make_folder(root, sizes=(10, 10), size=12, mode="RGB"):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, count in enumerate(sizes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True)
        for i in range(count):
            array = (rng.random((size, size, 3)) * 255).astype("uint8")
            array[..., c % 3] = 255  # a class-dependent colour channel
            Image.fromarray(array).convert(mode).save(folder / f"{i}.png")


def test_image_folder_trains(tmp_path):
    make_folder(tmp_path / "imgs")
    spec = tiny_vit_spec(tmp_path, data={"name": "image_folder", "root": str(tmp_path / "imgs"), "split": [0.6, 0.2, 0.2]})
    spec["backbone"] = {"name": "vit", "model": "vit_tiny_32"}
    result = adaptkit.run(spec, log=lambda *_: None)
    assert result.metrics["test"]["count"] == 4
    data = adaptkit.build(spec, keep_data=True).adaptkit.data
    assert data.info.class_names == ["class_0", "class_1"]
    assert data.train.batch(range(4))["images"].shape[1:] == (3, 32, 32)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        bundle(tmp_path, {"name": "image_folder", "root": str(tmp_path / "nowhere")})
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="at least two class sub-folders"):
        bundle(tmp_path, {"name": "image_folder", "root": str(tmp_path / "empty")})
    make_folder(tmp_path / "broken")
    (tmp_path / "broken" / "class_0" / "bad.png").write_bytes(b"not an image")
    strict = bundle(tmp_path, {"name": "image_folder", "root": str(tmp_path / "broken"), "on_error": "fail", "split": [1, 0, 0]})
    with pytest.raises(DataError, match="bad.png: cannot read the image"):
        strict.train.batch(range(len(strict.train)))
    make_folder(tmp_path / "sized", size=12)
    with pytest.raises(DataError, match="is 12x12, expected 8x8"):  # found by the probe before training
        bundle(tmp_path, {"name": "image_folder", "root": str(tmp_path / "sized"), "resize": False})
