"""Plain library models from adaptkit ones: trained runs loaded back, merged weights saved
with timm / open_clip / diffusers names (imports torch).

Example::

    from adaptkit.native import load_trained, merge_to_native

    model = load_trained("runs/lora_digits_5_9")          # a run directory or an adapter file
    native = merge_to_native(model, "merged/")            # LoRA folded in; plain timm names
    # later, without adaptkit: timm.create_model(**recipe); model.load_state_dict(load_file("merged/model.safetensors"))
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaptkit.errors import CompatibilityError

NATIVE_FILE = "adaptkit_native.json"


@dataclass
class NativeModel:
    """A plain library model holding an adaptkit model's weights.

    ``modules`` maps our qualified module names (``backbone.net.blocks.0.attn.qkv``,
    ``head``) to the native model's (``blocks.0.attn.qkv``, ``head``) for every module
    the native model has: the backbone's and the task modules the library has a place
    for (``task_modules``). ``recipe`` says how plain library code creates the model.
    """

    model: nn.Module
    recipe: dict[str, Any]
    task_modules: dict[str, str] = field(default_factory=dict)

    def module_name(self, backbone: Any, ours: str) -> str:
        """The native name of our module ``ours`` (qualified in the task model)."""
        if ours in self.task_modules:
            return self.task_modules[ours]
        if not ours.startswith("backbone."):
            raise CompatibilityError(f"{ours} belongs to neither the backbone nor a task module the native model has")
        return backbone.native_module_name(ours[len("backbone."):])


def load_trained(source: str | Path, registry: Any = None) -> nn.Module:
    """Build the model a run (directory or adapter file) trained, and load its adapter."""
    from adaptkit.builder import build
    from adaptkit.checkpoint import load_adapter
    from adaptkit.precision import at_full_precision
    from adaptkit.rundir import RunDir

    spec, adapter = RunDir.trained(source).spec_and_adapter()
    model = build(at_full_precision(spec), registry=registry)  # merged weights are not rounded to a bf16 base
    load_adapter(model, adapter)
    model.eval()
    return model


def added_tensor_ids(model: nn.Module) -> set[int]:
    """ids of every parameter and buffer of the modules the applied methods attached."""
    ids: set[int] = set()
    for method in model.adaptkit.methods:
        for module in method.added:
            if isinstance(module, nn.Module):
                ids.update(id(t) for t in module.parameters())
                ids.update(id(t) for t in module.buffers())
    return ids


@contextlib.contextmanager
def temporarily_merged(model: nn.Module) -> Iterator[None]:
    """Fold every method of ``model`` into its base weights for the duration of the block; afterwards
    every tensor except the methods' own is as it was, bit for bit.

    (Unmerging subtracts what merging added, which rounds: W + d - d != W; so the weights are
    copied first and put back.) The methods must be mergeable.

    Example::

        with temporarily_merged(model):
            save_generator(model.backbone.generator, "generator.safetensors")
    """
    added = added_tensor_ids(model)
    saved = [(t, t.detach().clone()) for t in model.state_dict(keep_vars=True).values() if id(t) not in added]
    merged = []
    try:
        for method in model.adaptkit.methods:
            if not method.merged:
                method.merge()
                merged.append(method)
        yield
    finally:
        for method in reversed(merged):
            method.unmerge()
        with torch.no_grad():
            for tensor, value in saved:
                tensor.copy_(value)


def native_copy(model: nn.Module) -> NativeModel:
    """A plain library model with ``model``'s current backbone weights (and the task's native modules).

    Tensors of the modules the methods attached are left out, so an unmerged model
    gives the base weights (what PEFT's adapters go on) and a merged one the merged
    weights. Raises :class:`CompatibilityError` if the names do not fit the native model.
    """
    backbone = model.backbone
    native = backbone.native_model()
    added = added_tensor_ids(model)
    own = {k: v for k, v in backbone.state_dict(keep_vars=True).items() if id(v) not in added}
    state = backbone.native_state_dict({k: v.detach() for k, v in own.items()})
    expected = native.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CompatibilityError(
            f"backbone '{backbone.registered_name}': its weights do not fit the native model "
            f"({len(missing)} missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}); "
            "a method may have changed the model's structure"
        )
    with torch.no_grad():
        native.load_state_dict(state, strict=True)
    task_modules = model.native_modules(native)
    native.eval()
    return NativeModel(native, backbone.native_recipe(native), task_modules)


def merge_to_native(model: nn.Module, directory: str | Path | None = None) -> NativeModel:
    """Fold every method into the base weights and return (and optionally save) the plain model.

    Every method must be mergeable (LoRA, full fine-tuning); a method that cannot be
    merged is a :class:`CompatibilityError` naming it. Trained task modules with no
    place in the native model (a head on a library model without a classifier) are
    saved beside the weights as ``task_modules.safetensors``. ``model`` is left unmerged.
    """
    methods = list(model.adaptkit.methods)
    for method in methods:
        if not method.mergeable:
            raise CompatibilityError(
                f"method '{method.name}' cannot be merged into the base weights; only mergeable methods "
                "make a plain model"
            )
    check_native_reach(model)
    with temporarily_merged(model):
        result = native_copy(model)
    if directory is not None:
        save_native(model, result, directory)
    return result


def check_native_reach(model: nn.Module) -> None:
    """Refuse a model whose methods changed backbone parts the native model does not hold
    (a text encoder beside a diffusers UNet), which a native copy would silently drop."""
    backbone = model.backbone
    added = added_tensor_ids(model)
    hosts = set()
    for method in model.adaptkit.methods:
        owned = {id(m) for m in method.added if isinstance(m, nn.Module)}
        for name, module in model.named_modules():
            if id(module) in owned and name.startswith("backbone."):
                hosts.add(name.rpartition(".")[0])
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in added and name.startswith("backbone."):
            hosts.add(name.rpartition(".")[0])
    side = tuple(f"backbone.{name}" for name in backbone.native_side_modules)
    for host in sorted(hosts):
        if host in side or host.startswith(tuple(f"{s}." for s in side)):
            continue
        backbone.native_module_name(host[len("backbone."):])  # a CompatibilityError naming the part


def leftover_task_tensors(model: nn.Module, result: NativeModel) -> dict[str, torch.Tensor]:
    """Trained tensors outside the backbone that the native model has no place for."""
    added = added_tensor_ids(model)
    placed = tuple(f"{name}." for name in result.task_modules)
    return {
        name: p.detach() for name, p in model.named_parameters()
        if p.requires_grad and id(p) not in added and not name.startswith("backbone.") and not name.startswith(placed)
    }


def save_native(model: nn.Module, result: NativeModel, directory: str | Path) -> list[str]:
    """Write a native model in its library's layout plus ``adaptkit_native.json`` (the recipe).
    Weights holding NaN or infinity (a merge that overflowed) are refused before anything is written."""
    from adaptkit.checkpoint import refuse_non_finite, save_tensors

    refuse_non_finite(result.model.state_dict(), f"the merged {model.adaptkit.spec.backbone.name} model")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = model.backbone.save_native(result.model, directory, result.recipe)
    leftover = leftover_task_tensors(model, result)
    if leftover:
        save_tensors(directory / "task_modules.safetensors", leftover, {"format": "adaptkit.task_modules/1"})
        files.append("task_modules.safetensors")
    info = model.adaptkit
    description = {
        "recipe": result.recipe,
        "task_modules": result.task_modules,
        "files": files,
        "spec": info.spec.to_dict(),
        "base_fingerprint": info.base_fingerprint,
        "methods_merged": [m.name for m in info.methods],
    }
    (directory / NATIVE_FILE).write_text(json.dumps(description, indent=2) + "\n")
    return [*files, NATIVE_FILE]


def save_run(model: nn.Module, directory: str | Path, status: str, note: dict[str, Any] | None = None) -> list[str]:
    """Write a built model as a run directory (spec.yaml, adapter.safetensors, run.json) that
    ``adaptkit export`` / ``merge`` / ``load_trained`` accept like a trained run."""
    from adaptkit.checkpoint import save_adapter
    from adaptkit.rundir import RUN_FILES, RunDir

    run = RunDir.at(directory)
    save_adapter(model, run.adapter)
    run.write_saved(model.adaptkit.spec, status, note=note)
    return list(RUN_FILES)
