"""Write scikit-learn's digits as "real" data on disk: JPEG photos in class folders, and
captioned tar shards in the webdataset layout (as open_clip's training data comes).

    python examples/make_real_data.py            # -> runs/data/digits_photos/, runs/data/digits_shards/
    adaptkit run examples/vit_image_folder_randaugment.yaml
    adaptkit run examples/clip_caption_shards.yaml

Each digit is upscaled to 64x64, tinted with a random colour and given a little noise, then
saved as a JPEG (so decoding, resizing and augmentation do real work). The split is the
stratified 70/15/15 split (seed 0) that the ``digits`` source uses: photos go to
``train|val|test/<digit>/``; shards hold ``<key>.jpg``, ``<key>.cls`` (the digit) and
``<key>.txt`` (a caption such as "a photo of the digit seven").
"""

from __future__ import annotations

import argparse
import io
import tarfile
from pathlib import Path

SIZE = 64
PER_SHARD = 400


def _photos() -> tuple[list, list, tuple]:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    from adaptkit_plugins.data.image_samples import stratified_split

    digits = load_digits()
    rng = np.random.default_rng(0)
    photos = []
    for gray in digits.images / 16.0:
        big = np.asarray(Image.fromarray((gray * 255).astype("uint8")).resize((SIZE, SIZE), Image.BICUBIC), dtype=np.float32) / 255
        tint = rng.random(3) * 0.6 + 0.4
        rgb = big[..., None] * tint + rng.normal(0, 0.03, (SIZE, SIZE, 3))
        buffer = io.BytesIO()
        Image.fromarray((rgb.clip(0, 1) * 255).astype("uint8")).save(buffer, format="JPEG", quality=92)
        photos.append(buffer.getvalue())
    labels = digits.target
    return photos, labels.tolist(), stratified_split(labels, (0.7, 0.15, 0.15), 0)


def write_real_data(root: str | Path = "runs/data") -> tuple[Path, Path]:
    """Write (once) and return the photo folder and the shard folder under ``root``."""
    from adaptkit_plugins.clip.digits_captions import DIGIT_WORDS

    root = Path(root)
    folder, shards = root / "digits_photos", root / "digits_shards"
    if (folder / "test").is_dir() and (shards / "val-000000.tar").is_file():
        return folder, shards
    photos, labels, splits = _photos()
    shards.mkdir(parents=True, exist_ok=True)
    for split, index in zip(("train", "val", "test"), splits):
        for i in index.tolist():
            target = folder / split / str(labels[i])
            target.mkdir(parents=True, exist_ok=True)
            (target / f"{i:04d}.jpg").write_bytes(photos[i])
        if split == "test":
            continue
        rows = index.tolist()
        for s in range(0, len(rows), PER_SHARD):
            with tarfile.open(shards / f"{split}-{s // PER_SHARD:06d}.tar", "w") as tar:
                for i in rows[s : s + PER_SHARD]:
                    members = {"jpg": photos[i], "cls": str(labels[i]).encode(),
                               "txt": f"a photo of the digit {DIGIT_WORDS[labels[i]]}".encode()}
                    for ext, payload in members.items():
                        info = tarfile.TarInfo(f"{i:04d}.{ext}")
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
    return folder, shards


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/data", help="parent folder (default: runs/data)")
    args = parser.parse_args()
    for path in write_real_data(args.out):
        print(path)
