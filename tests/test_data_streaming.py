"""Streaming image data: lazy reads through loader workers, the checkpoint's preprocessing,
augmentations, exact resume and DDP with workers, bad samples skipped and counted."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import adaptkit
from adaptkit.checkpoint import load_tensors
from adaptkit.data import SKIPPED, BatchDataset, LoaderOptions, PlannedLoader, SequentialPlan
from adaptkit.errors import DataError
from adaptkit.train import Trainer
from tests.cli_helpers import forked, torchrun

quiet = dict(log=lambda *_: None)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# a timm architecture whose pretrained config uses ImageNet statistics (DeiT), cut to one block
DEIT = {"name": "vit", "model": "deit_tiny_patch16_224", "kwargs": {"depth": 1}}


def write_digit_folder(root: Path, per_class: int = 12, classes: int = 3, size: int = 40, ext: str = "png") -> Path:
    """Real digits (scikit-learn's), upscaled to ``size`` px RGB with a class tint, one folder per class."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for c in range(classes):
        folder = root / f"digit_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        picks = np.flatnonzero(digits.target == c)[:per_class]
        for i, k in enumerate(picks):
            gray = (digits.images[k] * 255 / 16).astype("uint8")
            rgb = np.stack([gray, gray, gray], -1)
            rgb[..., c % 3] = np.maximum(rgb[..., c % 3], 60)
            Image.fromarray(rgb).resize((size, size + 8), Image.BILINEAR).save(folder / f"{i:03d}.{ext}")
    return root


def folder_spec(tmp_path: Path, root: Path, name: str = "run", backbone: dict | None = None, **data) -> dict:
    return {
        "name": name, "seed": 0,
        "backbone": backbone or {"name": "vit", "model": "vit_tiny_32"},
        "methods": [{"name": "lora", "rank": 2}],
        "task": {"name": "classification"},
        "data": {"name": "image_folder", "root": str(root), "split": [0.5, 0.25, 0.25], **data},
        "train": {"max_steps": 6, "batch_size": 6, "eval_every": 3, "progress": False},
        "output": {"dir": str(tmp_path / name)},
    }


def bundle(spec: dict):
    return adaptkit.build(spec, keep_data=True).adaptkit.data


def adapter(run_dir: Path) -> dict:
    return load_tensors(run_dir / "adapter.safetensors")[0]


# ----------------------------------------------------------------- preprocessing
def test_eval_transform_equals_timms_for_a_checkpoint_with_imagenet_statistics(tmp_path):
    from timm.data import create_transform, resolve_data_config

    root = write_digit_folder(tmp_path / "imgs", per_class=4, size=300)
    model = adaptkit.build(folder_spec(tmp_path, root, backbone=DEIT, augment="none"), keep_data=True)
    data = model.adaptkit.data
    config = data.info.extra["preprocess"]
    assert config["mean"] == IMAGENET_MEAN and config["std"] == IMAGENET_STD
    assert config["interpolation"] == "bicubic" and config["crop_pct"] == 0.9
    image = Image.open(next(root.glob("digit_0/*.png"))).convert("RGB")
    reference = create_transform(**resolve_data_config({}, model=model.backbone.net))
    assert torch.equal(data.val.transform(image), reference(image))
    # and that is what reaches the model: a batch holds the normalised pixels
    batch = data.val.batch([0])
    assert batch["images"].shape == (1, 3, 224, 224)
    assert batch["images"].min() < -1.5  # ImageNet statistics, not [-1, 1]


def test_digits_reach_a_timm_model_with_its_own_statistics(tmp_path):
    spec = folder_spec(tmp_path, tmp_path, backbone={**DEIT, "kwargs": {"depth": 1, "img_size": 8, "patch_size": 2, "in_chans": 1}})
    spec["data"] = {"name": "digits", "classes": [0, 1]}
    data = bundle(spec)
    from adaptkit_plugins.data.digits import load_digit_images

    images, _, _ = load_digit_images([0, 1])
    first = data.train.tensors["images"][:2]
    expected = ((first + 1) / 2 - np.mean(IMAGENET_MEAN)) / np.mean(IMAGENET_STD)
    torch.testing.assert_close(data.train.batch([0, 1])["images"], expected)
    assert images.min() == -1


def test_preprocess_overrides_come_from_the_spec_and_reach_run_json(tmp_path):
    root = write_digit_folder(tmp_path / "imgs", per_class=4)
    spec = folder_spec(tmp_path, root, backbone=DEIT, preprocess={"crop_pct": 1.0, "interpolation": "bilinear", "size": 32})
    spec["backbone"] = {**DEIT, "kwargs": {"depth": 1, "img_size": 32}}
    data = bundle(spec)
    config = data.info.extra["preprocess"]
    assert (config["crop_pct"], config["interpolation"], config["size"]) == (1.0, "bilinear", (32, 32))
    assert config["mean"] == IMAGENET_MEAN and "set in the spec" in config["source"]
    spec["train"]["max_steps"] = 1
    adaptkit.run(spec, **quiet)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["preprocess"]["crop_pct"] == 1.0 and run["preprocess"]["mean"] == list(IMAGENET_MEAN)


# ----------------------------------------------------------------- memory
def test_image_folder_reads_lazily_and_its_size_does_not_grow_with_the_images(tmp_path, monkeypatch):
    """Building reads only a few probe images, and the dataset holds paths, not pixels."""
    import adaptkit_plugins.data.image_samples as images_module

    opened: list[str] = []
    original = images_module.decode
    monkeypatch.setattr(images_module, "decode", lambda opener, where: opened.append(where) or original(opener, where))
    sizes = {}
    for count in (8, 80):
        root = write_digit_folder(tmp_path / f"imgs{count}", per_class=count, size=24)
        opened.clear()
        data = bundle(folder_spec(tmp_path, root))
        assert len(opened) <= 18, "building must not decode the dataset"
        sizes[count] = len(pickle.dumps(data.train))
        batch = data.train.batch([0, 1, 2], seeds=[1, 2, 3])
        assert batch["images"].shape == (3, 3, 32, 32)
    per_image = (sizes[80] - sizes[8]) / ((80 - 8) * 3 * 0.5)
    assert per_image < 300, f"{per_image:.0f} bytes per training image: the dataset holds more than a path"


# ----------------------------------------------------------------- augmentation
def test_augmentation_is_seeded_per_sample_whatever_the_worker(tmp_path):
    root = write_digit_folder(tmp_path / "imgs", per_class=6)
    data = bundle(folder_spec(tmp_path, root, augment={"auto_augment": "rand-m9-mstd0.5", "re_prob": 0.5, "color_jitter": 0.3}))
    seeds = [11, 12, 13, 14]
    a = data.train.batch([0, 1, 2, 3], seeds=seeds)["images"]
    torch.manual_seed(123)  # the caller's generator neither matters nor is touched
    state = torch.get_rng_state()
    b = data.train.batch([0, 1, 2, 3], seeds=seeds)["images"]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    c = data.train.batch([0, 1, 2, 3], seeds=[21, 22, 23, 24])["images"]
    assert not torch.equal(a, c)
    plan = [([0, 1], [11, 12], None), ([2, 3], [13, 14], None)]
    in_workers = list(PlannedLoader(data.train, plan, LoaderOptions(workers=2)))
    assert torch.equal(torch.cat([x["images"] for x in in_workers]), a)


def test_grayscale_models_take_randaugment_and_random_erasing(tmp_path):
    root = write_digit_folder(tmp_path / "imgs", per_class=6, size=16)
    spec = folder_spec(tmp_path, root, backbone={"name": "vit", "model": "vit_tiny_digits"},
                       augment={"auto_augment": "rand-m9-mstd0.5", "re_prob": 0.5})
    batch = bundle(spec).train.batch([0, 1, 2], seeds=[1, 2, 3])
    assert batch["images"].shape == (3, 1, 8, 8)


def test_mixup_and_cutmix_give_soft_targets_that_the_classification_loss_takes(tmp_path):
    root = write_digit_folder(tmp_path / "imgs", per_class=6)
    spec = folder_spec(tmp_path, root, augment={"mixup": 0.8, "cutmix": 1.0, "hflip": 0.0})
    data = bundle(spec)
    batch = data.train.batch([0, 1, 2, 3], seeds=[1, 2, 3, 4])
    mixed = data.augment(batch, torch.full((4, data.augment_dims), 0.3))
    assert mixed["labels"].shape == (4, 3) and torch.allclose(mixed["labels"].sum(1), torch.ones(4))
    assert (mixed["labels"] < 1).any()  # some mass moved to the partner's class
    again = data.augment(batch, torch.full((4, data.augment_dims), 0.3))
    assert torch.equal(mixed["images"], again["images"])
    result = adaptkit.run(spec, **quiet)
    assert 0 < result.metrics["test"]["count"]  # evaluation uses hard labels: never mixed
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["train_loss"]) for r in history)


def test_digits_keep_their_behaviour_unless_augment_is_set(tmp_path):
    spec = folder_spec(tmp_path, tmp_path, backbone={"name": "vit", "model": "vit_tiny_digits"})
    spec["data"] = {"name": "digits", "shift": 1}
    data = bundle(spec)
    assert data.info.extra["augment"] == "shift ±1px" and data.augment_dims == 2
    assert torch.equal(data.train.batch([0, 1], seeds=[5, 6])["images"], data.train.tensors["images"][:2])
    spec["data"] = {"name": "digits", "augment": {"scale": [0.5, 1.0]}}
    augmented = bundle(spec).train
    assert not torch.equal(augmented.batch([0, 1], seeds=[5, 6])["images"], augmented.tensors["images"][:2])


# ----------------------------------------------------------------- exactness
def test_resume_mid_epoch_with_workers_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    root = write_digit_folder(tmp_path / "imgs", per_class=10)

    def spec(name: str, **train):
        s = folder_spec(tmp_path, root, name, workers=2, augment={"auto_augment": "rand-m5-mstd0.5"})
        s["train"].update({"max_steps": 8, "eval_every": 4, "checkpoint_every": 3, **train})
        return s

    whole = adaptkit.run(spec("whole"), **quiet)
    original = Trainer._save_state

    def crash_after_step_3(self, optimizer, step, *args):
        original(self, optimizer, step, *args)
        if step == 3:  # step 3 of 3.75 per epoch: mid-epoch
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(Trainer, "_save_state", crash_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        adaptkit.run(spec("crashed"), **quiet)
    monkeypatch.setattr(Trainer, "_save_state", original)
    adaptkit.run(spec("crashed", resume=True), **quiet)
    assert json.loads((tmp_path / "crashed" / "metrics.json").read_text())["resumed_from_step"] == 3
    for key, value in adapter(whole.output_dir).items():
        assert torch.equal(value, adapter(tmp_path / "crashed")[key]), key


def test_two_processes_with_workers_match_one(tmp_path):
    """torchrun --nproc_per_node=2 over an image folder with workers and augmentation equals one process."""
    root = write_digit_folder(tmp_path / "imgs", per_class=8)
    single = folder_spec(tmp_path, root, "single", workers=1, augment={"auto_augment": "rand-m5-mstd0.5", "re_prob": 0.3})
    single["train"].update({"max_steps": 4, "batch_size": 8, "grad_clip": None})
    adaptkit.run(single, **quiet)
    ddp = json.loads(json.dumps(single))
    ddp["output"]["dir"] = str(tmp_path / "ddp")
    done = torchrun(tmp_path, ddp)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    for key, value in adapter(tmp_path / "single").items():
        torch.testing.assert_close(adapter(tmp_path / "ddp")[key], value, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------- bad data
def test_corrupt_and_truncated_images_are_skipped_and_counted(tmp_path):
    root = write_digit_folder(tmp_path / "imgs", per_class=10, ext="jpg")
    (root / "digit_0" / "zz_bad.jpg").write_bytes(b"not an image at all")
    good = next((root / "digit_1").glob("*.jpg")).read_bytes()
    (root / "digit_1" / "zz_truncated.jpg").write_bytes(good[: len(good) // 2])
    spec = folder_spec(tmp_path, root, split=[1.0, 0.0, 0.0], workers=2)
    spec["train"].update({"max_steps": 8, "batch_size": 8})
    adaptkit.run(spec, **quiet)
    skipped = json.loads((tmp_path / "run" / "metrics.json").read_text())["data_skipped"]
    assert skipped["train"] >= 2  # 32 samples per epoch, 64 read: each bad file at least once
    data = bundle({**spec, "data": {**spec["data"], "workers": 0}})
    everything = data.train.batch(list(range(len(data.train))), seeds=list(range(len(data.train))))
    assert everything[SKIPPED] == 2 and len(everything["images"]) == len(data.train)


def test_on_error_fail_names_the_file_and_exits_2(tmp_path):
    root = write_digit_folder(tmp_path / "imgs", per_class=10)
    (root / "digit_2" / "zz_bad.png").write_bytes(b"\x89PNG broken")
    spec = folder_spec(tmp_path, root, split=[1.0, 0.0, 0.0], on_error="fail", workers=2)
    spec["train"]["max_steps"] = 12
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    done = forked(["run", str(path)], tmp_path / "cli")  # a process of its own: its data workers fail
    assert done.returncode == 2, done.stderr[-2000:]
    assert "zz_bad.png" in done.stderr and "Traceback" not in done.stderr


def test_a_source_where_most_reads_fail_is_one_error_naming_a_file(tmp_path):
    root = write_digit_folder(tmp_path / "imgs", per_class=4)
    for path in list(root.glob("*/*.png"))[:-2]:
        path.write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"could not be read, e\.g\. .*\.png"):
        bundle(folder_spec(tmp_path, root))


def test_an_empty_class_folder_is_an_error_naming_it(tmp_path):
    root = write_digit_folder(tmp_path / "imgs", per_class=4)
    (root / "digit_9").mkdir()
    with pytest.raises(DataError, match="digit_9 holds no images"):
        bundle(folder_spec(tmp_path, root))


class _DyingDataset(BatchDataset):
    def __len__(self) -> int:
        return 8

    def batch(self, indices, seeds=None):
        if torch.utils.data.get_worker_info() is not None:
            os._exit(3)  # a worker killed mid-batch (out of memory, a crashing decoder)
        return {"x": torch.zeros(len(indices))}


def test_a_dead_loader_worker_is_reported_not_hung_on():
    loader = PlannedLoader(_DyingDataset(), SequentialPlan(8, 2), LoaderOptions(workers=1, persistent_workers=False))
    with pytest.raises(DataError, match="loader worker failed"):
        list(loader)


def test_decompression_bombs_are_skipped_like_other_unreadable_images(tmp_path, monkeypatch):
    root = write_digit_folder(tmp_path / "imgs", per_class=6)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # every 40x48 image is now a "bomb"
    data_spec = folder_spec(tmp_path, root)
    with pytest.raises(DataError, match="decompression-bomb"):
        bundle(data_spec)
