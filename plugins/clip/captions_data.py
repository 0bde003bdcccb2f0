"""Captioned-image bundles: the digits with generated captions, and CSV/JSONL listings (imports torch).

A captioned batch holds ``images`` (a tensor), ``captions`` (a list of strings) and,
when the data knows them, ``labels``. Datasets whose images have several captions
also hold ``caption_variants``; training then draws one variant per image and epoch
(from the trainer's seeded per-sample random numbers), evaluation uses ``captions``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adaptkit.data import DataBundle, DataInfo
from adaptkit.errors import DataError
from adaptkit_plugins.data.image_samples import (
    TensorImages,
    describe_augment,
    few_shot,
    input_config,
    lazy_bundle,
    make_shift,
    normalise,
    stratified_split,
    train_transform,
)
from adaptkit_plugins.data.image_folder import FileReader

KIND = "captioned_images"


def _caption_augment(shift: Any) -> tuple[Any, int]:
    """Augmentation drawing one caption variant per image (after an optional shift)."""

    def augment(batch: dict[str, Any], rand: torch.Tensor) -> dict[str, Any]:
        if shift is not None:
            batch = shift(batch, rand[:, :2])
        variants = batch.get("caption_variants")
        if variants is None:
            return batch
        picks = rand[:, -1].tolist()
        captions = [choices[min(int(r * len(choices)), len(choices) - 1)] for choices, r in zip(variants, picks)]
        return {**batch, "captions": captions}

    return augment, (2 if shift is not None else 0) + 1


def _split(labels: np.ndarray, params: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return stratified_split(labels, params.split, params.split_seed)


def _bundle(
    images: torch.Tensor,
    captions: list[str],
    variants: list[list[str]] | None,
    labels: np.ndarray | None,
    class_names: list[str],
    params: Any,
    ctx: Any,
    source_size: int,
) -> DataBundle:
    """Captioned in-memory images (the digits) as a bundle, fitted to the model's input."""
    n = len(captions)
    train, val, test = _split(labels if labels is not None else np.zeros(n, dtype=np.int64), params)
    if params.shots is not None:
        if labels is None:
            raise DataError("data.shots: few-shot sampling needs class labels (set data.label_key)")
        train = few_shot(train, labels, params.shots, params.split_seed)
    cfg = input_config(params, ctx, tuple(images.shape[-2:]), images.shape[1])
    augment = params.augment_for(files=False)
    transform = train_transform(cfg, augment) if augment is not None else None

    def subset(idx: np.ndarray, sample_transform: Any = None) -> TensorImages:
        index = torch.as_tensor(idx, dtype=torch.long)
        tensors: dict[str, Any] = {"images": images[index], "captions": [captions[i] for i in idx.tolist()]}
        if labels is not None:
            tensors["labels"] = torch.as_tensor(labels, dtype=torch.long)[index]
        if variants is not None:
            tensors["caption_variants"] = [variants[i] for i in idx.tolist()]
        return TensorImages(cfg, sample_transform, **tensors)

    info = DataInfo(kind=KIND, num_classes=len(class_names), class_names=class_names, image_size=tuple(cfg.size),
                    channels=cfg.channels, extra={"preprocess": cfg.as_dict(), "augment": describe_augment(augment, params.shift)})
    shift = None
    if params.shift:
        scaled = max(1, round(params.shift * cfg.size[0] / source_size))
        shift = make_shift(scaled, float(normalise(torch.full((1, cfg.channels, 1, 1), float(images.min())), cfg).min()))
    augment_fn, dims = (None, 0)
    if shift is not None or variants is not None:
        augment_fn, dims = _caption_augment(shift)
    return DataBundle(info, subset(train, transform), subset(val), subset(test), augment=augment_fn, augment_dims=dims)


def digits_captions_bundle(params: Any, ctx: Any) -> DataBundle:
    from adaptkit_plugins.data.digits import load_digit_images
    from adaptkit_plugins.clip.digits_captions import DIGIT_WORDS, caption

    images, labels, digits = load_digit_images(params.classes)
    wordings = list(params.wordings)
    variants = [[caption(w, int(d)) for w in wordings] for d in digits]
    captions = [variants[i][i % len(wordings)] for i in range(len(digits))]  # evaluation: a fixed wording per image
    classes = params.classes if params.classes is not None else list(range(10))
    return _bundle(images, captions, variants, labels, [DIGIT_WORDS[c] for c in classes], params, ctx, source_size=8)


def read_listing(path: Path, image_key: str, caption_key: str, label_key: str | None) -> list[tuple[str, str, str | None]]:
    """(image, caption, label) rows of a .csv / .jsonl listing, with errors that name the line."""
    if not path.is_file():
        raise DataError(f"data.file: {path} not found")
    suffix = path.suffix.lower()
    rows: list[tuple[int, dict[str, Any]]] = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"data.file: cannot read {path}: {exc}") from None
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        missing = [k for k in (image_key, caption_key, label_key) if k and k not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"data.file: {path} has no column '{missing[0]}'; columns: {', '.join(reader.fieldnames or []) or 'none'}")
        rows = [(number, row) for number, row in enumerate(reader, start=2)]
    elif suffix in (".jsonl", ".ndjson"):
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"data.file: {path}, line {number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"data.file: {path}, line {number}: expected a JSON object")
            rows.append((number, row))
    else:
        raise DataError(f"data.file: {path} must be a .csv or .jsonl file")
    out = []
    for number, row in rows:
        for key in (image_key, caption_key, label_key):
            if key and (row.get(key) is None or str(row.get(key)).strip() == ""):
                raise DataError(f"data.file: {path}, line {number}: '{key}' is missing or empty")
        out.append((str(row[image_key]), str(row[caption_key]), str(row[label_key]) if label_key else None))
    if not out:
        raise DataError(f"data.file: {path} lists no images")
    return out


class CaptionedFiles(FileReader):
    """Image files with a caption each (a CSV/JSONL listing)."""

    def __init__(self, paths: list[str], texts: list[str], expect_size: tuple[int, int] | None = None) -> None:
        super().__init__(paths, expect_size)
        self.texts = texts

    def text(self, i: int) -> str:
        return self.texts[i]


def captions_bundle(params: Any, ctx: Any) -> DataBundle:
    """A CSV/JSONL listing read lazily: images decoded per batch by the loader's workers."""
    path = Path(params.file)
    rows = read_listing(path, params.image_key, params.caption_key, params.label_key)
    root = path.parent.resolve()
    paths = []
    for image, _, _ in rows:
        full = (path.parent / image)
        if not params.allow_outside_root and not full.resolve().is_relative_to(root):
            raise DataError(f"data.file: {path} lists {image}, outside the listing's folder {root}; set data.allow_outside_root=true to allow it")
        paths.append(str(full))
    absent = [p for p in paths if not Path(p).is_file()]
    if absent:
        raise DataError(f"data.file: {path} lists {len(absent)} images that do not exist, e.g. {absent[0]}")
    captions = [c for _, c, _ in rows]
    labels, names = None, []
    if params.label_key:
        names = sorted({label for _, _, label in rows if label is not None})
        index = {name: i for i, name in enumerate(names)}
        labels = np.array([index[label] for _, _, label in rows], dtype=np.int64)
    train, val, test = _split(labels if labels is not None else np.zeros(len(rows), dtype=np.int64), params)
    if params.shots is not None:
        if labels is None:
            raise DataError("data.shots: few-shot sampling needs class labels (set data.label_key)")
        train = few_shot(train, labels, params.shots, params.split_seed)
    expect = None if params.resize else tuple(input_config(params, ctx).size)
    return lazy_bundle(CaptionedFiles(paths, captions, expect), (train, val, test), labels, names, params, ctx, kind=KIND)


def unique_texts(texts: Sequence[str]) -> tuple[list[str], list[int]]:
    """The distinct texts in first-seen order, and each input's index among them."""
    order: dict[str, int] = {}
    index = [order.setdefault(t, len(order)) for t in texts]
    return list(order), index
