"""Parameters shared by image data sources. No torch import here."""

from __future__ import annotations

from pydantic import Field, field_validator

from adaptkit.params import ComponentParams


class ImageDataParams(ComponentParams):
    split: tuple[float, float, float] = Field(
        (0.7, 0.15, 0.15), description="train/val/test fractions (stratified by class)"
    )
    split_seed: int = Field(0, ge=0, lt=2**32, description="seed of the split (the same split across runs and seeds)")
    image_size: int | None = Field(None, gt=0, le=2048, description="resize to this size; default: the backbone's input size")
    channels: int | None = Field(None, description="1 or 3; default: the backbone's input channels")
    shift: int = Field(0, ge=0, le=256, description="training augmentation: random shifts of up to this many (source) pixels")
    shots: int | None = Field(None, gt=0, description="keep only k training images per class (few-shot)")

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
