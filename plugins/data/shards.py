"""Data sources ``shards`` and ``shards_captions``: tar shards in the webdataset layout."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from adaptkit.hookspecs import hookimpl
from adaptkit.records import DataRecord
from adaptkit_plugins.data.image_params import ImageDataParams

ShardSpec = str | list[str]


class ShardsParams(ImageDataParams):
    """Tar shards as webdataset and open_clip write them: the members of a sample share a key
    (``0001.jpg`` + ``0001.cls``), e.g. ``train: data/train-{000000..000127}.tar``.

    Each shard's member headers are indexed once when the run starts (in memory, about 50
    bytes per sample; nothing is written next to the data) and samples are then read by
    random access. Unlike webdataset's streaming, which shuffles and splits whole shards,
    this keeps the trainer's exact per-sample shuffling, its per-rank split under torchrun
    and mid-epoch resume at the same sample. Shards must be uncompressed ``.tar`` files.
    Without ``val``/``test`` shards, the training samples are split by ``split``.
    """

    name: Literal["shards"] = "shards"
    train: ShardSpec = Field(..., description="training shards: a brace pattern (train-{000000..000127}.tar), a glob, or a list of them")
    val: ShardSpec | None = Field(None, description="validation shards (default: split off the training shards by data.split)")
    test: ShardSpec | None = Field(None, description="test shards (default: split off the training shards by data.split)")
    image_ext: list[str] = Field(["jpg", "jpeg", "png", "webp"], min_length=1, description="extensions of image members, preferred first")
    label_ext: str | None = Field("cls", description="extension of the member holding the class number (0, 1, ...); required here")
    classes: list[str] | None = Field(None, min_length=1, description="class names, by class number (default: '0', '1', ...)")

    @field_validator("image_ext")
    @classmethod
    def _extensions(cls, value: list[str]) -> list[str]:
        return [ext.lower().lstrip(".") for ext in value]

    @field_validator("label_ext")
    @classmethod
    def _extension(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None and info.data.get("name") == "shards":
            raise ValueError("labelled shards need a label member; for captions alone use data source 'shards_captions'")
        return value.lower().lstrip(".") if value is not None else None


class ShardCaptionsParams(ShardsParams):
    """Captioned tar shards (``0001.jpg`` + ``0001.txt``, open_clip's layout), read as ``shards`` are.

    A ``.cls`` member in every sample also gives class labels (stratified splits, ``shots``
    and zero-shot accuracy); set ``label_ext: null`` to ignore them.
    """

    name: Literal["shards_captions"] = "shards_captions"  # type: ignore[assignment]
    label_ext: str | None = Field("cls", description="extension of an optional class-number member (used when every sample has one)")
    caption_ext: str = Field("txt", description="extension of the member holding the caption (UTF-8 text)")

    @field_validator("caption_ext")
    @classmethod
    def _caption(cls, value: str) -> str:
        return value.lower().lstrip(".")


def load_shards(params: ShardsParams, ctx: Any) -> Any:
    from adaptkit_plugins.data.tar_shards import shards_bundle

    return shards_bundle(params, ctx, "labelled_images")


def load_shard_captions(params: ShardCaptionsParams, ctx: Any) -> Any:
    from adaptkit_plugins.data.tar_shards import shards_bundle

    return shards_bundle(params, ctx, "captioned_images")


@hookimpl
def adaptkit_data_sources() -> list[DataRecord]:
    return [
        DataRecord(
            name="shards",
            params=ShardsParams,
            factory=load_shards,
            summary="webdataset tar shards of images + .cls labels (train-{000000..000127}.tar), read by random access",
            provides="labelled_images",
        ),
        DataRecord(
            name="shards_captions",
            params=ShardCaptionsParams,
            factory=load_shard_captions,
            summary="webdataset tar shards of images + .txt captions (open_clip's layout), read by random access",
            provides="captioned_images",
        ),
    ]
