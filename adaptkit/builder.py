"""spec -> backbone -> data -> task model -> methods applied in order."""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from adaptkit.backbone import Backbone
from adaptkit.base_fingerprint import base_fingerprint, recording_weights_files
from adaptkit.compat import check_spec
from adaptkit.data import DataBundle, DataInfo
from adaptkit.deferred import CannotDefer, deferring, unsourced
from adaptkit.errors import AdaptkitError, CompatibilityError, DataError, PluginError
from adaptkit.method import AppliedMethod
from adaptkit.precision import resolve_dtype, store_frozen
from adaptkit.records import PresetRecord
from adaptkit.registry import Registry
from adaptkit.spec import RunSpec, load_spec
from adaptkit.task import TaskModel


@dataclass
class BuildContext:
    """What factories may consult while building: the spec, registry and seed.

    ``backbone`` is set once the backbone exists, so data sources can match its input.
    """

    spec: RunSpec
    registry: Registry
    backbone: Any = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def seed(self) -> int:
        return self.spec.seed

    def preset(self, name: str, backbone: str) -> PresetRecord | None:
        """The preset ``name`` if it belongs to ``backbone``; an error if it belongs to another."""
        preset = self.registry.preset(name)
        if preset is not None and preset.backbone != backbone:
            raise PluginError(f"preset '{name}' configures backbone '{preset.backbone}', not '{backbone}'")
        return preset


@dataclass
class BuildInfo:
    """Attached to a built model as ``model.adaptkit``."""

    spec: RunSpec
    base_fingerprint: str
    methods: list[AppliedMethod]
    data_info: DataInfo
    data: DataBundle | None = None
    #: the dtype the frozen base weights are stored in (``backbone.dtype``)
    base_dtype: torch.dtype = torch.float32
    #: how the base was built when deferring it was asked for (``build(defer_base=True)``); "" otherwise
    base_build: str = ""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # pragma: no cover
        pass


def build(spec: RunSpec | dict[str, Any] | str, registry: Registry | None = None, keep_data: bool = False,
          defer_base: bool = False) -> TaskModel:
    """Build the model a spec describes, with its methods applied.

    Returns the task model (an ``nn.Module``); ``model.adaptkit`` holds the spec,
    the base-weights fingerprint, the applied methods and the data description.
    Only parameters the methods own (and new task modules) require gradients.

    ``defer_base`` (``train.strategy: fsdp`` under torchrun) leaves the frozen base weights on
    the meta device when every one of them is read from a safetensors file, for each process
    to read only its shard once FSDP has sharded the model (:mod:`adaptkit.deferred`);
    otherwise the whole model is built, and ``model.adaptkit.base_build`` says why.

    What the task and the methods create (heads, LoRA factors, prompts) is initialised from
    a generator seeded by the spec's seed alone, after the backbone is built: the same values
    whether the base was initialised, read from a file or left on the meta device.
    """
    from adaptkit.registry import registry as default_registry

    reg = registry or default_registry()
    spec = load_spec(spec, registry=reg) if not isinstance(spec, RunSpec) else spec
    problems = check_spec(spec, reg)
    if problems:
        raise CompatibilityError("; ".join(problems))
    if defer_base:
        try:
            return _build(spec, reg, keep_data, defer=True)
        except NotDeferrable as exc:
            model = _build(spec, reg, keep_data, defer=False)
            model.adaptkit.base_build = f"every process built the whole model ({exc})"
            return model
    return _build(spec, reg, keep_data, defer=False)


class NotDeferrable(Exception):
    """A base weight that cannot wait on the meta device (see :func:`adaptkit.deferred.unsourced`)."""


def trainables_seed(seed: int) -> int:
    """The seed of what the task and the methods create, drawn apart from the backbone's own seed."""
    return (seed * 1_000_003 + 104_729) % (2**31 - 1)


def _build(spec: RunSpec, reg: Registry, keep_data: bool, defer: bool) -> TaskModel:
    seed_everything(spec.seed)
    ctx = BuildContext(spec=spec, registry=reg)
    backbone_record = reg.get("backbone", spec.backbone.name)
    with recording_weights_files() as weights_read, (deferring() if defer else contextlib.nullcontext()):
        try:
            backbone = call_factory(reg, backbone_record, spec.backbone, ctx)
        except (Exception, SystemExit) as exc:
            if not defer:
                raise
            # a library that moves or computes with its weights while creating the model (open_clip's
            # create_model calls .to(device)); a real error is raised again by the whole build
            why = str(exc) if isinstance(exc, CannotDefer) else type(exc).__name__
            raise NotDeferrable(f"the backbone cannot be created on the meta device: {why}") from exc
    if defer and (reason := unsourced(backbone)) is not None:
        raise NotDeferrable(reason)
    backbone.registered_name = backbone_record.name
    ctx.backbone = backbone
    # hashed once per weights file, then cached (the params and seed decide what the files do not hold)
    base_fp = base_fingerprint(backbone, weights_read.files, key=json.dumps([spec.backbone.model_dump(mode="json"), spec.seed], sort_keys=True))
    # the backbone's initialisation drew from the global generator (or nothing, on the meta device)
    seed_everything(trainables_seed(spec.seed))

    data = call_factory(reg, reg.get("data", spec.data.name), spec.data, ctx)
    model: TaskModel = call_factory(reg, reg.get("task", spec.task.name), spec.task, backbone, data.info, ctx)
    check_training_state(model, spec.task.name)
    backbone.requires_grad_(False)

    applied: list[AppliedMethod] = []
    surface = model.surface
    for params in spec.methods:
        applied.append(call_factory(reg, reg.get("method", params.name), params, surface, ctx))
    if defer and (reason := unsourced(model)) is not None:  # a task or method computed something from the base
        raise NotDeferrable(reason)
    # the base in the spec's dtype now that the methods have made trainable (fp32) what they train
    dtype = resolve_dtype(spec, weights_read.stored_dtype())
    store_frozen(model.backbone, dtype)
    model.adaptkit = BuildInfo(spec, base_fp, applied, data.info, data if keep_data else None, dtype)
    if defer:
        names = [path.name for path in weights_read.files]
        if len(set(names)) < len(names):  # a pipeline's parts share file names: say whose, from the folder they share
            common = os.path.commonpath([str(path) for path in weights_read.files])
            names = [os.path.relpath(path, common) for path in weights_read.files]
        files = ", ".join(names)
        model.adaptkit.base_build = f"base weights left on the meta device; each process reads its shard of {files}"
    return model


def check_training_state(model: TaskModel, task: str) -> None:
    """A task that keeps training state implements all of :class:`~adaptkit.capabilities.KeepsTrainingState`:
    one member alone (``extra_state`` without ``finish_training``) would be silently ignored."""
    from adaptkit.capabilities import KeepsTrainingState

    members = [name for name in ("extra_state", "load_extra_state", "finish_training") if callable(getattr(model, name, None))]
    if members and not isinstance(model, KeepsTrainingState):
        missing = sorted({"extra_state", "load_extra_state", "finish_training"} - set(members))
        raise PluginError(f"task '{task}': its model has {', '.join(members)} but not {', '.join(missing)}; "
                          "a task that keeps training state implements all three (adaptkit.capabilities.KeepsTrainingState)")


def call_factory(registry: Registry, record: Any, *args: Any) -> Any:
    """``record.factory(*args)``, with what it raises naming the component and the plugin that registered it.

    A data source that cannot split or read the user's data raises ValueError (scikit-learn's
    "the least populated class has only 1 member"): a :class:`DataError`; a DataError of a data
    source names it. A third-party
    factory's other failures are a :class:`PluginError` naming its package (the rest of
    adaptkit works; the plugin's authors can fix it); a built-in's stay internal errors
    (a bug here), with a note naming it.
    """
    try:
        return record.factory(*args)
    except DataError as exc:  # say which data source could not use the data (the user may have several specs)
        if record.kind == "data" and f"data '{record.name}'" not in str(exc):
            raise DataError(f"data '{record.name}': {exc}") from None
        raise
    except AdaptkitError:
        raise
    except (Exception, SystemExit) as exc:  # (a factory calling sys.exit would end adaptkit silently)
        where = f"{record.kind} '{record.name}' (plugin {record.provider}, {registry.source(record.provider)})"
        if record.kind == "data" and isinstance(exc, ValueError):
            raise DataError(f"data '{record.name}': cannot use the data: {_first_line(exc)}") from None
        if isinstance(exc, SystemExit) or registry.source(record.provider) != "built-in":
            raise PluginError(f"{where} failed to build: {type(exc).__name__}: {_first_line(exc)}; report it to the plugin's authors") from exc
        exc.add_note(f"raised while building {where}")
        raise


def build_nested_backbone(spec: Mapping[str, Any], ctx: BuildContext, where: str, name: str | None = None,
                          needs: Collection[str] = ()) -> Backbone:
    """A backbone built inside another component (a diffusion UNet's text encoder, the CLIP that
    guides an edit) from its spec fragment (``{model: ..., pretrained: ...}``), in a context of
    its own. ``name`` fixes the backbone where the fragment may not choose it; ``needs`` are
    capabilities it must have. Errors name ``where`` (the YAML path of the fragment).

    Example::

        encoder = build_nested_backbone(params.text_encoder, ctx, "backbone.text_encoder", name="clip")
    """
    chosen = name or spec.get("name")
    if not isinstance(chosen, str) or chosen not in ctx.registry.names("backbone"):
        raise PluginError(f"{where}: needs the '{chosen}' backbone, which is not registered")
    record = ctx.registry.get("backbone", chosen)
    params = record.params.model_validate({**spec, "name": chosen})
    backbone = call_factory(ctx.registry, record, params, BuildContext(spec=ctx.spec, registry=ctx.registry))
    backbone.registered_name = record.name
    missing = sorted(set(needs) - backbone.capabilities)
    if missing:
        raise CompatibilityError(f"{where}: backbone '{record.name}' lacks the capabilities this needs: {', '.join(missing)}")
    return backbone


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


def recommended(spec: RunSpec, registry: Registry, key: str, fallback: float) -> float:
    """The training setting ``key`` for a spec: the spec's own, else the first method's advice."""
    value = getattr(spec.train, key)
    if value is not None:
        return float(value)
    for params in spec.methods:
        advice = registry.get("method", params.name).recommended
        if key in advice:
            return float(advice[key])
    return fallback


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
