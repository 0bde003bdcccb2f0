"""Reading images safely, and writing generated ones: PNG grids and single files.

Torch and Pillow are imported when a function needs them (the command modules that
only check an input image stay torch-free).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptkit.errors import DataError

if TYPE_CHECKING:
    import torch


class UnreadableImage(Exception):
    """Pillow could not decode an image: ``cause`` is its exception, ``bomb`` whether it was the
    decompression-bomb guard. :func:`decode_image` raises it; callers word it for their users."""

    def __init__(self, cause: BaseException, bomb: bool) -> None:
        super().__init__(str(cause))
        self.cause, self.bomb = cause, bomb


def decode_image(source: Any) -> Any:
    """Open and fully decode an image (a path or a binary file object), so a truncated file fails
    here and not later. Every way Pillow fails becomes an :class:`UnreadableImage`, including an
    image over its decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``; a small file that
    decodes to gigabytes): both its ``DecompressionBombError`` and its ``DecompressionBombWarning``.
    """
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(source)
            image.load()
            return image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UnreadableImage(exc, bomb=True) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # Pillow's ways of saying "not an image" / "truncated"
        raise UnreadableImage(exc, bomb=False) from None


def open_image(path: str | Path, where: str = "data") -> Any:
    """Open and decode an image file, or raise a :class:`DataError` naming ``where`` and the file.

    Refused: what :func:`decode_image` refuses (a file Pillow cannot read, a truncated one, one
    over the decompression-bomb limit), so a data source may skip such a file under its ``on_error``.

    Example::

        image = open_image("photos/cat/001.jpg", "data.root")   # a loaded PIL.Image
    """
    from PIL import Image

    path = Path(path)
    if not path.exists():
        raise DataError(f"{where} {path}: file not found")
    try:
        with decode_image(path) as image:
            return image.copy()  # decoded, and the file closed
    except UnreadableImage as exc:
        if exc.bomb:
            raise DataError(
                f"{where} {path}: the image is larger than Pillow's decompression-bomb limit "
                f"({Image.MAX_IMAGE_PIXELS:,} pixels; {_first_line(exc.cause)}); shrink it, or remove it from the data"
            ) from None
        raise DataError(f"{where} {path}: cannot read the image ({_first_line(exc.cause)})") from None


def image_tensor(path: str | Path, channels: int, size: int | tuple[int, int] | None, where: str = "data",
                 resample: str = "bilinear") -> torch.Tensor:
    """One image file as a (channels, H, W) float tensor in [-1, 1] (adaptkit's pixel convention),
    converted to grey or RGB and resized to ``size`` (H, W) with Pillow's ``resample`` filter.
    The one reader of single image files given by hand (``classify``, ``generate --image``,
    ``edit --image``); errors are :func:`open_image`'s.

    Example::

        image_tensor("cat.png", 3, (224, 224), "--image")   # tensor (3, 224, 224)
    """
    import numpy as np
    import torch
    from PIL import Image

    image = open_image(path, where).convert("L" if channels == 1 else "RGB")
    if size is not None:
        height, width = (size, size) if isinstance(size, int) else size
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling[resample.upper()])
    array = torch.from_numpy(np.asarray(image, dtype=np.float32))
    array = array[None] if array.ndim == 2 else array.permute(2, 0, 1)
    return array / 127.5 - 1.0


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:160] if lines else type(exc).__name__


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8 in [0, 255]."""
    import torch

    scaled = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return scaled.permute(0, 2, 3, 1)


def default_scale(height: int) -> int:
    """Nearest-neighbour enlargement that makes a tiny image at least 64 pixels high."""
    return max(1, -(-64 // max(1, height)))


def _pil(array: torch.Tensor, scale: int):  # (H, W, C) uint8
    from PIL import Image

    channels = array.shape[-1]
    data = array[..., 0].numpy() if channels == 1 else array.numpy()
    image = Image.fromarray(data)  # 2-D uint8 -> "L", (H, W, 3) -> "RGB"
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    return image


def save_grid(images: torch.Tensor, path: str | Path, columns: int, scale: int | None = None, padding: int = 2) -> Path:
    """Save (N, C, H, W) images in [-1, 1] as one PNG, ``columns`` per row, on a white background."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = to_uint8(images)
    n, height, width, channels = arrays.shape
    scale = scale or default_scale(height)
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    cell_h, cell_w = height * scale, width * scale
    grid = Image.new("L" if channels == 1 else "RGB", (columns * (cell_w + padding) + padding, rows * (cell_h + padding) + padding), 255)
    for index in range(n):
        row, column = divmod(index, columns)
        grid.paste(_pil(arrays[index], scale), (padding + column * (cell_w + padding), padding + row * (cell_h + padding)))
    grid.save(path)
    return path


def save_images(images: torch.Tensor, folder: str | Path, scale: int | None = None, stem: str = "") -> list[Path]:
    """Save each image as ``folder/<stem>NNN.png``; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = to_uint8(images)
    scale = scale or default_scale(arrays.shape[1])
    paths = []
    for index in range(arrays.shape[0]):
        target = folder / f"{stem}{index:03d}.png"
        _pil(arrays[index], scale).save(target)
        paths.append(target)
    return paths
