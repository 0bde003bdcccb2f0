"""Task ``contrastive``: CLIP's symmetric cross-entropy over image-caption pairs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from adaptkit.hookspecs import hookimpl
from adaptkit.params import ComponentParams
from adaptkit.records import TaskRecord


class ContrastiveParams(ComponentParams):
    """Contrastive image-text training (Radford et al., 2021, figure 3).

    In a batch of n pairs the i-th image belongs with the i-th caption: logits are
    ``logit_scale * normalize(images) @ normalize(captions).T``, the loss the mean of
    the cross-entropies along the image axis and the text axis with labels 0..n-1.
    Train the temperature with the rest: it belongs to the text tower.
    """

    name: Literal["contrastive"] = "contrastive"
    zero_shot_templates: list[str] = Field(
        default_factory=lambda: ["{label}"],
        description="when the data has class labels, evaluation also reports zero-shot accuracy with the class names "
        "in these templates (several = an ensemble)",
    )

    @field_validator("zero_shot_templates")
    @classmethod
    def _templates(cls, value: list[str]) -> list[str]:
        from adaptkit.templates import check_template

        if not value:
            raise ValueError("give at least one template")
        for template in value:
            check_template(template)
        return value


def build_contrastive(params: ContrastiveParams, backbone: Any, data_info: Any, ctx: Any) -> Any:
    from adaptkit_plugins.clip._contrastive_impl import ContrastiveModel

    return ContrastiveModel.create(params, backbone, data_info)


@hookimpl
def adaptkit_tasks() -> list[TaskRecord]:
    return [
        TaskRecord(
            name="contrastive",
            params=ContrastiveParams,
            factory=build_contrastive,
            summary="CLIP's symmetric image-text cross-entropy; image->caption accuracy and, with labels, zero-shot accuracy",
            needs=frozenset({"image_features", "text_features"}),
            data_kinds=frozenset({"captioned_images"}),
        )
    ]
