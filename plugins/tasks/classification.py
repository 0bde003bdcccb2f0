"""Task ``classification``: cross-entropy on image features with a fresh linear head."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from adaptkit.hookspecs import hookimpl
from adaptkit.params import ComponentParams
from adaptkit.records import TaskRecord


class ClassificationParams(ComponentParams):
    """Image classification: a linear head on the backbone's pooled image features."""

    name: Literal["classification"] = "classification"
    num_classes: int | None = Field(None, gt=1, description="default: the number of classes in the data")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing")
    top_k: int = Field(5, gt=1, description="also report top-k accuracy when there are more than k classes")


def build_classification(params: ClassificationParams, backbone: Any, data_info: Any, ctx: Any) -> Any:
    from adaptkit_plugins.tasks.classification_model import ClassificationModel

    return ClassificationModel.create(params, backbone, data_info)


@hookimpl
def adaptkit_tasks() -> list[TaskRecord]:
    return [
        TaskRecord(
            name="classification",
            params=ClassificationParams,
            factory=build_classification,
            summary="cross-entropy with a new linear head; accuracy, per-class accuracy, confusion matrix",
            needs=frozenset({"image_features"}),
            data_kinds=frozenset({"labelled_images"}),
        )
    ]
