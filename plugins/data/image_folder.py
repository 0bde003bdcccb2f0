"""Data source ``image_folder``: one sub-folder of images per class."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from adaptkit.hookspecs import hookimpl
from adaptkit.records import DataRecord
from adaptkit_plugins.data.image_params import ImageDataParams

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageFolderParams(ImageDataParams):
    """``root/<class>/<image>``; or ``root/train|val|test/<class>/<image>`` for fixed splits.

    Images are listed, not read, when the run starts; loader workers decode them batch by
    batch, so memory does not grow with the number of images.
    """

    name: Literal["image_folder"] = "image_folder"
    root: str = Field(..., description="folder with one sub-folder per class (or train/val/test sub-folders)")
    resize: bool = Field(True, description="resize images to the input size; when false, an image of another size is an error")


def _class_dirs(root: Any) -> list[Any]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_images(folder: Any) -> list[str]:
    """Image files under ``folder`` (recursively, sorted; names only: nothing is opened)."""
    import os

    found = []
    for base, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(base, f) for f in files if os.path.splitext(f)[1].lower() in EXTENSIONS and not f.startswith(".")]
    return sorted(found)


class FileReader:
    """Image files by index (see :class:`adaptkit_plugins.data.image_samples.SampleReader`)."""

    def __init__(self, paths: list[str], expect_size: tuple[int, int] | None = None) -> None:
        self.paths, self.expect_size = paths, expect_size

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, i: int) -> Any:
        from adaptkit_plugins.data.image_samples import decode

        path = self.paths[i]
        image = decode(path, path)
        if self.expect_size is not None and image.size != (self.expect_size[1], self.expect_size[0]):
            from adaptkit.errors import DataError

            h, w = self.expect_size
            raise DataError(f"data: {path} is {image.size[0]}x{image.size[1]}, expected {w}x{h} (set data.resize=true to resize)")
        return image

    def where(self, i: int) -> str:
        return self.paths[i]


def load_image_folder(params: ImageFolderParams, ctx: Any) -> Any:
    from pathlib import Path

    import numpy as np

    from adaptkit.errors import DataError
    from adaptkit_plugins.data.image_samples import few_shot, input_config, lazy_bundle, stratified_split

    root = Path(params.root)
    if not root.is_dir():
        raise DataError(f"data.root: folder {root} not found")
    fixed = [root / s for s in ("train", "val", "test")]
    split_dirs = fixed if fixed[0].is_dir() else [root]
    class_names = [p.name for p in _class_dirs(split_dirs[0])]
    if len(class_names) < 2:
        raise DataError(f"data.root: {split_dirs[0]} needs at least two class sub-folders, found {len(class_names)}")

    def listing(folder: Path, required: bool) -> tuple[list[str], list[int]]:
        paths: list[str] = []
        labels: list[int] = []
        for label, name in enumerate(class_names):
            sub = folder / name
            files = list_images(sub) if sub.is_dir() else []
            if required and not files:
                raise DataError(f"data.root: class folder {sub} holds no images ({', '.join(EXTENSIONS)}); remove it or add images")
            paths += files
            labels += [label] * len(files)
        extra = sorted({p.name for p in _class_dirs(folder)} - set(class_names)) if folder.is_dir() else []
        if extra:
            raise DataError(f"data.root: {folder} has class folders that {split_dirs[0]} lacks: {', '.join(extra[:5])}")
        return paths, labels

    if split_dirs is fixed:
        parts = [listing(folder, required=folder == fixed[0]) if folder.is_dir() else ([], []) for folder in fixed]
        paths = [p for part, _ in parts for p in part]
        labels = np.asarray([y for _, part in parts for y in part], dtype=np.int64)
        bounds = np.cumsum([0] + [len(part) for part, _ in parts])
        train, val, test = (np.arange(bounds[i], bounds[i + 1]) for i in range(3))
    else:
        paths, label_list = listing(root, required=True)
        labels = np.asarray(label_list, dtype=np.int64)
        train, val, test = stratified_split(labels, params.split, params.split_seed)
    train = few_shot(train, labels, params.shots, params.split_seed)
    expect = None if params.resize else tuple(input_config(params, ctx).size)
    return lazy_bundle(FileReader(paths, expect), (train, val, test), labels, class_names, params, ctx)


@hookimpl
def adaptkit_data_sources() -> list[DataRecord]:
    return [
        DataRecord(
            name="image_folder",
            params=ImageFolderParams,
            factory=load_image_folder,
            summary="a folder per class (PNG/JPEG/...), or train/val/test folders; read lazily by data.workers, "
            "preprocessed as the backbone's checkpoint says; default augment: random-resized crop + flip",
            provides="labelled_images",
        )
    ]
