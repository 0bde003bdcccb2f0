"""Creating diffusers models from presets, local directories and weight files (imports torch)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaptkit.base_fingerprint import note_weights_file, safetensors_dtypes
from adaptkit import deferred
from adaptkit.checkpoint import load_weights, refuse_non_finite, refuse_non_finite_file
from adaptkit.deferred import load_base_state
from adaptkit.errors import CheckpointError, PluginError, did_you_mean


def resolve_architecture(params: Any, ctx: Any, family: tuple[str, ...], where: str = "backbone.model") -> tuple[str, dict[str, Any]]:
    """(diffusers class name, constructor kwargs) for a ``model`` that is a preset or a class name."""
    preset = ctx.preset(params.model, params.name)
    if preset is not None:
        arch, kwargs = preset.config.get("arch"), dict(preset.config.get("kwargs") or {})
        if arch not in family:
            raise PluginError(f"{where}: preset '{params.model}' names architecture '{arch}'; this needs {', '.join(family)}")
    elif params.model in family:
        arch, kwargs = params.model, {}
    else:
        known = [p.name for p in ctx.registry.presets(params.name)] + list(family)
        raise PluginError(
            f"{where}: '{params.model}' is neither a {params.name} preset nor one of {', '.join(family)}"
            f"{did_you_mean(params.model, known)}; presets: {', '.join(p.name for p in ctx.registry.presets(params.name))}"
        )
    kwargs.update(params.kwargs)
    return str(arch), kwargs


def construct(arch: str, kwargs: dict[str, Any], where: str) -> nn.Module:
    """Instantiate a diffusers class with kwargs, turning its complaints into a PluginError."""
    import diffusers

    cls = getattr(diffusers, arch)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        raise PluginError(f"{where}: diffusers could not create {arch} with {kwargs}: {exc}") from None


def is_diffusers_directory(path: Path, subfolder: str) -> Path | None:
    """The folder holding a model's config.json: ``path`` itself or ``path/subfolder``."""
    if not path.is_dir():
        return None
    for folder in (path, path / subfolder):
        if (folder / "config.json").is_file():
            return folder
    return None


def from_directory(folder: Path, family: tuple[str, ...], where: str) -> nn.Module:
    """Load a diffusers model saved with ``save_pretrained`` (offline)."""
    import diffusers

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{where}: {folder}/config.json is not readable JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: {folder}/config.json must hold a JSON object (a diffusers model config)")
    arch = config.get("_class_name")
    if arch not in family:
        raise CheckpointError(f"{where}: {folder} holds a {arch or 'model of unknown class'}; expected one of {', '.join(family)}")
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(60)  # above CRITICAL: our error says what is wrong; diffusers' own logs only add noise
    try:
        if deferred.active():
            return deferred_from_directory(folder, getattr(diffusers, arch), config)
        model = getattr(diffusers, arch).from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{where}: cannot load the diffusers model in {folder}: {str(exc)[:300]}") from None
    finally:
        diffusers_logging.set_verbosity(level)
    found = directory_weights(folder)
    if found is None:
        check_finite_weights(model.state_dict(), f"{where}: {folder}")
    else:  # once per weights file (an SD UNet's 3.4 GB are not read again at every build)
        refuse_non_finite_file(model.state_dict(), found, f"{where}: {folder}")
    note_directory_weights(folder)
    return model


#: the weights files ``from_pretrained`` reads from a model folder (no variant), in its order of preference
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def deferred_from_directory(folder: Path, cls: type, config: dict[str, Any]) -> nn.Module:
    """A model folder's model with its parameters left on the meta device, each knowing where in
    the folder's safetensors file its values lie (``train.strategy: fsdp``, :mod:`adaptkit.deferred`):
    ``from_config`` builds the architecture, our loader maps the file strictly (``from_pretrained``
    would read every weight). A folder holding only a ``.bin`` cannot be read by rows: its model
    is then built whole on every process."""
    path = folder / DIFFUSERS_WEIGHTS[0]
    if not path.is_file():
        raise deferred.CannotDefer(f"{folder} holds no {DIFFUSERS_WEIGHTS[0]} to read by rows")
    model = cls.from_config(config)
    load_base_state(model, load_weights(path))
    return model


def directory_weights(folder: Path) -> Path | None:
    """The weights file ``from_pretrained`` reads in a model folder, or None (a variant, sharded weights)."""
    return next((folder / name for name in DIFFUSERS_WEIGHTS if (folder / name).is_file()), None)


def note_directory_weights(folder: Path) -> None:
    """Tell the build which file of ``folder`` it read and the dtype stored there (for the base
    fingerprint's cache and ``backbone.dtype: auto``); ``from_pretrained`` itself casts to fp32."""
    found = directory_weights(folder)
    if found is not None:
        note_weights_file(found, safetensors_dtypes(found) if found.suffix == ".safetensors" else ())


def pipeline_schedule(folder: Path, default: Any, where: str) -> Any:
    """The noise schedule of the pipeline folder holding ``folder`` (its ``scheduler/scheduler_config.json``,
    e.g. Stable Diffusion's scaled_linear betas 0.00085-0.012), or ``default`` for a lone model folder."""
    path = folder.parent / "scheduler" / "scheduler_config.json"
    if folder.name != "unet" or not path.is_file():
        return default
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{where}: {path} is not readable JSON ({exc})") from None
    return scheduler_schedule(config, default, f"{where}: {path}")


def scheduler_schedule(config: dict[str, Any], default: Any, where: str) -> Any:
    """The noise schedule (``default``'s type, its values where ``config`` is silent) of a diffusers scheduler config."""
    prediction = config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise CheckpointError(f"{where}: the pipeline predicts {prediction}; adaptkit's denoisers predict epsilon (noise)")
    fields = {k: config[k] for k in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end") if k in config}
    try:
        return type(default).model_validate({**default.model_dump(), **fields})
    except ValueError as exc:
        raise CheckpointError(f"{where}: a noise schedule adaptkit does not support ({str(exc)[:200]})") from None


def check_finite_weights(state: dict[str, torch.Tensor], where: str) -> None:
    """Refuse weights holding NaN or infinity (a damaged file, or a diverged run)."""
    refuse_non_finite(state, where)


#: ``org/name``: a Hugging Face repository id (when no such local path exists)
HUB_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
WEIGHT_SUFFIXES = {".safetensors", ".pt", ".pth", ".bin", ".ckpt"}


def is_hub_repo(value: str) -> bool:
    """True for ``hf-hub:org/name``, and for ``org/name`` where no such local path exists
    (``google/ddpm-cifar10-32``); a path with a weights suffix is always local."""
    if value.startswith("hf-hub:"):
        return True
    return not Path(value).exists() and Path(value).suffix not in WEIGHT_SUFFIXES and HUB_REPO.match(value) is not None


def from_hub(name: str, arch: str, subfolder: str, where: str) -> nn.Module:
    import diffusers

    repo = name.removeprefix("hf-hub:")
    try:
        return getattr(diffusers, arch).from_pretrained(repo, subfolder=subfolder)
    except Exception as exc:  # network, missing repo, wrong class: all mean the same to the user
        try:
            return getattr(diffusers, arch).from_pretrained(repo)
        except Exception:
            local = "" if name.startswith("hf-hub:") else f"no local path '{name}' exists, and "
            raise CheckpointError(
                f"{where}: {local}'{repo}' could not be fetched from the hub ({type(exc).__name__}: {str(exc)[:160]}); "
                "without a network, pass a local diffusers directory or weights file instead"
            ) from None


def load_into(
    module: nn.Module, path: str, native_prefix: str, required_prefixes: tuple[str, ...], where: str,
    only: tuple[str, ...] | None = None,
) -> None:
    """Load a weights file into ``module`` (a backbone), strictly for ``required_prefixes``.

    Accepts adaptkit checkpoints (``backbone.`` + this backbone's own names) and plain
    diffusers state dicts (the native model's names, stored here under ``native_prefix``).
    ``only`` limits the tensors the file may hold to these name prefixes.
    """
    state = load_weights(path, where)
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    own = module.state_dict()
    if only is not None:
        own = {k: v for k, v in own.items() if k.startswith(only)}
    if not any(k in own for k in state):
        state = {native_prefix + k: v for k, v in state.items()}
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        adapter_like = [k for k in unexpected if any(w in k for w in ("lora", "prompt", "adapter", "prefix"))]
        hint = " (it looks like an adapter file: merge it first with `adaptkit merge`)" if adapter_like else ""
        raise CheckpointError(f"{where}: {path} holds {len(unexpected)} tensors this model lacks, e.g. {unexpected[0]}{hint}")
    missing = sorted(k for k in own if k.startswith(required_prefixes) and k not in state)
    if missing:
        raise CheckpointError(
            f"{where}: {path} lacks {len(missing)} of this model's tensors, e.g. {missing[0]}; "
            "is it a checkpoint of the same architecture and conditioning?"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise CheckpointError(f"{where}: {path}: {key} has shape {tuple(tensor.shape)}, the model expects {tuple(own[key].shape)}")
        if own[key].is_floating_point() and not tensor.is_floating_point():
            raise CheckpointError(f"{where}: {path}: {key} holds {tensor.dtype} values, the model expects floating point")
    check_finite_weights(state, f"{where}: {path}")
    load_base_state(module, state, strict=False)
