"""Checks the output-writing commands share: where they may write, and what they may read.

Nothing already saved is damaged by a command that fails or is pointed at the wrong
place: outputs that exist are refused unless ``--overwrite``, a run directory the
command reads is never written into, and directory outputs are written into a
staging folder beside the target and moved into place only once complete.
(Torch-free: imported by the command modules.)
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from adaptkit.errors import DataError, RunError
from adaptkit.spec import DEVICE_PATTERN, MAX_SEED
from adaptkit.rundir import RUN_FILES, RunDir, atomic_path, create_temp_dir

MAX_IMAGE_SIDE = 8192  # pixels of one written image: --scale beyond this is a typo, not a wish


def holds_run(directory: Path) -> bool:
    """True when ``directory`` looks like an adaptkit run (or run-shaped output) directory."""
    return directory.is_dir() and any((directory / marker).is_file() for marker in RUN_FILES)


def written_by_adaptkit(directory: Path) -> bool:
    """True only for a directory whose run.json adaptkit wrote: the one kind ``--overwrite`` replaces whole.

    Stricter than :func:`holds_run` on purpose: a user's folder that merely holds a file
    named ``spec.yaml`` is written into, never removed.
    """
    try:
        return RunDir.at(directory).read_marker() is not None
    except RunError:
        return False


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_sources_apart(out: str | Path, sources: Iterable[str | Path], flag: str) -> None:
    """Refuse an output that is, contains or lies inside one of the runs or files a command reads."""
    target = _resolved(out)
    for source in sources:
        src = _resolved(source)
        src_dir = src if src.is_dir() else src.parent
        if _overlaps(target, src_dir) and (src.is_dir() or target == src or src.parent == target):
            raise RunError(
                f"{flag} {out}: that is where the input {source} lives; writing there would change the run being read. "
                "Choose another directory"
            )


def check_device(device: str, flag: str = "--device") -> None:
    if not DEVICE_PATTERN.match(str(device)):
        raise RunError(f"{flag} {device!r}: expected auto, cpu, cuda, cuda:N or mps")


def check_seed(seed: int, flag: str = "--seed") -> None:
    if not 0 <= seed <= MAX_SEED:
        raise RunError(f"{flag} must be >= 0 and < 2**63, got {seed}")


def check_finite(value: float | None, flag: str, low: float | None = None, high: float | None = None) -> None:
    """A number from the command line: finite, and within [low, high] where given."""
    if value is None:
        return
    if not math.isfinite(value):
        raise RunError(f"{flag} must be a finite number, got {value}")
    if low is not None and value < low or high is not None and value > high:
        bounds = f"between {low:g} and {high:g}" if low is not None and high is not None else (
            f"at least {low:g}" if low is not None else f"at most {high:g}")
        raise RunError(f"{flag} must be {bounds}, got {value:g}")


def check_png_outputs(out: str | Path, flag: str, overwrite: bool, beside: Iterable[Path] = (), folder: Path | None = None,
                      sources: Iterable[str | Path] = ()) -> Path:
    """Validate a PNG output (and the files written beside it, and a folder of single images).

    Existing files are refused unless ``overwrite``; a folder that holds a run is refused
    always (``--out runs/x.png`` would spill the images into the run ``runs/x``).
    """
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise RunError(f"{flag} {out}: images are written as PNG; give a path ending in .png")
    for parent in [out.parent, *out.parent.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise RunError(f"{flag} {out}: {parent} is a file, not a directory")
            break
    inputs = {_resolved(s) for s in sources}
    for written in [out, *beside]:
        if _resolved(written) in inputs:
            raise RunError(f"{flag} {out}: {written} is one of this command's inputs; choose another path")
    if folder is not None:
        if folder.exists() and not folder.is_dir():
            raise RunError(f"{flag} {out}: the single images go into {folder}/, but {folder} is a file")
        if holds_run(folder):
            raise RunError(f"{flag} {out}: the single images would go into {folder}/, which holds an adaptkit run; choose another name")
    existing = [p for p in [out, *beside] if p.exists()]
    if folder is not None and folder.is_dir() and any(folder.iterdir()):
        existing.append(folder)
    for path in existing:
        if path.is_dir() and path != folder:
            raise RunError(f"{flag} {out}: {path} is a directory")
    if existing and not overwrite:
        raise RunError(f"{flag} {out}: {', '.join(str(p) for p in existing)} already exist(s); pass --overwrite to replace, or choose another path")
    return out


def atomic_png(save: object, path: Path, *args: object, **kwargs: object) -> Path:
    """Call ``save(images, tmp_path, ...)`` and rename the result over ``path`` (never a half-written PNG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, ".png") as tmp:
        save(*args[:1], Path(tmp), *args[1:], **kwargs)  # type: ignore[operator]
    return path


def check_output_dir(out: str | Path, flag: str, overwrite: bool, sources: Iterable[str | Path] = ()) -> Path:
    """Validate a directory output: not a file, not an input, empty unless ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunError(f"{flag} {out}: exists and is not a directory")
    check_sources_apart(out, sources, flag)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        what = "holds an adaptkit run" if holds_run(out) else "is not empty"
        raise RunError(f"{flag} {out} {what}; pass --overwrite to replace it, or choose another directory")
    return out


@contextmanager
def staged_output(out: str | Path, flag: str, overwrite: bool, sources: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a staging directory beside ``out``; move its contents into ``out`` only if the body succeeds.

    A failure leaves ``out`` exactly as it was. With ``overwrite``, a run directory adaptkit
    wrote (:func:`written_by_adaptkit`) is replaced as a whole (no stale metrics of the old
    run stay behind); any other directory keeps its unrelated files and gets the new ones.
    """
    out = check_output_dir(out, flag, overwrite, sources)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = create_temp_dir(out.parent, f".{out.name}.partial-")
    try:
        yield staging
        if out.is_dir() and written_by_adaptkit(out):
            old = create_temp_dir(out.parent, f".{out.name}.old-")
            os.replace(out, old / "run")
            os.replace(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        elif not out.exists() or (out.is_dir() and not any(out.iterdir())):
            if out.exists():
                out.rmdir()
            os.replace(staging, out)
        else:
            for entry in staging.iterdir():
                target = out / entry.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                os.replace(entry, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


# ------------------------------------------------------------------------ images
HIGH_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def check_image_file(path: str | Path, flag: str, channels: int | None, size: tuple[int, int] | None) -> str | None:
    """Open an input image and refuse what the model cannot take faithfully.

    Refused: a missing or unreadable file, 16-bit / float images (converting them to
    8 bits clips them), transparency (dropping alpha changes the picture), and a shape
    whose aspect ratio differs from the model's (resizing would distort it). Returns a
    note when the image will be resized or converted, or None.
    """
    from adaptkit.images import open_image

    path = Path(path)
    if not path.exists():
        raise DataError(f"{flag} {path}: file not found")
    if not path.is_file():
        raise DataError(f"{flag} {path}: not a file")
    image = open_image(path, flag)
    mode, (width, height) = image.mode, image.size
    alpha = None
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        alpha = image.convert("RGBA").getchannel("A").getextrema()
    if mode in HIGH_BIT_MODES:
        raise DataError(f"{flag} {path}: a {mode} (16-bit or float) image; save it as 8-bit grayscale or RGB")
    if alpha is not None and alpha[0] < 255:
        raise DataError(f"{flag} {path}: the image has transparent pixels; flatten it onto a background first")
    notes = []
    if size is not None:
        want_h, want_w = size
        if abs(width * want_h - height * want_w) > max(want_h, want_w, 1) * max(width, height) / 100:
            raise DataError(
                f"{flag} {path}: the image is {width}x{height} but the model takes {want_w}x{want_h} images; "
                "crop it to that aspect ratio first (resizing would distort it)"
            )
        if (width, height) != (want_w, want_h):
            notes.append(f"resized {width}x{height} -> {want_w}x{want_h}")
    if channels is not None:
        target = "L" if channels == 1 else "RGB"
        if mode not in (target, "1" if target == "L" else target):
            notes.append(f"converted {mode} -> {target}")
    return f"{flag} {path}: {', '.join(notes)}" if notes else None
