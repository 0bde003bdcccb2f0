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
        if len(value) < 2:
            raise ValueError("give at least two digits")
        if len(set(value)) != len(value):
            raise ValueError("digits must not repeat")
        bad = [v for v in value if not 0 <= v <= 9]
        if bad:
            raise ValueError(f"digits are 0-9, got {bad}")
        return value


def load_digits_bundle(params: DigitsParams, ctx: Any) -> Any:
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    from adaptkit_plugins.data._images import labelled_bundle

    digits = load_digits()
    x, y = digits.images.astype("float32"), digits.target
    classes = params.classes if params.classes is not None else list(range(10))
    keep = np.isin(y, classes)
    x, y = x[keep], y[keep]
    relabel = {c: i for i, c in enumerate(classes)}
    labels = np.array([relabel[v] for v in y])
    images = torch.from_numpy(x / 8.0 - 1.0).unsqueeze(1)  # 0..16 -> [-1, 1]
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
