"""Image helpers shared by the data sources (imports torch).

Two kinds of image data meet the same loader contract (:class:`adaptkit.data.BatchDataset`):

- embedded tensors (the digits), held in memory, resized per batch;
- images read lazily, one sample at a time, from files, tar shards or a ``datasets``
  table (:class:`ImageSamples` over a :class:`SampleReader`): memory does not grow with
  the number of images, and worker processes decode them.

Both end in the backbone's input config (:class:`adaptkit.data.InputConfig`): its size,
mean/std, resampling and crop, with the spec's ``data.preprocess`` overrides.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from adaptkit.data import SKIPPED, BatchDataset, DataBundle, DataInfo, InputConfig, TensorDataset
from adaptkit.errors import DataError
from adaptkit.images import UnreadableImage, decode_image

#: how many following samples are tried in place of an unreadable one before giving up
MAX_TRIES = 16


# ----------------------------------------------------------------- what the model expects
def input_config(params: Any, ctx: Any, native: tuple[int, int] | None = None, native_channels: int | None = None) -> InputConfig:
    """The backbone's input config with the spec's overrides (``data.image_size``,
    ``data.channels``, ``data.preprocess``); without a backbone that declares one,
    [-1, 1] at the data's own size."""
    backbone = getattr(ctx, "backbone", None)
    base = backbone.input_config() if backbone is not None and hasattr(backbone, "input_config") else None
    if base is None:
        size = native if native and native != (0, 0) else None
        if size is None and params.image_size is None and params.preprocess.size is None:
            raise DataError("data.image_size: the backbone declares no input size; give data.image_size")
        base = InputConfig(size=size or (1, 1), channels=int(native_channels or 3), source="[-1, 1]")
    pre = params.preprocess
    return base.updated(
        size=params.image_size or pre.size, channels=params.channels, mean=pre.mean, std=pre.std,
        interpolation=pre.interpolation, crop_pct=pre.crop_pct, crop_mode=pre.crop_mode,
    )


def fit_images(images: torch.Tensor, size: tuple[int, int], channels: int) -> torch.Tensor:
    """Resize (bilinear, antialiased) and convert channels (repeat gray / average RGB)."""
    if tuple(images.shape[-2:]) != tuple(size):
        images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
    if images.shape[1] != channels:
        images = images.repeat(1, channels, 1, 1) if images.shape[1] == 1 else images.mean(dim=1, keepdim=True)
    return images.contiguous()


def normalise(images: torch.Tensor, cfg: InputConfig) -> torch.Tensor:
    """[-1, 1] images -> ``(pixel - mean) / std`` with pixel = (x + 1) / 2 (identity for mean = std = 0.5)."""
    if cfg.is_minus_one_to_one:
        return images
    mean = torch.tensor(cfg.mean, dtype=images.dtype).view(1, -1, 1, 1)
    std = torch.tensor(cfg.std, dtype=images.dtype).view(1, -1, 1, 1)
    return ((images + 1) / 2 - mean) / std


# ----------------------------------------------------------------- transforms (timm's)
def eval_transform(cfg: InputConfig) -> Callable[[Any], torch.Tensor]:
    """timm's evaluation transform for ``cfg``: resize to size / crop_pct, crop, to tensor, normalise.

    Equals ``timm.data.create_transform(**resolve_data_config(model))`` for a timm model's config.
    """
    from timm.data import create_transform

    return create_transform(
        input_size=(cfg.channels, *cfg.size), is_training=False, interpolation=cfg.interpolation,
        mean=cfg.mean, std=cfg.std, crop_pct=cfg.crop_pct, crop_mode=cfg.crop_mode,
    )


def train_transform(cfg: InputConfig, augment: Any) -> Callable[[Any], torch.Tensor]:
    """timm's training transform: random-resized crop, flips, colour jitter or an auto-augment
    policy, to tensor, normalise, random erasing."""
    from timm.data import create_transform

    try:
        return create_transform(
            input_size=(cfg.channels, *cfg.size), is_training=True, interpolation=cfg.interpolation,
            mean=cfg.mean, std=cfg.std, scale=tuple(augment.scale), ratio=tuple(augment.ratio),
            hflip=augment.hflip, vflip=augment.vflip, color_jitter=augment.color_jitter or None,
            auto_augment=augment.auto_augment, re_prob=augment.re_prob, re_mode=augment.re_mode, re_count=augment.re_count,
        )
    except (AssertionError, ValueError, KeyError) as exc:
        raise DataError(f"data.augment: timm rejects these options ({type(exc).__name__}: {exc})") from None


def describe_augment(augment: Any, shift: int = 0) -> str:
    """One line for the run header."""
    if augment is None:
        return f"shift ±{shift}px" if shift else "none"
    parts = [f"random-resized crop scale {tuple(augment.scale)} ratio ({augment.ratio[0]:.3g}, {augment.ratio[1]:.3g})"]
    parts += [f"hflip {augment.hflip:g}"] if augment.hflip else []
    parts += [f"vflip {augment.vflip:g}"] if augment.vflip else []
    parts += [f"auto_augment {augment.auto_augment}"] if augment.auto_augment else (
        [f"colour jitter {augment.color_jitter:g}"] if augment.color_jitter else [])
    parts += [f"random erasing {augment.re_prob:g}"] if augment.re_prob else []
    parts += [f"mixup {augment.mixup:g}"] if augment.mixup else []
    parts += [f"cutmix {augment.cutmix:g}"] if augment.cutmix else []
    parts += [f"shift ±{shift}px"] if shift else []
    return ", ".join(parts)


class seeded_randomness:
    """Seed Python's, NumPy's and torch's global generators per sample (timm's transforms
    draw from them), then put the caller's generators back as they were."""

    def __enter__(self) -> "seeded_randomness":
        self.saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        return self

    @staticmethod
    def seed(value: int) -> None:
        random.seed(value)
        np.random.seed(value % (2**32))
        torch.default_generator.manual_seed(value)  # CPU only: torch.manual_seed costs ~4 ms a call

    def __exit__(self, *args: object) -> None:
        random.setstate(self.saved[0])
        np.random.set_state(self.saved[1])
        torch.set_rng_state(self.saved[2])


# ----------------------------------------------------------------- mixup / cutmix
def make_mix(augment: Any, num_classes: int) -> Callable[[dict[str, Any], torch.Tensor], dict[str, Any]]:
    """Batch augmentation mixing each image with the batch's reversed order (as timm's
    ``Mixup`` in batch mode): mixup blends whole images, cutmix pastes a box; labels become
    soft targets (n, num_classes). Drawn from the batch's first uniform number, so the same
    batch is mixed the same way in any worker or resumed run."""

    def mix(batch: dict[str, Any], rand: torch.Tensor) -> dict[str, Any]:
        images, labels = batch["images"], batch["labels"]
        targets = F.one_hot(labels, num_classes).float() if labels.ndim == 1 else labels
        rng = np.random.default_rng(int(rand[0, 0].item() * 2**31))
        if len(images) < 2 or rng.random() >= augment.mix_prob:
            return {**batch, "labels": targets}
        use_cutmix = augment.cutmix > 0 and (augment.mixup <= 0 or rng.random() < augment.switch_prob)
        alpha = augment.cutmix if use_cutmix else augment.mixup
        lam = float(rng.beta(alpha, alpha))
        partner = images.flip(0)
        if use_cutmix:
            h, w = images.shape[-2:]
            cut_h, cut_w = int(h * np.sqrt(1 - lam)), int(w * np.sqrt(1 - lam))
            cy, cx = int(rng.integers(h)), int(rng.integers(w))
            y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
            x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
            images = images.clone()
            images[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
            lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually pasted
        else:
            images = images * lam + partner * (1 - lam)
        return {**batch, "images": images, "labels": targets * lam + targets.flip(0) * (1 - lam)}

    return mix


def compose(*parts: tuple[Callable[[dict[str, Any], torch.Tensor], dict[str, Any]] | None, int]) -> tuple[Any, int]:
    """Chain batch augmentations, each taking its own columns of the per-sample random numbers."""
    chosen = [(fn, dims) for fn, dims in parts if fn is not None]
    if not chosen:
        return None, 0

    def augment(batch: dict[str, Any], rand: torch.Tensor) -> dict[str, Any]:
        start = 0
        for fn, dims in chosen:
            batch = fn(batch, rand[:, start : start + dims])
            start += dims
        return batch

    return augment, sum(dims for _, dims in chosen)


# ----------------------------------------------------------------- splits
def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of a stratified train/val/test split (scikit-learn, seeded)."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    train_f, val_f, test_f = fractions
    if val_f + test_f == 0:
        return index, index[:0], index[:0]
    try:
        train, rest = train_test_split(index, test_size=val_f + test_f, random_state=seed, stratify=labels)
        if val_f == 0:
            return train, rest[:0], rest
        if test_f == 0:
            return train, rest, rest[:0]
        val, test = train_test_split(rest, test_size=test_f / (val_f + test_f), random_state=seed, stratify=labels[rest])
    except ValueError as exc:
        counts = np.bincount(labels) if len(labels) and labels.min() >= 0 else np.zeros(0)
        fewest = f"; the smallest class has {int(counts[counts > 0].min())} samples" if counts.size and (counts > 0).any() else ""
        raise DataError(
            f"data.split: cannot split {len(labels)} samples by class into {tuple(fractions)}{fewest} ({exc}); "
            "add images, or change data.split"
        ) from None
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


# ----------------------------------------------------------------- embedded tensors
class TensorImages(TensorDataset):
    """In-memory images in [-1, 1], fitted to the input config per batch. With a training
    transform (``data.augment`` set), each sample goes through it as a PIL image instead,
    seeded per sample, exactly as image files do."""

    def __init__(self, cfg: InputConfig, transform: Callable[[Any], torch.Tensor] | None = None, **tensors: Any) -> None:
        super().__init__(**tensors)
        self.cfg, self.sample_transform = cfg, transform

    def batch(self, indices: Sequence[int], seeds: Sequence[int] | None = None) -> dict[str, Any]:
        out = super().batch(indices)
        if self.sample_transform is not None and seeds is not None:
            from PIL import Image

            pixels = ((out["images"] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
            mode = "L" if pixels.shape[1] == 1 else "RGB"
            with seeded_randomness() as rng:
                images = []
                for image, seed in zip(pixels, seeds):
                    rng.seed(int(seed))
                    array = image[0].numpy() if mode == "L" else image.permute(1, 2, 0).numpy()
                    images.append(self.sample_transform(Image.fromarray(array, mode).convert("L" if self.cfg.channels == 1 else "RGB")))
            return {**out, "images": torch.stack(images)}
        return {**out, "images": normalise(fit_images(out["images"], self.cfg.size, self.cfg.channels), self.cfg)}


def labelled_bundle(
    images: torch.Tensor, labels: np.ndarray, class_names: list[str], params: Any, ctx: Any, source_size: int
) -> DataBundle:
    """Split, fit to the model's input and wrap labelled in-memory images into a :class:`DataBundle`."""
    train, val, test = stratified_split(labels, params.split, params.split_seed)
    train = few_shot(train, labels, params.shots, params.split_seed)
    cfg = input_config(params, ctx, tuple(images.shape[-2:]), images.shape[1])
    augment = params.augment_for(files=False)
    transform = train_transform(cfg, augment) if augment is not None else None
    y = torch.as_tensor(labels, dtype=torch.long)

    def subset(idx: np.ndarray, sample_transform: Any = None) -> TensorImages:
        t = torch.as_tensor(idx, dtype=torch.long)
        return TensorImages(cfg, sample_transform, images=images[t], labels=y[t])

    info = DataInfo(kind="labelled_images", num_classes=len(class_names), class_names=class_names,
                    image_size=tuple(cfg.size), channels=cfg.channels,
                    extra={"preprocess": cfg.as_dict(), "augment": describe_augment(augment, params.shift)})
    shift = None
    if params.shift:
        scaled = max(1, round(params.shift * cfg.size[0] / source_size))
        shift = make_shift(scaled, float(normalise(torch.full((1, cfg.channels, 1, 1), float(images.min())), cfg).min()))
    mix = make_mix(augment, len(class_names)) if augment is not None and augment.mixes else None
    fn, dims = compose((shift, 2), (mix, 1))
    return DataBundle(info, subset(train, transform), subset(val), subset(test), augment=fn, augment_dims=dims)


# ----------------------------------------------------------------- images read one by one
class SampleError(Exception):
    """One sample could not be read (``reason``); the dataset skips or fails as data.on_error says."""


class SampleReader:
    """Random access to a collection of images: files, tar members, rows of a table.

    ``image(i)`` returns a decoded PIL image or raises :class:`SampleError`; ``text(i)``
    the sample's caption where it has one; ``where(i)`` names the sample in messages.
    Readers are pickled into worker processes: open handles lazily, per process.
    """

    def __len__(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def image(self, i: int) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def text(self, i: int) -> str:  # pragma: no cover - interface
        raise SampleError("this source has no captions")

    def where(self, i: int) -> str:  # pragma: no cover - interface
        return f"sample {i}"


def decode(source: Any, where: str) -> Any:
    """Open and fully decode an image, a path or a binary file object
    (:func:`adaptkit.images.decode_image`), every way it can
    fail, PIL's decompression-bomb guard included, as a :class:`SampleError`."""
    try:
        return decode_image(source)
    except UnreadableImage as exc:
        if exc.bomb:
            raise SampleError(f"{where}: larger than PIL's decompression-bomb limit ({exc.cause})") from None
        raise SampleError(f"{where}: cannot read the image ({type(exc.cause).__name__}: {str(exc.cause)[:160]})") from None


class ImageSamples(BatchDataset):
    """A split of a :class:`SampleReader`'s samples (``rows``), decoded and transformed per
    sample. An unreadable sample is replaced by the next readable one of the split and
    counted (``data.on_error: skip``), or fails the run (``fail``); a source where most
    reads fail is an error naming a file either way."""

    def __init__(
        self,
        reader: SampleReader,
        rows: np.ndarray,
        transform: Callable[[Any], torch.Tensor],
        channels: int,
        on_error: str = "skip",
        labels: np.ndarray | None = None,
        captions: bool = False,
    ) -> None:
        self.reader, self.rows, self.transform = reader, np.asarray(rows, dtype=np.int64), transform
        self.mode = "L" if channels == 1 else "RGB"
        self.on_error, self.labels, self.captions = on_error, labels, captions
        self.reads = self.failures = 0  # per process (each worker counts its own reads)

    def __len__(self) -> int:
        return len(self.rows)

    def _failed(self, error: SampleError) -> None:
        self.failures += 1
        if self.on_error == "fail":
            raise DataError(f"data: {error} (data.on_error=skip skips unreadable samples)")
        if self.failures >= 8 and self.failures * 2 > self.reads:
            raise DataError(
                f"data: {self.failures} of the {self.reads} samples read so far could not be read, e.g. {error}; "
                "is this the right data?"
            )

    def _sample(self, position: int, seed: int | None) -> tuple[torch.Tensor, int, str | None, int]:
        """(image tensor, row, caption, failures) of the first readable sample from ``position`` on."""
        failures = 0
        for attempt in range(MAX_TRIES):
            row = int(self.rows[(position + attempt) % len(self.rows)])
            self.reads += 1
            try:
                image = self.reader.image(row)
                text = self.reader.text(row) if self.captions else None
                if image.mode != self.mode:
                    image = image.convert(self.mode)
                if seed is not None:
                    seeded_randomness.seed(seed)
                return self.transform(image), row, text, failures
            except SampleError as error:
                failures += 1
                self._failed(error)
        raise DataError(f"data: {MAX_TRIES} samples in a row could not be read, the last {self.reader.where(row)}")

    def batch(self, indices: Sequence[int], seeds: Sequence[int] | None = None) -> dict[str, Any]:
        images, rows, texts, skipped = [], [], [], 0
        with seeded_randomness():
            for k, index in enumerate(indices):
                image, row, text, failures = self._sample(int(index), None if seeds is None else int(seeds[k]))
                images.append(image)
                rows.append(row)
                texts.append(text)
                skipped += failures
        # default_collate stacks straight into shared memory in a loader worker (no copy on the way out)
        batch: dict[str, Any] = {"images": default_collate(images), SKIPPED: skipped}
        if self.labels is not None:
            batch["labels"] = torch.as_tensor(self.labels[rows], dtype=torch.long)
        if self.captions:
            batch["captions"] = texts
        return batch


def probe(reader: SampleReader, rows: np.ndarray, count: int = 16) -> None:
    """Open a few samples spread over the source before training (headers only where the
    format allows): a source where most fail is an error now, naming one."""
    if len(rows) == 0:
        return
    picks = np.unique(np.linspace(0, len(rows) - 1, num=min(count, len(rows))).astype(np.int64))
    errors = []
    for pick in picks:
        try:
            reader.image(int(rows[pick]))
        except SampleError as error:
            errors.append(error)
    if errors and len(errors) * 2 > len(picks):
        raise DataError(f"data: {len(errors)} of {len(picks)} samples tried could not be read, e.g. {errors[0]}; is this the right data?")


def lazy_bundle(
    reader: SampleReader,
    splits: tuple[np.ndarray, np.ndarray, np.ndarray],
    labels: np.ndarray | None,
    class_names: list[str],
    params: Any,
    ctx: Any,
    kind: str = "labelled_images",
) -> DataBundle:
    """A :class:`DataBundle` of samples read lazily: the training split through the training
    transform (``data.augment``), the others through the evaluation transform."""
    cfg = input_config(params, ctx)
    augment = params.augment_for(files=True)
    evaluation = eval_transform(cfg)
    training = train_transform(cfg, augment) if augment is not None else evaluation
    captions = kind == "captioned_images"
    train, val, test = splits
    for rows in splits:
        probe(reader, rows, 6)

    def subset(rows: np.ndarray, transform: Any) -> ImageSamples:
        return ImageSamples(reader, rows, transform, cfg.channels, params.on_error, labels, captions)

    info = DataInfo(kind=kind, num_classes=len(class_names), class_names=class_names, image_size=tuple(cfg.size),
                    channels=cfg.channels, extra={"preprocess": cfg.as_dict(), "augment": describe_augment(augment, 0)})
    if params.shift:
        raise DataError("data.shift: shifts apply to embedded tensors (digits); for image files use data.augment")
    mix = None
    if augment is not None and augment.mixes:
        if labels is None or kind != "labelled_images":
            raise DataError("data.augment: mixup/cutmix need class labels (labelled images)")
        mix = make_mix(augment, len(class_names))
    return DataBundle(info, subset(train, training), subset(val, evaluation), subset(test, evaluation),
                      augment=mix, augment_dims=1 if mix else 0)
