"""Writing generated images: PNG grids and single files (imports torch and Pillow)."""

from __future__ import annotations

from pathlib import Path

import torch


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8 in [0, 255]."""
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
