"""Data source ``image_folder``: one sub-folder of images per class."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from adaptkit.hookspecs import hookimpl
from adaptkit.records import DataRecord
from adaptkit_plugins.data.image_params import ImageDataParams

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageFolderParams(ImageDataParams):
    """``root/<class>/<image>``; or ``root/train|val|test/<class>/<image>`` for fixed splits."""

    name: Literal["image_folder"] = "image_folder"
    root: str = Field(..., description="folder with one sub-folder per class (or train/val/test sub-folders)")
    resize: bool = Field(True, description="resize images to image_size; when false, a different size is an error")


def _class_dirs(root: Any) -> list[Any]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read(paths: list[Any], mode: str, size: tuple[int, int] | None, resize: bool) -> Any:
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    from adaptkit.errors import DataError

    arrays = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image = image.convert(mode)
                if size is not None and image.size != (size[1], size[0]):
                    if not resize:
                        raise DataError(f"data: {path} is {image.size[0]}x{image.size[1]}, expected {size[1]}x{size[0]} (set data.resize=true to resize)")
                    image = image.resize((size[1], size[0]), Image.BILINEAR)
                arrays.append(np.asarray(image, dtype=np.float32))
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"data: cannot read image {path}: {exc}") from None
    stacked = torch.from_numpy(np.stack(arrays))
    stacked = stacked.unsqueeze(1) if stacked.ndim == 3 else stacked.permute(0, 3, 1, 2)
    return stacked / 127.5 - 1.0


def load_image_folder(params: ImageFolderParams, ctx: Any) -> Any:
    from pathlib import Path

    import numpy as np
    import torch

    from adaptkit.data import DataBundle, DataInfo, TensorDataset
    from adaptkit.errors import DataError
    from adaptkit_plugins.data._images import few_shot, labelled_bundle, make_shift, target_geometry

    root = Path(params.root)
    if not root.is_dir():
        raise DataError(f"data.root: folder {root} not found")
    fixed = [root / s for s in ("train", "val", "test")]
    split_dirs = fixed if fixed[0].is_dir() else [root]
    class_names = [p.name for p in _class_dirs(split_dirs[0])]
    if len(class_names) < 2:
        raise DataError(f"data.root: {split_dirs[0]} needs at least two class sub-folders, found {len(class_names)}")

    def listing(folder: Path) -> tuple[list[Path], list[int]]:
        paths, labels = [], []
        for label, name in enumerate(class_names):
            sub = folder / name
            if not sub.is_dir():
                continue
            files = sorted(p for p in sub.rglob("*") if p.suffix.lower() in EXTENSIONS)
            paths += files
            labels += [label] * len(files)
        return paths, labels

    channels = params.channels or (getattr(ctx.backbone, "in_chans", None) if ctx.backbone is not None else None) or 3
    mode = "L" if channels == 1 else "RGB"
    size, channels = target_geometry(params, ctx, (0, 0), channels)
    size = size if size != (0, 0) else None
    if split_dirs is fixed:
        splits = []
        for folder in fixed:
            paths, labels = listing(folder) if folder.is_dir() else ([], [])
            images = _read(paths, mode, size, params.resize) if paths else torch.zeros(0, channels, *(size or (1, 1)))
            splits.append((images, np.asarray(labels, dtype=np.int64)))
        (train_x, train_y), (val_x, val_y), (test_x, test_y) = splits
        if len(train_y) == 0:
            raise DataError(f"data.root: {fixed[0]} holds no images")
        keep = few_shot(np.arange(len(train_y)), train_y, params.shots, params.split_seed)
        train_x, train_y = train_x[torch.as_tensor(keep)], train_y[keep]
        info = DataInfo(kind="labelled_images", num_classes=len(class_names), class_names=class_names,
                        image_size=tuple(train_x.shape[-2:]), channels=channels)
        augment = make_shift(params.shift, -1.0) if params.shift else None
        return DataBundle(
            info,
            TensorDataset(images=train_x, labels=torch.as_tensor(train_y)),
            TensorDataset(images=val_x, labels=torch.as_tensor(val_y)),
            TensorDataset(images=test_x, labels=torch.as_tensor(test_y)),
            augment=augment, augment_dims=2 if augment else 0,
        )
    paths, labels = listing(root)
    if not paths:
        raise DataError(f"data.root: no images ({', '.join(EXTENSIONS)}) under {root}")
    images = _read(paths, mode, size, params.resize)
    return labelled_bundle(images, np.asarray(labels), class_names, params, ctx, source_size=images.shape[-1])


@hookimpl
def adaptkit_data_sources() -> list[DataRecord]:
    return [
        DataRecord(
            name="image_folder",
            params=ImageFolderParams,
            factory=load_image_folder,
            summary="a folder per class (PNG/JPEG/...), or train/val/test folders; resized to the backbone's input",
            provides="labelled_images",
        )
    ]
