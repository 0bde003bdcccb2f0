"""Tar shards in the webdataset layout, read by random access (imports numpy).

A sample is the tar members that share a key (``train/0001.jpg``, ``train/0001.cls``,
``train/0001.txt``: key ``train/0001``), as webdataset's ``TarWriter`` and open_clip's
tools write them. Each shard is indexed once, in memory, by walking its member headers:
per sample the byte offset and size of its image (and caption) member, and its label.
A sample is then one seek and read in whichever process needs it, so the trainer's plan
(per-sample shuffling, DDP sharding, mid-epoch resume) applies to shards exactly as to
image files. The index costs about 50 bytes per sample; nothing is written to disk.
Python's tarfile parses some 10k member headers a second, so a run with many shards
indexes them in a pool of processes.
"""

from __future__ import annotations

import glob
import io
import os
import re
import tarfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from adaptkit.data import DataBundle
from adaptkit.errors import DataError
from adaptkit_plugins.data.image_samples import SampleError, SampleReader, decode, few_shot, lazy_bundle, stratified_split

#: webdataset's rule: the key is the path up to the first dot of the file name, the extension the rest
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
#: open shard files kept per process (a run over more shards opens and closes as it goes)
MAX_OPEN_SHARDS = 64
_NONE = -1


# ----------------------------------------------------------------- shard names
def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion, as the ``braceexpand`` package does it.

    Example: ``expand_braces("train-{000..002}-{a,b}.tar")`` gives ``train-000-a.tar``,
    ``train-000-b.tar``, ..., ``train-002-b.tar``. A group without ``..`` or a comma stays as it is.
    """
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth = 0
    for end in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[end], 0)
        if depth == 0:
            break
    else:
        return [pattern]  # unbalanced: literal
    head, body, tail = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    numbers = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if numbers:
        low, high = numbers.groups()
        padded = any(len(v.lstrip("-")) > 1 and v.lstrip("-").startswith("0") for v in (low, high))
        width = max(len(low), len(high)) if padded else 0
        step = 1 if int(high) >= int(low) else -1
        choices = [str(v).zfill(width) for v in range(int(low), int(high) + step, step)]
    else:
        choices, depth, part = [], 0, ""
        for char in body:
            depth += {"{": 1, "}": -1}.get(char, 0)
            if char == "," and depth == 0:
                choices.append(part)
                part = ""
            else:
                part += char
        choices.append(part)
        if len(choices) == 1:
            return [head + "{" + body + "}" + rest for rest in expand_braces(tail)]
    return [head + expanded for choice in choices for expanded in expand_braces(choice + tail)]


def _expand(pattern: str) -> list[str]:
    try:
        from braceexpand import braceexpand
    except ImportError:
        return expand_braces(pattern)
    return list(braceexpand(pattern))


def shard_paths(spec: str | Sequence[str], field: str) -> list[str]:
    """The shard files a spec names: brace patterns (``train-{000000..000127}.tar``), globs
    (``shards/*.tar``) or a list of either; an error names a file that is not there."""
    paths: list[str] = []
    for item in [spec] if isinstance(spec, str) else spec:
        for name in _expand(os.path.expanduser(item)):
            if any(char in name for char in "*?["):
                found = sorted(glob.glob(name))
                if not found:
                    raise DataError(f"data.{field}: no files match {name}")
                paths += found
            else:
                paths.append(name)
    if not paths:
        raise DataError(f"data.{field}: names no shards")
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"data.{field}: shard {path} not found" + (f" (one of {len(paths)} from {spec})" if len(paths) > 1 else ""))
    return paths


# ----------------------------------------------------------------- the index
@dataclass(frozen=True)
class Layout:
    """Which member extensions hold a sample's image, label and caption."""

    image_ext: tuple[str, ...]
    label_ext: str | None
    caption_ext: str | None


@dataclass(frozen=True)
class ShardIndex:
    """One shard's samples, in the order of their first member: byte ranges and labels
    (:data:`_NONE` where a sample has no such member). ``header`` is the offset of the image
    member's header, which names the sample in messages."""

    image_offset: np.ndarray
    image_size: np.ndarray
    header: np.ndarray
    label: np.ndarray
    caption_offset: np.ndarray
    caption_size: np.ndarray

    def __len__(self) -> int:
        return len(self.image_offset)


_INDEXES: dict[tuple[Any, ...], ShardIndex] = {}
#: processes that index shards at the start of a run (tarfile parses headers in Python: ~10k members/s per core)
MAX_INDEXERS = 16


def _cache_key(path: str, layout: Layout) -> tuple[Any, ...]:
    stat = os.stat(path)
    return (os.path.realpath(path), stat.st_size, stat.st_mtime_ns, layout)


def index_shards(paths: Sequence[str], layout: Layout) -> list[ShardIndex]:
    """The index of each shard, built on first use and kept in memory for this process
    (keyed by the file's path, size and modification time); several shards are indexed
    by a pool of processes."""
    keys = [_cache_key(path, layout) for path in paths]
    todo = list(dict.fromkeys(path for path, key in zip(paths, keys) if key not in _INDEXES))
    processes = min(len(todo), os.cpu_count() or 1, MAX_INDEXERS)
    if processes > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else None)
        with ProcessPoolExecutor(processes, mp_context=context) as pool:
            built = list(pool.map(_walk, todo, [layout] * len(todo)))
    else:
        built = [_walk(path, layout) for path in todo]
    _INDEXES.update({_cache_key(path, layout): index for path, index in zip(todo, built)})
    return [_INDEXES[key] for key in keys]


def _walk(path: str, layout: Layout) -> ShardIndex:
    """Walk the member headers (a shard's TarInfo list is held while it is walked, then dropped)."""
    samples: dict[str, list[int]] = {}  # key -> [image rank, offset, size, header, label, caption offset, caption size]
    others: dict[str, str] = {}  # a member name of each key seen (for keys without an image)
    try:
        tar = tarfile.open(path, "r:")
    except tarfile.ReadError as exc:
        raise DataError(f"data: {path} is not an uncompressed tar file ({exc}); shards must be plain .tar files") from None
    except OSError as exc:
        raise DataError(f"data: cannot open {path}: {exc}") from None
    with tar:
        while True:
            try:
                member = tar.next()
            except tarfile.ReadError:
                break  # the file ends inside a member's data: the samples read so far stay; that member fails when read
            if member is None:
                break
            parts = _KEY_EXT.match(member.name)
            if not member.isfile() or parts is None:
                continue
            name, ext = parts.group(1), parts.group(2).lower()
            others.setdefault(name, member.name)
            entry = samples.setdefault(name, [len(layout.image_ext), _NONE, _NONE, _NONE, _NONE, _NONE, _NONE])
            if ext in layout.image_ext:
                rank = layout.image_ext.index(ext)
                if rank == entry[0]:
                    raise DataError(f"data: {path} holds {member.name} twice; keys must be unique within a shard")
                if rank < entry[0]:
                    entry[:4] = [rank, member.offset_data, member.size, member.offset]
            elif ext == layout.label_ext:
                entry[4] = _read_label(tar, member, path)
            elif ext == layout.caption_ext:
                entry[5:7] = [member.offset_data, member.size]
    kept = [entry for entry in samples.values() if entry[1] != _NONE]
    if not kept:
        raise DataError(f"data: {path} holds no images ({', '.join('.' + e for e in layout.image_ext)}); "
                        "is it a webdataset shard? set data.image_ext for other extensions")
    if len(kept) < len(samples):
        lone = next(others[name] for name, entry in samples.items() if entry[1] == _NONE)
        raise DataError(f"data: {path}: sample {_KEY_EXT.match(lone).group(1)} has no image member ({lone}); "
                        f"images are .{', .'.join(layout.image_ext)} (set data.image_ext)")
    table = np.asarray(kept, dtype=np.int64)
    return ShardIndex(*(np.ascontiguousarray(table[:, column]) for column in range(1, 7)))


def _read_label(tar: tarfile.TarFile, member: tarfile.TarInfo, path: str) -> int:
    data = tar.extractfile(member).read()  # type: ignore[union-attr]
    if len(data) < member.size:
        return _NONE  # cut off by the end of the file: the sample counts as unlabelled
    text = data.decode("utf-8", "replace").strip()
    if not re.fullmatch(r"\d+", text):
        raise DataError(f"data: {path}: {member.name} holds {text[:40]!r}, not a class number (0, 1, 2, ...)")
    return int(text)


# ----------------------------------------------------------------- reading
class ShardReader(SampleReader):
    """The samples of several shards by index: a seek and a read of the member's bytes
    from a file each process opens for itself (see :class:`SampleReader`)."""

    def __init__(self, paths: list[str], shard: np.ndarray, index: ShardIndex) -> None:
        self.paths, self.shard, self.index = paths, shard, index
        self._files: OrderedDict[int, Any] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.shard)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_files": OrderedDict()}

    def _file(self, shard: int) -> Any:
        if self._pid != os.getpid():  # forked: the parent's handles share its file positions
            self._files, self._pid = OrderedDict(), os.getpid()
        if shard in self._files:
            self._files.move_to_end(shard)
        else:
            if len(self._files) >= MAX_OPEN_SHARDS:
                self._files.popitem(last=False)[1].close()
            self._files[shard] = open(self.paths[shard], "rb")
        return self._files[shard]

    def _read(self, i: int, offset: int, size: int, what: str) -> bytes:
        try:
            handle = self._file(int(self.shard[i]))
            handle.seek(offset)
            data = handle.read(size)
        except OSError as exc:
            raise SampleError(f"{self.where(i)}: cannot read the {what} ({exc})") from None
        if len(data) < size:
            raise SampleError(f"{self.where(i)}: the {what} is cut off ({len(data)} of {size} bytes; the shard is truncated)")
        return data

    def image(self, i: int) -> Any:
        data = self._read(i, int(self.index.image_offset[i]), int(self.index.image_size[i]), "image")
        try:
            return decode(io.BytesIO(data), "")
        except SampleError as error:  # named here, where reading the name costs a header read only on failure
            raise SampleError(f"{self.where(i)}{error}") from None

    def text(self, i: int) -> str:
        data = self._read(i, int(self.index.caption_offset[i]), int(self.index.caption_size[i]), "caption")
        return data.decode("utf-8", "replace").strip()

    def where(self, i: int) -> str:
        path, header = self.paths[int(self.shard[i])], int(self.index.header[i])
        try:
            with tarfile.open(path, "r:") as tar:
                tar.fileobj.seek(header)  # type: ignore[union-attr]
                name = tarfile.TarInfo.fromtarfile(tar).name
        except (OSError, tarfile.TarError):
            return f"{path} (member at byte {header})"
        return f"{path}: sample {_KEY_EXT.match(name).group(1) if _KEY_EXT.match(name) else name}"


def read_shards(paths: list[str], layout: Layout) -> ShardReader:
    """Index ``paths`` (each once per process) into one reader."""
    indexes = index_shards(paths, layout)
    shard = np.concatenate([np.full(len(index), number, dtype=np.int32) for number, index in enumerate(indexes)])
    columns = (np.concatenate([getattr(index, f) for index in indexes]) for f in ShardIndex.__dataclass_fields__)
    return ShardReader(paths, shard, ShardIndex(*columns))


# ----------------------------------------------------------------- the bundle
def split_rows(
    labels: np.ndarray | None, total: int, fixed: tuple[int, int, int] | None, params: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of the train/val/test splits: ``fixed`` sizes of consecutive train, val and test
    rows as they are; else the training rows split by ``data.split`` (stratified by class
    where there are labels, seeded either way); then ``data.shots`` per class."""
    if fixed is None:
        train, val, test = stratified_split(labels if labels is not None else np.zeros(total, dtype=np.int64), params.split, params.split_seed)
    else:
        bounds = np.cumsum((0, *fixed))
        train, val, test = (np.arange(bounds[k], bounds[k + 1]) for k in range(3))
    if params.shots is not None:
        if labels is None:
            raise DataError("data.shots: few-shot sampling needs class labels")
        train = few_shot(train, labels, params.shots, params.split_seed)
    return train, val, test


def class_names_for(labels: np.ndarray, classes: list[str] | None, where: Any) -> list[str]:
    """``classes`` when given (every label must index it), else ``"0" ... str(max label)``;
    ``where(row)`` names the sample of an out-of-range label."""
    if classes is None:
        return [str(c) for c in range(int(labels.max()) + 1)] if len(labels) else []
    outside = np.flatnonzero(labels >= len(classes))
    if len(outside):
        row = int(outside[0])
        raise DataError(f"data.classes: {where(row)} has label {int(labels[row])}, but data.classes names {len(classes)} classes")
    return list(classes)


def shards_bundle(params: Any, ctx: Any, kind: str) -> DataBundle:
    """A :class:`DataBundle` of webdataset shards (``kind``: labelled or captioned images)."""
    captioned = kind == "captioned_images"
    layout = Layout(tuple(params.image_ext), params.label_ext, params.caption_ext if captioned else None)
    parts = [shard_paths(params.train, "train")]
    given = params.val is not None or params.test is not None
    parts += [shard_paths(spec, field) if spec is not None else [] for field, spec in (("val", params.val), ("test", params.test))]
    reader = read_shards([path for part in parts for path in part], layout)
    counts = np.bincount(reader.shard, minlength=sum(map(len, parts)))
    bounds = np.cumsum([0] + [len(part) for part in parts])
    fixed = tuple(int(counts[bounds[k] : bounds[k + 1]].sum()) for k in range(3)) if given else None

    labels: np.ndarray | None = reader.index.label
    unlabelled = np.flatnonzero(labels == _NONE)
    if captioned:
        uncaptioned = np.flatnonzero(reader.index.caption_offset == _NONE)
        if len(uncaptioned):
            raise DataError(f"data: {reader.where(int(uncaptioned[0]))} has no .{params.caption_ext} caption member "
                            f"({len(uncaptioned)} of {len(reader)} samples lack one)")
        if len(unlabelled) == len(reader) or params.label_ext is None:
            labels = None
    if labels is not None and len(unlabelled):
        raise DataError(f"data: {reader.where(int(unlabelled[0]))} has no .{params.label_ext} label member "
                        f"({len(unlabelled)} of {len(reader)} samples lack one)"
                        + ("; set data.label_ext: null to train on captions alone" if captioned else ""))
    names = class_names_for(labels, params.classes, reader.where) if labels is not None else []
    splits = split_rows(labels, len(reader), fixed, params)
    return lazy_bundle(reader, splits, labels, names, params, ctx, kind=kind)
