"""Writing generated images: grids and labelled strips as PNG (imports torch, PIL, matplotlib)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) images in [-1, 1] -> (N, H, W, C) uint8 (grayscale repeated to RGB)."""
    images = images.detach().float().cpu().clamp(-1, 1)
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    return ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def grid(images: torch.Tensor, ncol: int, pad: int = 1, scale: int | None = None) -> torch.Tensor:
    """Tile (N, C, H, W) images into one (H', W', 3) uint8 picture, upscaled for small images."""
    pixels = to_uint8(images)
    n, h, w, _ = pixels.shape
    scale = scale or max(1, 48 // max(h, w))
    pixels = pixels.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    h, w = h * scale, w * scale
    nrow = (n + ncol - 1) // ncol
    canvas = torch.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = pixels[i]
    return canvas


def save_grid(images: torch.Tensor, path: str | Path, ncol: int = 8) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid(images, ncol).numpy()).save(path)
    return path


def save_strips(rows: Sequence[torch.Tensor], path: str | Path, column_titles: Sequence[str] = (),
                row_titles: Sequence[str] = (), title: str = "") -> Path:
    """A labelled table of images: ``rows[i]`` is (K, C, H, W), one image per column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow, ncol = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(nrow, ncol, figsize=(1.25 * ncol + (1.2 if row_titles else 0.2), 1.3 * nrow + 0.5), squeeze=False)
    for i, row in enumerate(rows):
        pixels = to_uint8(row)
        for j in range(ncol):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(pixels):
                ax.imshow(pixels[j].numpy(), interpolation="nearest")
            else:
                ax.axis("off")
            if i == 0 and j < len(column_titles):
                ax.set_title(column_titles[j], fontsize=8)
            if j == 0 and i < len(row_titles):
                ax.set_ylabel(row_titles[i], fontsize=8, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
