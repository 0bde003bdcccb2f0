"""Data source ``captions``: image-caption pairs listed in a CSV or JSON Lines file."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from adaptkit.hookspecs import hookimpl
from adaptkit.records import DataRecord
from adaptkit_plugins.data.image_params import ImageDataParams


class CaptionsParams(ImageDataParams):
    """``file``: a .csv (header row) or .jsonl file with an image path and a caption per row.

    Image paths are relative to the file's folder and may not leave it unless
    ``allow_outside_root``; images are read lazily, per batch. An optional label column gives the
    class of each image (for zero-shot accuracy, stratified splits and ``shots``).
    """

    name: Literal["captions"] = "captions"
    file: str = Field(..., description="a .csv or .jsonl file of image path + caption (+ optional label)")
    image_key: str = Field("image", description="column / key of the image path")
    caption_key: str = Field("caption", description="column / key of the caption")
    label_key: str | None = Field(None, description="column / key of an optional class label")
    resize: bool = Field(True, description="resize images to image_size; when false, a different size is an error")
    allow_outside_root: bool = Field(False, description="allow image paths that leave the listing's folder (../, absolute paths)")


def load_captions(params: CaptionsParams, ctx: Any) -> Any:
    from adaptkit_plugins.clip.captions_data import captions_bundle

    return captions_bundle(params, ctx)


@hookimpl
def adaptkit_data_sources() -> list[DataRecord]:
    return [
        DataRecord(
            name="captions",
            params=CaptionsParams,
            factory=load_captions,
            summary="image-caption pairs from a CSV or JSONL file (image path, caption, optional label)",
            provides="captioned_images",
        )
    ]
