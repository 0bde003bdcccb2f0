"""safetensors checkpoints: adapter-only state, metadata, fingerprints, atomic writes.

An adapter file holds only what the methods (and the task's new modules) trained,
plus metadata: the spec, the adaptkit version, a fingerprint of the base weights (so
loading onto another base is a clear error) and a hash of the tensors (so a damaged
file is refused). No pickle anywhere: weights load through safetensors or
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaptkit.errors import CheckpointError
from adaptkit.rundir import atomic_path, file_mode

FORMAT = "adaptkit.adapter/1"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Exactly the tensors the methods train, by qualified name.

    Example::

        model = adaptkit.build(spec)
        state = adaptkit.trainable_state(model)   # {'backbone.net.blocks.0.attn.qkv.lora.a': ...}
    """
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def fingerprint(state: dict[str, torch.Tensor]) -> str:
    """A SHA-256 over names, dtypes, shapes and values of ``state`` (first 16 hex digits)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()[:16]


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.reshape(-1)
    if flat.dtype == torch.bfloat16:
        flat = flat.view(torch.int16)
    return flat.numpy().tobytes()


#: metadata keys holding hashes: the tensors alone (older files), and the tensors with the metadata
TENSORS_HASH, CONTENT_HASH = "adaptkit.tensors_sha256", "adaptkit.content_sha256"


def _content_hash(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """The tensors' fingerprint, and with ``metadata`` also every metadata entry but the hashes:
    the spec and the methods' parameters say what the tensors mean (LoRA's alpha scales them)."""
    if metadata is None:
        return fingerprint(tensors)
    described = {k: v for k, v in metadata.items() if k not in (TENSORS_HASH, CONTENT_HASH)}
    return hashlib.sha256((fingerprint(tensors) + json.dumps(described, sort_keys=True)).encode()).hexdigest()[:16]


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or infinity, or None. Meta tensors
    (a deferred build's, :mod:`adaptkit.deferred`) hold no values yet: they are checked when read."""
    for name, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not tensor.is_meta and not all_finite(tensor):
            return name
    return None


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value of a floating-point tensor is finite: one sum (NaN and infinity survive
    it; 30x faster than ``isfinite(t).all()`` over a ViT-B's weights), and the exact elementwise
    check only when the sum itself overflows."""
    total = tensor.sum(dtype=torch.float32) if tensor.dtype in (torch.float16, torch.bfloat16) else tensor.sum()
    return bool(torch.isfinite(total)) or bool(torch.isfinite(tensor).all())


def refuse_non_finite(tensors: dict[str, torch.Tensor], where: str | Path) -> None:
    """A :class:`CheckpointError` when weights hold NaN or infinity: never read, merged or written."""
    name = first_non_finite(tensors)
    if name is not None:
        raise CheckpointError(
            f"{where}: '{name}' holds NaN or infinite values; only finite floating-point weights are accepted "
            "(a damaged file, or a run that diverged)"
        )


def refuse_non_finite_file(tensors: dict[str, torch.Tensor], path: str | Path, where: str | Path | None = None) -> None:
    """:func:`refuse_non_finite` for the tensors read from the weights file at ``path``, done once per
    file: a file found finite is remembered (by path, size, inode and modification time, beside the
    base fingerprints), so building again from an unchanged Stable Diffusion UNet does not read its
    3.4 GB again to check it. A changed file is checked again."""
    from adaptkit.base_fingerprint import known_finite, note_finite

    if known_finite(path):
        return
    refuse_non_finite(tensors, where if where is not None else path)
    note_finite(path)


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> Path:
    """Write ``tensors`` to a safetensors file atomically (temp file + fsync + rename).

    Metadata values that are not strings are stored as JSON. Hashes of the tensors and of
    the tensors with the metadata are added so that :func:`load_tensors` can refuse a
    damaged file. Tensors holding NaN or infinity are refused.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    refuse_non_finite(clean, path)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items() if k not in (TENSORS_HASH, CONTENT_HASH)}
    meta[TENSORS_HASH] = _content_hash(clean)  # what adaptkit before 0.1.1 checks
    meta[CONTENT_HASH] = _content_hash(clean, meta)
    with atomic_path(path) as tmp:
        save_file(clean, tmp, metadata=meta)
        os.chmod(tmp, file_mode())  # safetensors creates 0600 files; follow the umask as every other tool does
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a safetensors file, or a :class:`CheckpointError`."""
    from safetensors import safe_open

    path = Path(path)
    _require_file(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_short(exc)})") from None


def load_tensors(path: str | Path, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a safetensors file and its metadata; verify the recorded hash when present (of the
    tensors and metadata, or of the tensors alone in older files) and refuse NaN or infinity."""
    from safetensors.torch import load_file

    path = Path(path)
    metadata = read_metadata(path)
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path}: damaged or truncated safetensors file ({_short(exc)})") from None
    if verify:
        if CONTENT_HASH in metadata:
            intact = _content_hash(tensors, metadata) == metadata[CONTENT_HASH]
        else:
            intact = TENSORS_HASH not in metadata or _content_hash(tensors) == metadata[TENSORS_HASH]
        if not intact:
            raise CheckpointError(f"{path}: the tensors or metadata do not match the file's recorded hash; the file is damaged or was modified")
        refuse_non_finite_file(tensors, path)
    return tensors, metadata


def load_weights(path: str | Path, where: str | None = None) -> dict[str, torch.Tensor]:
    """Load a weights file: safetensors, or a torch state dict via ``weights_only=True``.

    A directory is searched for ``model.safetensors`` / ``*.safetensors`` /
    ``pytorch_model.bin``. Pickled objects other than tensors, and NaN or infinite
    values, are refused; ``where`` (a YAML path such as ``backbone.pretrained``)
    starts the message.
    """
    try:
        return _load_weights(Path(path))
    except CheckpointError as exc:
        if where is None:
            raise
        raise CheckpointError(f"{where}: {exc}") from None


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        candidates = [path / "model.safetensors", *sorted(path.glob("*.safetensors")), path / "pytorch_model.bin"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise CheckpointError(f"{path}: directory holds no model.safetensors, *.safetensors or pytorch_model.bin")
        path = found
    _require_file(path)
    from adaptkit import deferred
    from adaptkit.base_fingerprint import note_weights_file

    if deferred.active() and (path.suffix == ".safetensors" or _looks_like_safetensors(path)):
        state = deferred.lazy_safetensors(path)  # meta tensors: each process reads its shard later
    else:
        state = _read_weights_file(path)

    note_weights_file(path, {t.dtype for t in state.values() if t.is_floating_point()})
    return state


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        return load_tensors(path)[0]
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot load as safetensors or as a weights-only torch file ({_short(exc)})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a mapping of parameter names to tensors")
    refuse_non_finite_file(state, path)
    return state


def hub_directory(pretrained: bool | str, config_file: str) -> Path | None:
    """``pretrained`` (a spec's ``backbone.pretrained``) as a checkpoint directory in a library's hub
    layout, recognised by the config file the library writes beside the weights; else None.

    Example: ``hub_directory("ckpt/vit_b16", "config.json")`` -> ``Path("ckpt/vit_b16")`` when it
    holds ``config.json`` (what ``huggingface-cli download timm/...`` leaves).
    """
    if not isinstance(pretrained, str):
        return None
    path = Path(pretrained)
    return path if path.is_dir() and (path / config_file).is_file() else None


def _looks_like_safetensors(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _require_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: file not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


# ----------------------------------------------------------------- adapters
def is_local_path(value: str) -> bool:
    """A ``pretrained:`` value that names a local file or directory, as opposed to a hub tag
    (``timm/...``, ``hf-hub:...``, ``arch.tag``, ``openai``)."""
    if value.startswith(("hf-hub:", "timm/")):
        return False
    return Path(value).exists() or "/" in value or os.sep in value or Path(value).suffix in {".safetensors", ".pt", ".pth", ".bin"}


def check_pretrained_state(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], path: Any) -> None:
    """A clear :class:`CheckpointError` unless ``state`` (a ``backbone.pretrained`` file's tensors)
    has exactly ``own``'s names and shapes."""
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        from adaptkit.registry import registry

        methods = registry().names("method")
        adapter_like = [k for k in unexpected if any(m in k for m in methods)]
        hint = " (it looks like an adapter file: merge it first with `adaptkit merge`)" if adapter_like else ""
        raise CheckpointError(f"backbone.pretrained: {path} holds {len(unexpected)} tensors this model lacks, e.g. {unexpected[0]}{hint}")
    missing = sorted(set(own) - set(state))
    if missing:
        raise CheckpointError(
            f"backbone.pretrained: {path} lacks {len(missing)} of this model's tensors, e.g. {missing[0]}; "
            "is it a checkpoint of the same architecture?"
        )
    mismatched = [k for k in state if tuple(state[k].shape) != tuple(own[k].shape)]
    if mismatched:
        key = mismatched[0]
        raise CheckpointError(
            f"backbone.pretrained: {path}: {key} has shape {tuple(state[key].shape)}, the model expects {tuple(own[key].shape)}"
        )


def save_adapter(model: nn.Module, path: str | Path, extra_metadata: dict[str, Any] | None = None,
                 state: dict[str, torch.Tensor] | None = None) -> Path:
    """Save the trainable state of a built model (or ``state``, the same tensors whole: what a
    sharded model's processes gathered) with its spec and base fingerprint."""
    info = getattr(model, "adaptkit", None)
    metadata: dict[str, Any] = {"format": FORMAT}
    if info is not None:
        from adaptkit import __version__

        metadata.update(
            {
                "adaptkit_version": __version__,
                "spec": json.dumps(info.spec.to_dict()),
                "base_fingerprint": info.base_fingerprint,
                "methods": json.dumps([m.name for m in info.methods]),
            }
        )
    metadata.update(extra_metadata or {})
    return save_tensors(path, trainable_state(model) if state is None else state, metadata)


def load_adapter(model: nn.Module, path: str | Path, check_base: bool = True) -> dict[str, str]:
    """Load an adapter file into a model built from the same spec.

    Refuses a file made for other base weights (fingerprint), one holding tensors the
    model does not have, or one missing tensors the model trains.
    """
    tensors, metadata = load_tensors(path)
    info = getattr(model, "adaptkit", None)
    expected = metadata.get("base_fingerprint")
    if check_base and info is not None and expected and expected != info.base_fingerprint:
        raise CheckpointError(
            f"{path}: this adapter was trained on other base weights (fingerprint {expected}, "
            f"this model's is {info.base_fingerprint}); build the model from the base it was trained on"
        )
    own = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise CheckpointError(
            f"{path}: holds {len(unknown)} tensors this model does not have (e.g. {unknown[0]}); "
            "was it saved from a different spec?"
        )
    missing = sorted(n for n, p in own.items() if p.requires_grad and n not in tensors)
    if missing:
        raise CheckpointError(f"{path}: lacks {len(missing)} trained tensors of this model (e.g. {missing[0]})")
    with torch.no_grad():
        for name, tensor in tensors.items():
            target = own[name]
            if target.shape != tensor.shape:
                raise CheckpointError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}")
            target.copy_(tensor.to(target.dtype))
    return metadata
