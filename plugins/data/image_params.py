"""Parameters shared by image data sources: split, preprocessing overrides, augmentation,
loader options. No torch import here."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from adaptkit.params import LoaderParams
from adaptkit.spec import StrictModel


class PreprocessParams(StrictModel):
    """Override fields of the backbone's input config (which comes from its checkpoint).

    Unset fields keep the checkpoint's values. Example: ``{crop_pct: 1.0, interpolation: bilinear}``.
    """

    size: int | None = Field(None, gt=0, le=4096, description="square input size in pixels")
    mean: list[float] | None = Field(None, min_length=1, max_length=3, description="per-channel mean of pixels in [0, 1]")
    std: list[float] | None = Field(None, min_length=1, max_length=3, description="per-channel std of pixels in [0, 1]")
    interpolation: Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"] | None = Field(None, description="resampling filter")
    crop_pct: float | None = Field(None, gt=0, le=1, description="evaluation: resize to size / crop_pct, then crop size")
    crop_mode: Literal["center", "squash", "border"] | None = Field(None, description="evaluation crop: centre crop, squash (no crop) or border")

    @field_validator("mean", "std")
    @classmethod
    def _finite(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and not all(math.isfinite(v) for v in value):
            raise ValueError("values must be finite")
        return value

    @field_validator("std")
    @classmethod
    def _positive(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and any(v <= 0 for v in value):
            raise ValueError("std values must be > 0")
        return value


class AugmentParams(StrictModel):
    """Training augmentation (timm's transforms; evaluation never augments).

    Example: ``{auto_augment: rand-m9-mstd0.5, mixup: 0.8, cutmix: 1.0, re_prob: 0.25}``.
    """

    scale: tuple[float, float] = Field((0.08, 1.0), description="random-resized-crop area fraction range ([1, 1] with ratio [1, 1]: the whole image)")
    ratio: tuple[float, float] = Field((0.75, 4 / 3), description="random-resized-crop aspect ratio range")
    hflip: float = Field(0.5, ge=0, le=1, description="probability of a horizontal flip")
    vflip: float = Field(0.0, ge=0, le=1, description="probability of a vertical flip")
    color_jitter: float = Field(0.0, ge=0, le=1, description="brightness/contrast/saturation jitter strength (0: off; ignored with auto_augment)")
    auto_augment: str | None = Field(None, description="timm policy: rand-m9-mstd0.5 (RandAugment), augmix-m5-w3, original, v0, ...")
    re_prob: float = Field(0.0, ge=0, le=1, description="random erasing probability")
    re_mode: Literal["const", "rand", "pixel"] = Field("pixel", description="random erasing fill")
    re_count: int = Field(1, ge=1, le=16, description="random erasing: boxes per image")
    mixup: float = Field(0.0, ge=0, le=10, description="mixup Beta(alpha, alpha) (0: off); labels become soft targets")
    cutmix: float = Field(0.0, ge=0, le=10, description="cutmix Beta(alpha, alpha) (0: off); with mixup, one of the two per batch")
    mix_prob: float = Field(1.0, ge=0, le=1, description="probability of mixing a batch at all")
    switch_prob: float = Field(0.5, ge=0, le=1, description="with both mixup and cutmix: probability of cutmix")

    @field_validator("scale", "ratio")
    @classmethod
    def _range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(math.isfinite(v) and v > 0 for v in value) or value[0] > value[1]:
            raise ValueError("give [low, high] with 0 < low <= high")
        return value

    @field_validator("scale")
    @classmethod
    def _area(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[1] > 1:
            raise ValueError("crop area fractions are at most 1")
        return value

    @field_validator("auto_augment")
    @classmethod
    def _policy(cls, value: str | None) -> str | None:
        if value is None:
            return value
        head = value.split("-")[0]
        if head not in {"rand", "augmix", "original", "originalr", "v0", "v0r", "3a", "trivial"}:
            raise ValueError(f"unknown timm policy '{value}'; e.g. rand-m9-mstd0.5, augmix-m5-w3, original, v0, 3a")
        return value

    @property
    def mixes(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.mix_prob > 0


class ImageDataParams(LoaderParams):
    split: tuple[float, float, float] = Field(
        (0.7, 0.15, 0.15), description="train/val/test fractions (stratified by class)"
    )
    split_seed: int = Field(0, ge=0, lt=2**32, description="seed of the split (the same split across runs and seeds)")
    image_size: int | None = Field(None, gt=0, le=2048, description="resize to this size; default: the backbone's input size")
    channels: int | None = Field(None, description="1 or 3; default: the backbone's input channels")
    shift: int = Field(0, ge=0, le=64, description="training augmentation: random shifts of up to this many (source) pixels")
    shots: int | None = Field(None, gt=0, description="keep only k training images per class (few-shot)")
    preprocess: PreprocessParams = Field(default_factory=PreprocessParams, description="override the backbone's input config (size, mean/std, interpolation, crop)")
    augment: AugmentParams | Literal["default", "none"] = Field(
        "default",
        description="training augmentation: options, 'none', or 'default' (image files: random-resized crop + flip; "
        "embedded tensors such as digits: only data.shift)",
    )

    def augment_for(self, files: bool) -> AugmentParams | None:
        """The augmentation to apply: ``default`` is a random-resized crop + flip for image files
        and nothing (besides ``shift``) for embedded tensors."""
        if self.augment == "none":
            return None
        if self.augment == "default":
            return AugmentParams() if files else None
        return self.augment

    @field_validator("split")
    @classmethod
    def _fractions(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(v < 0 for v in value) or value[0] <= 0:
            raise ValueError("fractions must be >= 0 with a positive train fraction")
        if abs(sum(value) - 1) > 1e-6:
            raise ValueError(f"train/val/test fractions must sum to 1, got {sum(value):g}")
        return value

    @field_validator("channels")
    @classmethod
    def _channels(cls, value: int | None) -> int | None:
        if value not in (None, 1, 3):
            raise ValueError("channels must be 1 or 3")
        return value

    @model_validator(mode="after")
    def _one_size(self) -> "ImageDataParams":
        if self.image_size is not None and self.preprocess.size is not None and self.image_size != self.preprocess.size:
            raise ValueError(f"image_size {self.image_size} and preprocess.size {self.preprocess.size} disagree; give one")
        return self
