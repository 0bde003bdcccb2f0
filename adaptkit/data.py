"""Data bundles: what a data source plugin returns (imports torch)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class DataInfo:
    """What a task needs to know about the data before training."""

    kind: str = "labelled_images"
    num_classes: int = 0
    class_names: list[str] = field(default_factory=list)
    image_size: tuple[int, int] | None = None
    channels: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class BatchDataset:
    """A dataset that hands out whole batches: ``batch(indices) -> dict of tensors``."""

    def __len__(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def batch(self, indices: Sequence[int]) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError


class TensorDataset(BatchDataset):
    """In-memory tensors of equal length (``images``, ``labels``, ...).

    ``transform(batch) -> batch`` runs on every batch (e.g. resizing to the model's
    input), so large inputs are made per batch rather than held in memory.
    """

    def __init__(self, transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None, **tensors: Any) -> None:
        lengths = {len(v) for v in tensors.values()}
        if len(lengths) != 1:
            raise ValueError(f"tensors of different lengths: { {k: len(v) for k, v in tensors.items()} }")
        self.tensors = tensors
        self.transform = transform

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def batch(self, indices: Sequence[int]) -> dict[str, Any]:
        index = torch.as_tensor(list(indices), dtype=torch.long)
        out: dict[str, Any] = {}
        for key, value in self.tensors.items():
            out[key] = value[index] if isinstance(value, torch.Tensor) else [value[i] for i in index.tolist()]
        return self.transform(out) if self.transform is not None else out


Augment = Callable[[dict[str, Any], torch.Tensor], dict[str, Any]]


@dataclass
class DataBundle:
    """Train/val/test splits, their description, and an optional training augmentation.

    ``augment(batch, rand)`` receives a (batch, ``augment_dims``) tensor of uniform
    random numbers drawn per sample and per epoch by the trainer, so augmentation is
    the same however the data is sharded across processes or a run is resumed.
    """

    info: DataInfo
    train: BatchDataset | None
    val: BatchDataset | None = None
    test: BatchDataset | None = None
    augment: Augment | None = None
    augment_dims: int = 0


def iterate(dataset: BatchDataset, batch_size: int) -> Iterator[dict[str, Any]]:
    """Batches of ``dataset`` in order (for evaluation)."""
    for start in range(0, len(dataset), batch_size):
        yield dataset.batch(range(start, min(start + batch_size, len(dataset))))


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
