"""The base-weight fingerprint of a build, hashed once per weights file and then cached.

Adapter files record a fingerprint of the base weights they were trained on, so loading
one onto another base is a clear error. Hashing every weight costs seconds at full size
(a 3.4 GB Stable Diffusion UNet), so a build that read its base weights from local files
hashes them once: the fingerprint is cached under the files' path, size, inode and
modification time, with the backbone's params and the seed (which decide any weight the
files do not hold). A changed file is a new key, hashed afresh. Builds that read no local
file (random initialisation, hub downloads) hash the weights every time.

Weights reach a build through :func:`adaptkit.checkpoint.load_weights`, which reports
each file it reads here; a plugin that reads weights another way (a library's own
``from_pretrained``) calls :func:`note_weights_file` itself.

Example::

    with recording_weights_files() as files:
        backbone = make_backbone()              # reads model.safetensors
    base_fingerprint(backbone, files, key="...")  # hashed once, then read from the cache
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptkit.rundir import write_text


@dataclass
class WeightsRead:
    """The weights files a backbone's build read, and the floating-point dtypes they store."""

    files: list[Path] = field(default_factory=list)
    dtypes: set[Any] = field(default_factory=set)

    def stored_dtype(self) -> Any:
        """The one floating-point dtype the files store (torch.float16 for an fp16 checkpoint), else None."""
        return next(iter(self.dtypes)) if len(self.dtypes) == 1 else None


#: what the current backbone's build has read (None outside a build)
_READ: ContextVar[WeightsRead | None] = ContextVar("adaptkit_weights_files", default=None)
#: entries kept in the cache file; the oldest go first
MAX_ENTRIES = 512
CACHE_FILE = "base_fingerprints.json"


@contextmanager
def recording_weights_files() -> Iterator[WeightsRead]:
    """Collect the weights files read (via :func:`note_weights_file`) inside the block."""
    read = WeightsRead()
    token = _READ.set(read)
    try:
        yield read
    finally:
        _READ.reset(token)


def note_weights_file(path: str | Path, dtypes: Iterable[Any] = ()) -> None:
    """Report that the backbone being built read weights from ``path``, stored in the floating-point
    ``dtypes`` (a no-op outside a build)."""
    read = _READ.get()
    if read is not None:
        resolved = Path(path).resolve()
        if resolved not in read.files:
            read.files.append(resolved)
        read.dtypes.update(dtypes)


def safetensors_dtypes(path: str | Path) -> set[Any]:
    """The floating-point dtypes a safetensors file stores, from its header alone (nothing is loaded)."""
    import torch
    from safetensors import safe_open

    names = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
    with safe_open(str(path), framework="pt") as handle:
        return {names[d] for d in (handle.get_slice(k).get_dtype() for k in handle.keys()) if d in names}


def cache_dir() -> Path:
    """``$ADAPTKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/adaptkit``, else ``~/.cache/adaptkit``."""
    if os.environ.get("ADAPTKIT_CACHE_DIR"):
        return Path(os.environ["ADAPTKIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "adaptkit"


def file_key(files: list[Path], key: str) -> str:
    """The cache key of base weights read from ``files`` (path, size, inode, mtime of each) under ``key``."""
    from adaptkit import __version__

    stats = []
    for path in files:
        st = path.stat()
        stats.append([str(path), st.st_size, st.st_ino, st.st_mtime_ns])
    text = json.dumps({"files": stats, "key": key, "adaptkit": __version__}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def base_fingerprint(backbone: Any, files: list[Path], key: str) -> str:
    """The fingerprint of ``backbone.base_state_dict()``: from the cache when ``files`` (the
    weights files it was read from) are unchanged since it was hashed, else hashed and cached.
    ``key`` holds whatever else decides the weights (the backbone's params, the seed)."""
    from adaptkit.checkpoint import fingerprint

    if not files:
        return fingerprint(_base_state(backbone))
    try:
        entry = file_key(files, key)
    except OSError:  # a file vanished after loading: nothing to key on
        return fingerprint(_base_state(backbone))
    path = cache_dir() / CACHE_FILE
    cache = _read_cache(path)
    if entry in cache:
        return cache[entry]
    value = fingerprint(_base_state(backbone))
    cache.pop(entry, None)
    cache[entry] = value
    _write_cache(path, dict(list(cache.items())[-MAX_ENTRIES:]))
    return value


#: the weights files found finite (no NaN, no infinity), by :func:`file_key`
FINITE_FILE = "finite_weights.json"


def known_finite(path: str | Path) -> bool:
    """Whether the weights file at ``path``, unchanged since (path, size, inode, mtime), was found finite."""
    try:
        entry = file_key([Path(path)], "finite")
    except OSError:
        return False
    return entry in _read_cache(cache_dir() / FINITE_FILE)


def note_finite(path: str | Path) -> None:
    """Remember that the weights file at ``path`` holds only finite values (its next loads skip the check)."""
    try:
        entry = file_key([Path(path)], "finite")
    except OSError:
        return
    cache_path = cache_dir() / FINITE_FILE
    cache = _read_cache(cache_path)
    cache.pop(entry, None)
    cache[entry] = "finite"
    _write_cache(cache_path, dict(list(cache.items())[-MAX_ENTRIES:]))


def _base_state(backbone: Any) -> Any:
    """The backbone's base weights; those still on the meta device are read from their files one at a time."""
    from adaptkit.deferred import WholeValues, is_deferred

    state = backbone.base_state_dict()
    return WholeValues(state, backbone) if is_deferred(backbone) else state


def _read_cache(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}


def _write_cache(path: Path, cache: dict[str, str]) -> None:
    """Write atomically; a cache that cannot be written only costs the next build a hash."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(cache))
    except OSError:
        pass
