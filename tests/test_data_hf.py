"""Data sources ``hf_dataset`` and ``hf_captions``: a Hugging Face ``datasets`` dataset on disk
(an optional extra: these tests are skipped without it, except the install message)."""

from __future__ import annotations

import sys

import pytest
import torch
from PIL import Image

import adaptkit
from adaptkit.errors import DataError
from tests.test_data_shards import WORDS, bundle, pictures, png, spec_for

NAMES = ["reddish", "greenish"]


def table(count: int = 40, captions: bool = False):
    """A ``datasets.Dataset`` of seeded pictures with ClassLabel labels (and captions)."""
    import datasets
    arrays, labels = pictures(count)
    columns = {"image": [Image.fromarray(a) for a in arrays], "label": labels}
    features = {"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)}
    if captions:
        columns["caption"] = [f"a {WORDS[label]} picture" for label in labels]
        features["caption"] = datasets.Value("string")
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def test_saved_dataset_trains_a_tiny_vit(tmp_path):
    table().save_to_disk(str(tmp_path / "saved"))
    data = {"name": "hf_dataset", "path": str(tmp_path / "saved")}
    result = adaptkit.run(spec_for(tmp_path, data), log=lambda *_: None)
    assert result.metrics["test"]["count"] == 6  # 15% of 40, stratified
    built = bundle(tmp_path, data)
    assert built.info.class_names == NAMES
    batch = built.val.batch(range(6))
    assert batch["images"].shape == (6, 3, 32, 32) and set(batch["labels"].tolist()) == {0, 1}


def test_dataset_dict_splits_and_parquet(tmp_path):
    import datasets
    whole = table()
    parts = datasets.DatasetDict(train=whole.select(range(30)), validation=whole.select(range(30, 40)))
    parts.save_to_disk(str(tmp_path / "dict"))
    built = bundle(tmp_path, {"name": "hf_dataset", "path": str(tmp_path / "dict")})
    assert (len(built.train), len(built.val), len(built.test)) == (30, 10, 0)
    assert built.val.batch(range(10))["labels"].tolist() == whole["label"][30:40]
    with pytest.raises(DataError, match=r"data.test_split: the dataset has no split 'holdout'; it has train, validation"):
        bundle(tmp_path, {"name": "hf_dataset", "path": str(tmp_path / "dict"), "test_split": "holdout"})

    whole.to_parquet(str(tmp_path / "part-0.parquet"))
    data = {"name": "hf_dataset", "data_files": str(tmp_path / "part-*.parquet"), "cache_dir": str(tmp_path / "cache")}
    from_parquet = bundle(tmp_path, data)
    whole.save_to_disk(str(tmp_path / "whole"))
    from_disk = bundle(tmp_path, {"name": "hf_dataset", "path": str(tmp_path / "whole")})
    assert from_parquet.info.class_names == NAMES and len(from_parquet.train) == 28
    assert torch.equal(from_parquet.test.batch(range(6))["images"], from_disk.test.batch(range(6))["images"])
    adaptkit.run(spec_for(tmp_path, data), log=lambda *_: None)


def test_captions_train_clip(tmp_path):
    table(captions=True).save_to_disk(str(tmp_path / "saved"))
    data = {"name": "hf_captions", "path": str(tmp_path / "saved"), "label_key": "label"}
    adaptkit.run(spec_for(tmp_path, data), log=lambda *_: None)
    built = bundle(tmp_path, data)
    batch = built.val.batch(range(4))
    assert batch["captions"] == [f"a {WORDS[int(label)]} picture" for label in batch["labels"]]
    assert built.info.kind == "captioned_images" and built.info.class_names == NAMES
    assert "labels" not in bundle(tmp_path, {**data, "label_key": None}).val.batch(range(2))


def test_plain_labels_bytes_and_unreadable_rows(tmp_path):
    import datasets
    arrays, labels = pictures()
    images = [b"not an image" if i == 5 else png(a) for i, a in enumerate(arrays)]
    plain = datasets.Dataset.from_dict({"picture": images, "kind": [WORDS[y] for y in labels]})
    plain.save_to_disk(str(tmp_path / "plain"))
    data = {"name": "hf_dataset", "path": str(tmp_path / "plain"), "image_key": "picture", "label_key": "kind", "split": [1, 0, 0]}
    built = bundle(tmp_path, data)
    assert built.info.class_names == sorted(WORDS)
    batch = built.train.batch(range(40))
    assert batch["_skipped"] == 1 and len(batch["images"]) == 40
    strict = bundle(tmp_path, {**data, "on_error": "fail"})
    with pytest.raises(DataError, match=r"split 'train' row 5: cannot read the image"):
        strict.train.batch(range(8))


def test_errors(tmp_path):
    table().save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match=r"data.path: folder .*nowhere not found"):
        bundle(tmp_path, {"name": "hf_dataset", "path": str(tmp_path / "nowhere")})
    with pytest.raises(DataError, match=r"data.label_key: split 'train' has no column 'class'; it has image, label"):
        bundle(tmp_path, {"name": "hf_dataset", "path": str(tmp_path / "saved"), "label_key": "class"})
    with pytest.raises(Exception, match="give either path"):
        bundle(tmp_path, {"name": "hf_dataset"})


def test_without_datasets_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(DataError, match="needs the datasets package: pip install datasets"):
        bundle(tmp_path, {"name": "hf_dataset", "path": str(tmp_path)})


def test_missing_labels_are_an_error(tmp_path):
    import datasets
    arrays, labels = pictures(4)
    labels[2] = -1
    unlabelled = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(a) for a in arrays], "label": labels},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)}),
    )
    unlabelled.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match=r"split 'train' row 2 has no label in 'label' \(1 of 4"):
        bundle(tmp_path, {"name": "hf_dataset", "path": str(tmp_path / "saved")})
