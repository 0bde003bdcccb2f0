"""Data source ``digits``: scikit-learn's bundled 1,797 real 8x8 handwritten digits."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from adaptkit.hookspecs import hookimpl
from adaptkit.records import DataRecord
from adaptkit_plugins.data.image_params import ImageDataParams


class DigitsParams(ImageDataParams):
    """The digits that ship with scikit-learn (no download), scaled to [-1, 1]."""

    name: Literal["digits"] = "digits"
    classes: list[int] | None = Field(None, description="keep only these digits, e.g. [5, 6, 7, 8, 9]; labels follow this order")

    @field_validator("classes")
    @classmethod
    def _classes(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return value
        if not value:  # one digit is a DreamBooth / textual-inversion subject
            raise ValueError("give at least one digit")
        if len(set(value)) != len(value):
            raise ValueError("digits must not repeat")
        bad = [v for v in value if not 0 <= v <= 9]
        if bad:
            raise ValueError(f"digits are 0-9, got {bad}")
        return value


def load_digit_images(classes: list[int] | None) -> tuple[Any, Any, Any]:
    """(images (n, 1, 8, 8) in [-1, 1], labels 0..k-1 in the order of ``classes``, the original digits)."""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = digits.images.astype("float32"), digits.target
    classes = classes if classes is not None else list(range(10))
    keep = np.isin(y, classes)
    x, y = x[keep], y[keep]
    relabel = {c: i for i, c in enumerate(classes)}
    labels = np.array([relabel[v] for v in y])
    images = torch.from_numpy(x / 8.0 - 1.0).unsqueeze(1)  # 0..16 -> [-1, 1]
    return images, labels, y


def load_digits_bundle(params: DigitsParams, ctx: Any) -> Any:
    from adaptkit_plugins.data.image_samples import labelled_bundle

    images, labels, _ = load_digit_images(params.classes)
    classes = params.classes if params.classes is not None else list(range(10))
    return labelled_bundle(images, labels, [str(c) for c in classes], params, ctx, source_size=8)


@hookimpl
def adaptkit_data_sources() -> list[DataRecord]:
    return [
        DataRecord(
            name="digits",
            params=DigitsParams,
            factory=load_digits_bundle,
            summary="scikit-learn's 1,797 real 8x8 handwritten digits (embedded; stratified 70/15/15 split)",
            provides="labelled_images",
        )
    ]
