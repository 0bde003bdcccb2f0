"""Data sources ``shards`` and ``shards_captions``: webdataset tar shards read by random access."""

from __future__ import annotations

import io
import json
import pickle
import tarfile

import numpy as np
import pytest
import torch
import webdataset
from braceexpand import braceexpand
from PIL import Image

import adaptkit
from adaptkit.data import LoaderOptions, PlannedLoader, SequentialPlan
from adaptkit.errors import DataError
from adaptkit_plugins.data.image_samples import SampleError
from adaptkit_plugins.data.tar_shards import Layout, expand_braces, read_shards, shard_paths
from tests.conftest import tiny_vit_spec

WORDS = ("red", "green")


def pictures(count: int = 40, size: int = 12) -> tuple[list[np.ndarray], list[int]]:
    """Seeded RGB pictures, the first half class 0 and the rest class 1 (a class-dependent channel)."""
    rng = np.random.default_rng(0)
    labels = [0] * (count // 2) + [1] * (count - count // 2)
    arrays = []
    for label in labels:
        array = (rng.random((size, size, 3)) * 255).astype("uint8")
        array[..., label] = 255
        arrays.append(array)
    return arrays, labels


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(folder, arrays, labels, per_shard=10, captions=False, spoil=()) -> str:
    """Shards of ``per_shard`` samples (webdataset's TarWriter); samples in ``spoil`` get bytes
    that are not an image. Returns the brace pattern naming them."""
    folder.mkdir(parents=True, exist_ok=True)
    count = -(-len(arrays) // per_shard)
    for shard in range(count):
        with webdataset.TarWriter(str(folder / f"train-{shard:03d}.tar")) as sink:
            for i in range(shard * per_shard, min((shard + 1) * per_shard, len(arrays))):
                sample = {"__key__": f"{i:05d}", "png": b"not an image" if i in spoil else png(arrays[i]), "cls": labels[i],
                          "json": json.dumps({"index": i})}
                if captions:
                    sample["txt"] = f"a {WORDS[labels[i]]} picture"
                sink.write(sample)
    return str(folder / f"train-{{000..{count - 1:03d}}}.tar")


def write_tar(path, members: list[tuple[str, bytes]]) -> None:
    """A tar with these members, in this order (plain tarfile)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def spec_for(tmp_path, data):
    """3 steps of the 32-px ViT on labelled data, of the 32-px CLIP (contrastive) on captions."""
    spec = tiny_vit_spec(tmp_path, data=data, backbone={"name": "vit", "model": "vit_tiny_32"})
    if data["name"].endswith("captions"):
        spec.update(backbone={"name": "clip", "model": "clip_tiny_32"}, task={"name": "contrastive"})
    spec["train"] = {"max_steps": 3, "batch_size": 8, "progress": False}
    return spec


def bundle(tmp_path, data):
    return adaptkit.build(spec_for(tmp_path, data), keep_data=True).adaptkit.data


def test_shards_train_a_tiny_vit(tmp_path):
    pattern = write_shards(tmp_path / "shards", *pictures())
    result = adaptkit.run(spec_for(tmp_path, {"name": "shards", "train": pattern}), log=lambda *_: None)
    assert result.metrics["test"]["count"] == 6  # 15% of 40, stratified
    data = bundle(tmp_path, {"name": "shards", "train": pattern, "classes": ["reddish", "greenish"]})
    assert data.info.num_classes == 2 and data.info.class_names == ["reddish", "greenish"]
    assert (len(data.train), len(data.val), len(data.test)) == (28, 6, 6)


def test_shards_read_as_the_same_image_folder(tmp_path):
    arrays, labels = pictures()
    pattern = write_shards(tmp_path / "shards", arrays, labels)
    for i, (array, label) in enumerate(zip(arrays, labels)):  # the same images, in the same order
        folder = tmp_path / "folder" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(folder / f"{i:05d}.png")
    shards = bundle(tmp_path, {"name": "shards", "train": pattern})
    files = bundle(tmp_path, {"name": "image_folder", "root": str(tmp_path / "folder")})
    for split in ("train", "val", "test"):
        assert np.array_equal(getattr(shards, split).rows, getattr(files, split).rows)
    seeds = list(range(100, 108))
    a, b = shards.train.batch(range(8), seeds), files.train.batch(range(8), seeds)  # augmented, seeded per sample
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])
    a, b = shards.val.batch(range(6)), files.val.batch(range(6))
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])


def test_fixed_val_and_test_shards(tmp_path):
    arrays, labels = pictures()
    write_shards(tmp_path / "shards", arrays, labels)
    folder = tmp_path / "shards"
    data = bundle(tmp_path, {"name": "shards", "train": [str(folder / "train-000.tar"), str(folder / "train-003.tar")],
                             "val": str(folder / "train-001.tar"), "test": str(folder / "train-00[2].tar")})
    assert (len(data.train), len(data.val), len(data.test)) == (20, 10, 10)
    assert data.val.batch(range(10))["labels"].tolist() == labels[10:20]


def test_captioned_shards_train_clip(tmp_path):
    pattern = write_shards(tmp_path / "shards", *pictures(), captions=True)
    data = {"name": "shards_captions", "train": pattern}
    spec = spec_for(tmp_path, data)
    adaptkit.run(spec, log=lambda *_: None)
    built = adaptkit.build(spec, keep_data=True).adaptkit.data
    batch = built.val.batch(range(4))
    assert batch["captions"] == [f"a {WORDS[int(label)]} picture" for label in batch["labels"]]
    assert built.info.kind == "captioned_images" and built.info.class_names == ["0", "1"]
    unlabelled = adaptkit.build({**spec, "data": {**data, "label_ext": None}}, keep_data=True).adaptkit.data
    assert "labels" not in unlabelled.val.batch(range(4))


def test_unreadable_and_truncated_samples_are_skipped_and_counted(tmp_path):
    arrays, labels = pictures()
    pattern = write_shards(tmp_path / "shards", arrays, labels, spoil={3, 17})
    data = bundle(tmp_path, {"name": "shards", "train": pattern, "split": [1, 0, 0], "on_error": "skip"})
    batch = data.train.batch(range(len(data.train)))
    assert batch["_skipped"] == 2 and len(batch["images"]) == 40
    strict = bundle(tmp_path, {"name": "shards", "train": pattern, "split": [1, 0, 0], "on_error": "fail"})
    with pytest.raises(DataError, match=r"train-000.tar: sample 00003: cannot read the image"):
        strict.train.batch(range(8))

    cut = tmp_path / "cut.tar"  # the file ends inside the last image
    write_tar(cut, [(f"{i}.{ext}", png(arrays[i]) if ext == "png" else str(labels[i]).encode()) for i in range(6) for ext in ("cls", "png")])
    with tarfile.open(cut) as tar:
        last = tar.getmember("5.png")
    with open(cut, "r+b") as handle:
        handle.truncate(last.offset_data + last.size // 2)
    reader = read_shards([str(cut)], Layout(("png",), "cls", None))
    assert len(reader) == 6 and reader.image(4).size == (12, 12)
    with pytest.raises(SampleError, match=r"cut.tar: sample 5: the image is cut off"):
        reader.image(5)


def test_shard_errors_name_the_file(tmp_path):
    arrays, labels = pictures(4)
    with pytest.raises(DataError, match=r"shard .*missing-000.tar not found"):
        bundle(tmp_path, {"name": "shards", "train": str(tmp_path / "missing-{000..001}.tar")})
    with pytest.raises(DataError, match=r"no files match .*nothing-\*.tar"):
        bundle(tmp_path, {"name": "shards", "train": str(tmp_path / "nothing-*.tar")})
    (tmp_path / "text.tar").write_text("hello, not a tar")
    with pytest.raises(DataError, match=r"text.tar is not an uncompressed tar file"):
        bundle(tmp_path, {"name": "shards", "train": str(tmp_path / "text.tar")})
    write_tar(tmp_path / "labels.tar", [("0.cls", b"0"), ("1.cls", b"1")])
    with pytest.raises(DataError, match=r"labels.tar holds no images \(.jpg, .jpeg, .png, .webp\)"):
        bundle(tmp_path, {"name": "shards", "train": str(tmp_path / "labels.tar")})
    write_tar(tmp_path / "unlabelled.tar", [("a/0.png", png(arrays[0])), ("a/0.cls", b"0"), ("a/1.png", png(arrays[1]))])
    with pytest.raises(DataError, match=r"unlabelled.tar: sample a/1 has no .cls label member \(1 of 2"):
        bundle(tmp_path, {"name": "shards", "train": str(tmp_path / "unlabelled.tar")})
    write_tar(tmp_path / "words.tar", [("0.png", png(arrays[0])), ("0.cls", b"zero")])
    with pytest.raises(DataError, match=r"words.tar: 0.cls holds 'zero', not a class number"):
        bundle(tmp_path, {"name": "shards", "train": str(tmp_path / "words.tar")})
    pattern = write_shards(tmp_path / "shards", arrays, labels)
    with pytest.raises(DataError, match=r"train-000.tar: sample 00002 has label 1, but data.classes names 1 classes"):
        bundle(tmp_path, {"name": "shards", "train": pattern, "classes": ["only"]})
    with pytest.raises(Exception, match="for captions alone use data source 'shards_captions'"):
        bundle(tmp_path, {"name": "shards", "train": pattern, "label_ext": None})
    with pytest.raises(DataError, match=r"train-000.tar: sample 00000 has no .txt caption member"):
        bundle(tmp_path, {"name": "shards_captions", "train": pattern})


@pytest.mark.parametrize(
    "pattern",
    ["train-{000000..000003}.tar", "a{1..3}b", "{a,b}-{0..2}", "x{a,b{1..2}}y", "plain.tar", "{single}.tar", "{9..7}", "{08..10}"],
)
def test_brace_expansion_matches_braceexpand(pattern):
    assert expand_braces(pattern) == list(braceexpand(pattern))


def test_shard_paths_take_lists_and_globs(tmp_path):
    for name in ("a-0.tar", "a-1.tar", "b-0.tar"):
        (tmp_path / name).write_bytes(b"")
    assert shard_paths([str(tmp_path / "a-*.tar"), str(tmp_path / "b-{0..0}.tar")], "train") == [
        str(tmp_path / n) for n in ("a-0.tar", "a-1.tar", "b-0.tar")]


def test_workers_read_the_same_batches(tmp_path):
    pattern = write_shards(tmp_path / "shards", *pictures(), per_shard=7)
    data = bundle(tmp_path, {"name": "shards", "train": pattern, "split": [0.5, 0.5, 0]})
    plan = SequentialPlan(len(data.val), 8)
    inline = list(PlannedLoader(data.val, plan, LoaderOptions(workers=0)))
    workers = list(PlannedLoader(data.val, plan, LoaderOptions(workers=2, persistent_workers=False)))
    assert len(inline) == len(workers) == 3
    for a, b in zip(inline, workers):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])
    assert not pickle.loads(pickle.dumps(data.val.reader))._files  # open files stay in the process that opened them
