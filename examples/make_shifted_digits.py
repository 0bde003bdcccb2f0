"""Write scikit-learn's digits as PNG folders seen through a shifted "scanner".

    python examples/make_shifted_digits.py inverted        # -> runs/digits_inverted/{train,val,test}/<word>/*.png
    python examples/make_shifted_digits.py noisy --out /tmp

Shifts: ``clean`` (as they are), ``inverted`` (white ink on black becomes black on white),
``noisy`` (Gaussian noise, sigma 1 on the [-1, 1] scale). The split is the stratified
70/15/15 split (seed 0) the ``digits`` data source uses; folders are named by digit word
("seven"), so ``image_folder`` data gives CLIP's zero-shot task those words as class names.
"""

from __future__ import annotations

import argparse
from pathlib import Path

SHIFTS = ("clean", "inverted", "noisy")


def write_shifted_digits(root: str | Path, shift: str) -> Path:
    """Write the folders under ``root/digits_<shift>`` (once) and return that folder."""
    import numpy as np
    import torch
    from PIL import Image

    from adaptkit_plugins.data.image_samples import stratified_split
    from adaptkit_plugins.data.digits import load_digit_images
    from adaptkit_plugins.clip.digits_captions import DIGIT_WORDS

    if shift not in SHIFTS:
        raise ValueError(f"shift must be one of {', '.join(SHIFTS)}")
    folder = Path(root) / f"digits_{shift}"
    if (folder / "test").is_dir():
        return folder
    images, labels, _ = load_digit_images(None)
    if shift == "noisy":
        images = (images + torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    elif shift == "inverted":
        images = -images
    pixels = ((images[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    for split, index in zip(("train", "val", "test"), stratified_split(labels, (0.7, 0.15, 0.15), 0)):
        for i in index.tolist():
            target = folder / split / DIGIT_WORDS[labels[i]]
            target.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(pixels[i])).save(target / f"{i}.png")
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shift", choices=SHIFTS)
    parser.add_argument("--out", default="runs", help="parent folder (default: runs)")
    args = parser.parse_args()
    print(write_shifted_digits(args.out, args.shift))
