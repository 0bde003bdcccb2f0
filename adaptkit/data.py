"""Data bundles: what a data source plugin returns, the backbone's input config, and the
loader that feeds the trainer (imports torch).

The contract: a data source returns a :class:`DataBundle` whose splits are
:class:`BatchDataset` objects, ``batch(indices, seeds) -> dict``. The trainer decides
which sample indices form every (micro-)batch, from the run's seed, the epoch and the
step alone, and a :class:`PlannedLoader` asks worker processes for those batches. So a
run reads the same samples, with the same per-sample augmentation, however many workers
or processes it has, and a resumed run continues at the same sample.
"""

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
    """A dataset that hands out whole batches: ``batch(indices, seeds) -> dict of tensors``.

    ``seeds`` (one integer per sample, or None for evaluation) seed the sample's random
    augmentation, so that it does not depend on which worker or process reads it. A
    source that had to skip unreadable samples reports how many under the key
    :data:`SKIPPED` (an int; the loader removes it from the batch and counts it).
    """

    def __len__(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def batch(self, indices: Sequence[int], seeds: Sequence[int] | None = None) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError


#: batch key under which a dataset reports the samples it skipped (removed by the loader)
SKIPPED = "_skipped"
#: batch key under which a dataset running in a worker hands back a user error (raised by the loader)
FAILED = "_failed"


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

    def batch(self, indices: Sequence[int], seeds: Sequence[int] | None = None) -> dict[str, Any]:
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


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ----------------------------------------------------------------- what a backbone expects
@dataclass(frozen=True)
class InputConfig:
    """The images a backbone expects: size, channels, normalisation, resampling, crop.

    A backbone declares it (:meth:`adaptkit.backbone.Backbone.input_config`) from its
    checkpoint: timm's pretrained config, open_clip's preprocess config, [-1, 1] for
    diffusion and StyleGAN. Image data sources build their transforms from it, so that a
    tensor reaching the backbone is ``(pixel / 255 - mean) / std`` at ``size``. ``source``
    says where the values came from (shown in the run header and run.json).

    Example::

        InputConfig(size=(224, 224), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                    interpolation="bicubic", crop_pct=0.875, source="timm pretrained_cfg")
    """

    size: tuple[int, int]
    channels: int = 3
    mean: tuple[float, ...] = (0.5,)  # one value: repeated for any number of channels (4 for a latent UNet)
    std: tuple[float, ...] = (0.5,)
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    crop_mode: str = "center"
    source: str = "[-1, 1]"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", _per_channel(self.mean, self.channels))
        object.__setattr__(self, "std", _per_channel(self.std, self.channels))

    def updated(self, **fields: Any) -> "InputConfig":
        """A copy with the given fields replaced (None leaves a field as it is); the
        source notes what was overridden."""
        changes = {k: v for k, v in fields.items() if v is not None}
        if not changes:
            return self
        if "size" in changes and isinstance(changes["size"], int):
            changes["size"] = (changes["size"], changes["size"])
        overridden = sorted(k for k in fields if fields[k] is not None and k != "source")
        source = changes.pop("source", self.source) + (f"; set in the spec: {', '.join(overridden)}" if overridden else "")
        return InputConfig(**{**self.as_dict(), **changes, "source": source})

    def as_dict(self) -> dict[str, Any]:
        return {"size": tuple(self.size), "channels": self.channels, "mean": tuple(self.mean), "std": tuple(self.std),
                "interpolation": self.interpolation, "crop_pct": self.crop_pct, "crop_mode": self.crop_mode, "source": self.source}

    def describe(self) -> str:
        numbers = lambda v: "(" + ", ".join(f"{x:.4g}" for x in v) + ")"  # noqa: E731
        return (f"{self.size[0]}x{self.size[1]}x{self.channels} {self.interpolation}, crop {self.crop_pct:g} ({self.crop_mode}), "
                f"mean {numbers(self.mean)} std {numbers(self.std)} [{self.source}]")

    @property
    def is_minus_one_to_one(self) -> bool:
        """Whether the normalisation maps pixels [0, 1] to [-1, 1] (adaptkit's own convention)."""
        return all(abs(m - 0.5) < 1e-9 for m in self.mean) and all(abs(s - 0.5) < 1e-9 for s in self.std)


def _per_channel(values: Sequence[float], channels: int) -> tuple[float, ...]:
    """Mean/std per channel: one value repeated, or three averaged for one (gray) channel."""
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1:
        return (sum(values) / len(values),)
    raise ValueError(f"{len(values)} normalisation values for {channels} channels")


# ----------------------------------------------------------------- the loader
@dataclass(frozen=True)
class LoaderOptions:
    """How batches are read (from :class:`adaptkit.params.LoaderParams`)."""

    workers: int = 0
    prefetch: int = 2
    persistent_workers: bool = True
    pin_memory: bool = False
    timeout: float = 0.0

    @classmethod
    def of(cls, params: Any, device: torch.device | None = None) -> "LoaderOptions":
        """The options a data spec sets (defaults for sources without loader options)."""
        from adaptkit.params import LoaderParams

        if not isinstance(params, LoaderParams):
            return cls()
        pin = params.pin_memory if params.pin_memory is not None else (device is not None and device.type == "cuda")
        return cls(params.workers, params.prefetch, params.persistent_workers, bool(pin), float(params.timeout))


#: one item of a plan: the sample indices of a batch, their augmentation seeds, their augmentation randomness
PlanItem = tuple[list[int], "list[int] | None", "torch.Tensor | None"]


class SequentialPlan:
    """The batches of an evaluation: samples 0..n-1 in order, no augmentation (re-iterable)."""

    def __init__(self, size: int, batch_size: int) -> None:
        self.size, self.batch_size = size, batch_size

    def __iter__(self) -> Iterator[PlanItem]:
        for start in range(0, self.size, self.batch_size):
            yield list(range(start, min(start + self.batch_size, self.size))), None, None

    def __len__(self) -> int:
        return -(-self.size // self.batch_size)


class _PlannedBatches(torch.utils.data.Dataset):
    """What each loader worker runs: one planned batch, augmented; a user error is handed
    back as a value (so the main process reports it without a worker traceback)."""

    def __init__(self, dataset: BatchDataset, augment: Augment | None) -> None:
        self.dataset, self.augment = dataset, augment

    def __getitem__(self, item: PlanItem) -> dict[str, Any]:
        from adaptkit.errors import AdaptkitError

        indices, seeds, rand = item
        try:
            batch = self.dataset.batch(indices, seeds)
            if self.augment is not None and rand is not None:
                batch = self.augment(batch, rand)
        except AdaptkitError as exc:
            if torch.utils.data.get_worker_info() is None:
                raise
            return {FAILED: (type(exc).__name__, str(exc))}
        return batch

    def __len__(self) -> int:
        return len(self.dataset)


def _as_is(batch: Any) -> Any:
    return batch


class PlannedLoader:
    """Batches of ``dataset`` in the order a plan gives, read in worker processes.

    Iterating it yields batch dicts (``SKIPPED`` removed and added to :attr:`skipped`).
    A user error in a worker is raised here as the same error type with its message; a
    worker that dies or times out is a :class:`adaptkit.errors.DataError`, never a hang.
    Re-iterable; with ``persistent_workers`` the workers stay alive between iterations.
    """

    def __init__(self, dataset: BatchDataset, plan: Any, options: LoaderOptions, augment: Augment | None = None) -> None:
        self.dataset, self.plan, self.options = dataset, plan, options
        self.skipped = 0
        if options.workers:
            self.loader: Any = torch.utils.data.DataLoader(
                _PlannedBatches(dataset, augment), batch_size=None, sampler=plan, num_workers=options.workers,
                collate_fn=_as_is, prefetch_factor=options.prefetch, persistent_workers=options.persistent_workers,
                pin_memory=options.pin_memory, timeout=options.timeout,
            )
        else:
            self.loader = None
            self._planned = _PlannedBatches(dataset, augment)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from adaptkit import errors

        source = iter(self.loader) if self.loader is not None else (self._planned[item] for item in self.plan)
        while True:
            try:
                batch = next(source)
            except StopIteration:
                return
            except RuntimeError as exc:
                text = str(exc)
                if "DataLoader worker" in text or "timed out" in text:
                    raise errors.DataError(
                        f"data: a loader worker failed ({text.splitlines()[0]}); run with data.workers=0 to see the "
                        "sample's own error in the training process"
                    ) from None
                raise
            if FAILED in batch:
                kind, message = batch[FAILED]
                raise getattr(errors, kind, errors.DataError)(message)
            self.skipped += int(batch.pop(SKIPPED, 0))
            yield batch

    def __len__(self) -> int:
        return len(self.plan)
