"""Task ``zero_shot``: classify images by their similarity to the class names' text embeddings."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from adaptkit.hookspecs import hookimpl
from adaptkit.params import ComponentParams
from adaptkit.records import TaskRecord


class ZeroShotParams(ComponentParams):
    """A text classifier from class names: logits = logit_scale * cos(image, text(class)).

    Without a method it only evaluates (zero-shot); with one (LoRA, prompt, adapter)
    it trains through the same head on the data's (few-shot: ``data.shots``) images.
    Templates come from the ``system_prompt`` method, applied to the class names.
    """

    name: Literal["zero_shot"] = "zero_shot"
    class_names: list[str] | None = Field(
        None, description="the texts of the classes in label order (e.g. [zero, one, ...]); default: the data's class names"
    )
    top_k: int = Field(5, gt=1, description="also report top-k accuracy when there are more than k classes")

    @field_validator("class_names")
    @classmethod
    def _names(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if len(value) < 2:
                raise ValueError("give at least two class names")
            if any(not str(v).strip() for v in value):
                raise ValueError("class names must not be empty")
        return value


def build_zero_shot(params: ZeroShotParams, backbone: Any, data_info: Any, ctx: Any) -> Any:
    from adaptkit_plugins.clip._zero_shot_impl import ZeroShotModel

    return ZeroShotModel.create(params, backbone, data_info)


@hookimpl
def adaptkit_tasks() -> list[TaskRecord]:
    return [
        TaskRecord(
            name="zero_shot",
            params=ZeroShotParams,
            factory=build_zero_shot,
            summary="zero-/few-shot classification with a text classifier (cosine x logit_scale); top-1/top-k, per-class accuracy",
            needs=frozenset({"image_features", "text_features"}),
            data_kinds=frozenset({"labelled_images", "captioned_images"}),
        )
    ]
