"""Image helpers shared by the data sources (imports torch)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from adaptkit.data import DataBundle, DataInfo, TensorDataset


def target_geometry(params: Any, ctx: Any, native: tuple[int, int], native_channels: int) -> tuple[tuple[int, int], int]:
    """Image size and channels: the params', else the backbone's, else the data's own."""
    backbone = getattr(ctx, "backbone", None)
    if params.image_size is not None:
        size = (params.image_size, params.image_size)
    elif backbone is not None and getattr(backbone, "image_size", None) is not None:
        size = tuple(backbone.image_size) if not isinstance(backbone.image_size, int) else (backbone.image_size,) * 2
    else:
        size = native
    if params.channels is not None:
        channels = params.channels
    elif backbone is not None and getattr(backbone, "in_chans", None):
        channels = int(backbone.in_chans)
    else:
        channels = native_channels
    return size, channels


def fit_images(images: torch.Tensor, size: tuple[int, int], channels: int) -> torch.Tensor:
    """Resize (bilinear, antialiased) and convert channels (repeat gray / average RGB)."""
    if tuple(images.shape[-2:]) != tuple(size):
        images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
    if images.shape[1] != channels:
        images = images.repeat(1, channels, 1, 1) if images.shape[1] == 1 else images.mean(dim=1, keepdim=True)
    return images.contiguous()


def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of a stratified train/val/test split (scikit-learn, seeded)."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    train_f, val_f, test_f = fractions
    if val_f + test_f == 0:
        return index, index[:0], index[:0]
    train, rest = train_test_split(index, test_size=val_f + test_f, random_state=seed, stratify=labels)
    if val_f == 0:
        return train, rest[:0], rest
    if test_f == 0:
        return train, rest, rest[:0]
    val, test = train_test_split(rest, test_size=test_f / (val_f + test_f), random_state=seed, stratify=labels[rest])
    return train, val, test


def few_shot(indices: np.ndarray, labels: np.ndarray, shots: int | None, seed: int) -> np.ndarray:
    """The first ``shots`` training indices of each class, in a seeded order."""
    if shots is None:
        return indices
    rng = np.random.default_rng(seed)
    shuffled = indices[rng.permutation(len(indices))]
    keep = [i for c in np.unique(labels) for i in shuffled[labels[shuffled] == c][:shots]]
    return np.sort(np.asarray(keep, dtype=indices.dtype))


def make_shift(max_shift: int, background: float) -> Any:
    """Augmentation: shift each image by up to ``max_shift`` pixels on each axis."""

    def augment(batch: dict[str, Any], rand: torch.Tensor) -> dict[str, Any]:
        images = batch["images"]
        offsets = (rand[:, :2] * (2 * max_shift + 1)).floor().long() - max_shift
        padded = F.pad(images, (max_shift,) * 4, value=background)
        h, w = images.shape[-2:]
        out = torch.stack([
            padded[i, :, max_shift - dy : max_shift - dy + h, max_shift - dx : max_shift - dx + w]
            for i, (dy, dx) in enumerate(offsets.tolist())
        ])
        return {**batch, "images": out}

    return augment


def labelled_bundle(
    images: torch.Tensor, labels: np.ndarray, class_names: list[str], params: Any, ctx: Any, source_size: int
) -> DataBundle:
    """Split, fit to the model's input and wrap labelled images into a :class:`DataBundle`."""
    train, val, test = stratified_split(labels, params.split, params.split_seed)
    train = few_shot(train, labels, params.shots, params.split_seed)
    size, channels = target_geometry(params, ctx, tuple(images.shape[-2:]), images.shape[1])
    y = torch.as_tensor(labels, dtype=torch.long)

    def fit(batch: dict[str, Any]) -> dict[str, Any]:
        return {**batch, "images": fit_images(batch["images"], size, channels)}

    def subset(idx: np.ndarray) -> TensorDataset:
        t = torch.as_tensor(idx, dtype=torch.long)
        return TensorDataset(transform=fit, images=images[t], labels=y[t])

    info = DataInfo(kind="labelled_images", num_classes=len(class_names), class_names=class_names,
                    image_size=size, channels=channels)
    augment = None
    if params.shift:
        scaled = max(1, round(params.shift * size[0] / source_size))
        augment = make_shift(scaled, float(images.min()))
    return DataBundle(info, subset(train), subset(val), subset(test), augment=augment, augment_dims=2 if augment else 0)
