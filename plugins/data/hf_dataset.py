"""Data sources ``hf_dataset`` and ``hf_captions``: a Hugging Face ``datasets`` dataset on disk.

An optional extra (``pip install datasets``): the package is imported when such a source
is built. Arrow tables are memory-mapped and each sample is decoded when a batch needs
it, so memory does not grow with the dataset.
"""

from __future__ import annotations

import io
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from adaptkit.hookspecs import hookimpl
from adaptkit.records import DataRecord
from adaptkit_plugins.data.image_params import ImageDataParams


class HFDatasetParams(ImageDataParams):
    """A dataset written by ``save_to_disk`` (``path``), or parquet files (``data_files``),
    with an image column and a class column. Example::

        data: {name: hf_dataset, path: food101/, val_split: validation, label_key: label}

    Splits come from the dataset's own (``train_split``, ``val_split``, ``test_split``);
    when it has neither a validation nor a test split, the training one is split by
    ``split``. Class names come from a ``ClassLabel`` column, else the labels themselves
    (sorted strings, or '0', '1', ... for numbers). Nothing is downloaded.
    """

    name: Literal["hf_dataset"] = "hf_dataset"
    path: str | None = Field(None, description="a folder written by Dataset.save_to_disk / DatasetDict.save_to_disk")
    data_files: str | list[str] | dict[str, str | list[str]] | None = Field(
        None, description="parquet files or globs (the training split), or a mapping of split name to files"
    )
    train_split: str = Field("train", description="the split to train on")
    val_split: str | None = Field("validation", description="the validation split, when the dataset has it")
    test_split: str | None = Field("test", description="the test split, when the dataset has it")
    image_key: str = Field("image", description="the image column (an Image feature, encoded bytes or a file path)")
    label_key: str | None = Field("label", description="the class column (ClassLabel, integers or strings); required here")
    cache_dir: str | None = Field(None, description="where datasets keeps its Arrow copy of parquet files (default: its own cache)")

    @model_validator(mode="after")
    def _one_source(self) -> "HFDatasetParams":
        if (self.path is None) == (self.data_files is None):
            raise ValueError("give either path (a save_to_disk folder) or data_files (parquet files)")
        return self

    @field_validator("label_key")
    @classmethod
    def _labelled(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None and info.data.get("name") == "hf_dataset":
            raise ValueError("labelled images need a class column; for captions alone use data source 'hf_captions'")
        return value


class HFCaptionsParams(HFDatasetParams):
    """Image-caption pairs in a ``datasets`` dataset, read as ``hf_dataset`` reads images.

    An optional ``label_key`` also gives class labels (stratified splits, ``shots`` and
    zero-shot accuracy).
    """

    name: Literal["hf_captions"] = "hf_captions"  # type: ignore[assignment]
    label_key: str | None = Field(None, description="an optional class column")
    caption_key: str = Field("caption", description="the caption column (strings)")


# ----------------------------------------------------------------- loading
def _load_splits(params: HFDatasetParams) -> dict[str, Any]:
    """The dataset's splits by name (a single Dataset is the training split)."""
    from pathlib import Path

    from adaptkit.errors import DataError

    try:
        import datasets
    except ImportError:
        raise DataError(f"data source '{params.name}' needs the datasets package: pip install datasets") from None
    try:
        if params.path is not None:
            if not Path(params.path).is_dir():
                raise DataError(f"data.path: folder {params.path} not found")
            loaded = datasets.load_from_disk(params.path)
        else:
            files = params.data_files if isinstance(params.data_files, dict) else {params.train_split: params.data_files}
            loaded = datasets.load_dataset("parquet", data_files=files, cache_dir=params.cache_dir)
    except (FileNotFoundError, ValueError, TypeError, OSError) as exc:  # datasets' ways of saying "not a dataset here"
        where = f"path: {params.path}" if params.path is not None else f"data_files: {params.data_files}"
        raise DataError(f"data.{where}: datasets cannot load it ({type(exc).__name__}: {str(exc)[:300]})") from None
    return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {params.train_split: loaded}


def _labels(table: Any, key: str, split_of: Any) -> tuple[Any, list[str]]:
    """The class column as int64 numbers (read once, as a column) and the class names."""
    import numpy as np
    from datasets import ClassLabel

    from adaptkit.errors import DataError

    feature = table.features[key]
    values = np.asarray(table.with_format("numpy", columns=[key])[key])
    if isinstance(feature, ClassLabel):
        labels, names = values.astype(np.int64), list(feature.names)
    elif values.dtype.kind in "iu":
        labels = values.astype(np.int64)
        names = [str(c) for c in range(int(labels.max()) + 1)] if len(labels) else []
    elif values.dtype.kind in "US" or (values.dtype == object and all(isinstance(v, str) for v in values[:1000])):
        names = sorted({str(v) for v in values if v is not None})
        index = {name: number for number, name in enumerate(names)}
        labels = np.asarray([index.get(v, -1) if isinstance(v, str) else -1 for v in values], dtype=np.int64)
    else:
        raise DataError(f"data.label_key: column '{key}' holds {feature}, not class labels (ClassLabel, integers or strings)")
    missing = np.flatnonzero(labels < 0)
    if len(missing):
        raise DataError(f"data.label_key: {split_of(int(missing[0]))} has no label in '{key}' "
                        f"({len(missing)} of {len(labels)} rows lack one)")
    return labels, names


class TableReader:
    """Rows of a ``datasets`` table by index (see :class:`adaptkit_plugins.data.image_samples.SampleReader`):
    the image column as stored (PNG/JPEG bytes or a path), decoded here."""

    def __init__(self, table: Any, image_key: str, caption_key: str | None, bounds: list[tuple[str, int]]) -> None:
        self.table, self.image_key, self.caption_key, self.bounds = table, image_key, caption_key, bounds

    def __len__(self) -> int:
        return len(self.table)

    def image(self, i: int) -> Any:
        from adaptkit_plugins.data.image_samples import SampleError, decode

        value = self.table[i][self.image_key]
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return decode(io.BytesIO(value), self.where(i))
        if isinstance(value, str):
            return decode(value, f"{self.where(i)} ({value})")
        if hasattr(value, "convert"):  # already a PIL image
            return value
        raise SampleError(f"{self.where(i)}: column '{self.image_key}' holds {type(value).__name__}, not an image")

    def text(self, i: int) -> str:
        return str(self.table[i][self.caption_key] or "")

    def where(self, i: int) -> str:
        name, start = next((name, start) for name, start in reversed(self.bounds) if i >= start)
        return f"split '{name}' row {i - start}"


def hf_bundle(params: HFDatasetParams, ctx: Any, kind: str) -> Any:
    """A :class:`adaptkit.data.DataBundle` of a ``datasets`` dataset (``kind``: labelled or captioned images)."""
    import numpy as np

    from adaptkit.errors import DataError
    from adaptkit_plugins.data.image_samples import lazy_bundle
    from adaptkit_plugins.data.tar_shards import split_rows

    splits = _load_splits(params)  # first: says how to install datasets where it is missing
    from datasets import Image, concatenate_datasets

    available = ", ".join(splits) or "none"
    if params.train_split not in splits:
        raise DataError(f"data.train_split: the dataset has no split '{params.train_split}'; it has {available}")
    for field in ("val_split", "test_split"):
        name = getattr(params, field)
        if field in params.model_fields_set and name is not None and name not in splits:
            raise DataError(f"data.{field}: the dataset has no split '{name}'; it has {available}")
    named = [params.train_split] + [name for name in (params.val_split, params.test_split) if name in splits]
    fixed = None
    if len(named) > 1:  # the dataset's own splits, in train/val/test order
        fixed = tuple(len(splits[name]) if name in named else 0 for name in (params.train_split, params.val_split, params.test_split))

    caption_key = params.caption_key if isinstance(params, HFCaptionsParams) else None
    keys = {"image_key": params.image_key, "label_key": params.label_key, "caption_key": caption_key}
    columns = [key for key in keys.values() if key is not None]
    for field, key in keys.items():
        lacking = [name for name in named if key is not None and key not in splits[name].column_names]
        if lacking:
            raise DataError(f"data.{field}: split '{lacking[0]}' has no column '{key}'; it has {', '.join(splits[lacking[0]].column_names)}")
    try:
        table = concatenate_datasets([splits[name].select_columns(columns) for name in named])
    except ValueError as exc:
        raise DataError(f"data: the splits {', '.join(named)} have different columns or types ({exc})") from None
    if isinstance(table.features[params.image_key], Image):
        table = table.cast_column(params.image_key, Image(decode=False))  # decoded by the reader, whose errors are SampleErrors
    bounds = list(zip(named, np.cumsum([0] + [len(splits[name]) for name in named]).tolist()))
    reader = TableReader(table, params.image_key, caption_key, bounds)
    if caption_key is not None and table.data.column(caption_key).null_count:
        raise DataError(f"data.caption_key: {table.data.column(caption_key).null_count} rows have no caption in '{caption_key}'")
    labels, names = _labels(table, params.label_key, reader.where) if params.label_key else (None, [])
    rows = split_rows(labels, len(table), fixed, params)
    return lazy_bundle(reader, rows, labels, names, params, ctx, kind=kind)  # type: ignore[arg-type]


def load_hf_dataset(params: HFDatasetParams, ctx: Any) -> Any:
    return hf_bundle(params, ctx, "labelled_images")


def load_hf_captions(params: HFCaptionsParams, ctx: Any) -> Any:
    return hf_bundle(params, ctx, "captioned_images")


@hookimpl
def adaptkit_data_sources() -> list[DataRecord]:
    return [
        DataRecord(
            name="hf_dataset",
            params=HFDatasetParams,
            factory=load_hf_dataset,
            summary="a Hugging Face datasets dataset on disk (save_to_disk folder or parquet) with image + class columns; "
            "needs pip install datasets",
            provides="labelled_images",
        ),
        DataRecord(
            name="hf_captions",
            params=HFCaptionsParams,
            factory=load_hf_captions,
            summary="a Hugging Face datasets dataset on disk with image + caption columns; needs pip install datasets",
            provides="captioned_images",
        ),
    ]
