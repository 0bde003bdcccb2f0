"""Hugging Face PEFT's LoRA directory format: export and import (imports torch).

A PEFT LoRA directory holds ``adapter_config.json`` and ``adapter_model.safetensors``
with keys ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` (module names
of the plain library model), and the whole tensors of ``modules_to_save`` (our
classification head, where the library has a classifier, and whole backbone layers a
run trained, such as a UNet's class embedding).

Export is exact: ``peft.PeftModel.from_pretrained(<plain timm model>, dir)`` computes what
our model computes. Our LoRA can adapt row slices of a fused layer (q and v inside
timm's ``qkv``, each with its own rank-r factors); PEFT adapts whole modules. The two
agree exactly when the slices are written as one LoRA of rank ``parts * r`` on the
whole layer, A stacked and B block-structured (part i's B on its own rows and its
own r columns, zeros elsewhere), with ``lora_alpha`` scaled by ``parts`` so that
``alpha / r`` (the scale) is unchanged::

    B_whole @ A_whole = sum_i  embed_rows_i(B_i) @ A_i = the sum of the part updates

Different scales on one layer (stacked LoRAs) are folded into B relative to the first.
Ranks and alphas that differ from the most common go into ``rank_pattern`` /
``alpha_pattern`` (exact module names). PEFT's LoRA on ``nn.MultiheadAttention``
(open_clip) adapts in_proj and out_proj with one rank: the smaller is padded with zeros.

Import reads such a directory (ours or one PEFT wrote) into a spec whose method is a
whole-layer LoRA with per-layer ranks and alphas, and an adapter holding its tensors.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaptkit.errors import CheckpointError, CompatibilityError
from adaptkit.lowrank import stack_updates
from adaptkit.native import NativeModel, added_tensor_ids, native_copy

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTKIT_FILE = "adaptkit.json"
PREFIX = "base_model.model."
#: config values that change what a LoRA computes and that we do not implement
_UNSUPPORTED = {
    "use_dora": (False, None),
    "bias": ("none", None),
    "lora_bias": (False, None),
    "fan_in_fan_out": (False, None),
    "layer_replication": (None,),
    "target_parameters": (None, []),
    "trainable_token_indices": (None,),
    "use_qalora": (False, None),
    "alora_invocation_tokens": (None,),
}


# ------------------------------------------------------------------ export
def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


def _native_updates(model: nn.Module, native: NativeModel, skip: Sequence[Any] = ()) -> dict[str, dict[str, list[Any]]]:
    """Low-rank updates grouped by PEFT target module: {target: {slot: [updates]}}.

    ``slot`` is "" for a Linear/Conv2d target; "in_proj"/"out_proj" for an
    ``nn.MultiheadAttention`` target.
    """
    grouped: dict[str, dict[str, list[Any]]] = {}
    for method in model.adaptkit.methods:
        if any(method is other for other in skip):
            continue
        if method.merged:
            raise CompatibilityError(f"method '{method.name}' is merged into the weights; unmerge it before exporting")
        if method.mergeable and not method.added:
            continue  # its whole effect is in trained base weights (full fine-tuning): they travel as modules_to_save
        for update in method.low_rank_updates():
            if update.layer in native.task_modules:  # LoRA on the head: the whole head travels, updated
                head = native.model.get_submodule(native.task_modules[update.layer])
                with torch.no_grad():
                    start, stop = update.row_range
                    head.weight[start:stop] += update.delta().detach().to(head.weight.dtype)
                continue
            name = native.module_name(model.backbone, update.layer)
            target, slot = _peft_target(native.model, name)
            grouped.setdefault(target, {}).setdefault(slot, []).append(update)
    return grouped


def _peft_target(native: nn.Module, name: str) -> tuple[str, str]:
    """Where PEFT puts a LoRA for the native module (or fused parameter) ``name``."""
    if name.endswith(".in_proj_weight") or name.endswith(".out_proj"):
        parent = name.rsplit(".", 1)[0]
        if isinstance(native.get_submodule(parent), nn.MultiheadAttention):
            return parent, "in_proj" if name.endswith("in_proj_weight") else "out_proj"
    try:
        module = native.get_submodule(name)
    except AttributeError:
        raise CompatibilityError(f"the native model has no module '{name}' to put a LoRA on") from None
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise CompatibilityError(f"native module '{name}' is a {type(module).__name__}; PEFT's LoRA export covers Linear, Conv2d and MultiheadAttention")
    if isinstance(module, nn.Conv2d) and (tuple(module.dilation) != (1, 1) or module.padding_mode != "zeros"):
        raise CompatibilityError(
            f"native module '{name}': PEFT's LoRA on a convolution ignores dilation {tuple(module.dilation)} and padding "
            f"mode '{module.padding_mode}', so it would compute something else; leave this layer out or merge instead"
        )
    return name, ""


def _trained_modules(model: nn.Module, native: NativeModel, trained: list[str]) -> list[str]:
    """The native modules whose weights were trained (full fine-tuning of a class embedding, a layer).

    They travel whole, as PEFT ``modules_to_save`` (PEFT swaps in the saved copy: exact).
    A trained tensor with no such module (a position embedding on the model itself, a
    module the plain model lacks) is a :class:`CompatibilityError`.
    """
    if not trained:
        return []
    ours = {v: k for k, v in _our_layers(model).items()}  # our qualified layer -> native name
    found: set[str] = set()
    for name in trained:
        module, _, pname = name.rpartition(".")
        theirs = ours.get(module)
        if theirs is None or not hasattr(native.model.get_submodule(theirs), pname):
            raise CompatibilityError(
                f"{len(trained)} base weights were trained (e.g. {name}, which is not a whole layer of the plain model); "
                "PEFT's LoRA format carries low-rank updates and whole modules (modules_to_save): merge the run "
                "(`adaptkit merge`) instead"
            )
        if _suffix_of_another(native.model, theirs):
            raise CompatibilityError(
                f"trained module '{theirs}' would be ambiguous in PEFT's modules_to_save (another module's name ends "
                f"with it); merge the run (`adaptkit merge`) instead"
            )
        found.add(theirs)
    return sorted(found)


def _suffix_of_another(native: nn.Module, name: str) -> bool:
    """PEFT matches target_modules, modules_to_save and pattern keys as name suffixes: a text tower's
    "transformer.resblocks.0.attn" is also the end of "visual.transformer.resblocks.0.attn"."""
    return any(n != name and n.endswith(f".{name}") for n, _ in native.named_modules())


def peft_state(model: nn.Module, skip: Sequence[Any] = ()) -> tuple[dict[str, Any], dict[str, torch.Tensor], NativeModel]:
    """(adapter_config, adapter tensors, native model with the base weights) for a built model.

    ``skip``: applied methods the caller writes in a file of their own (a format's learned words).

    Raises :class:`CompatibilityError` for what PEFT's LoRA cannot carry: a method that is
    not a low-rank update, trained base weights, trained task tensors the native model has no
    place for are reported by name (the last go to ``task_modules.safetensors`` by :func:`export_peft`).
    """
    problem = model.backbone.peft_problem
    if problem:
        raise CompatibilityError(f"backbone '{model.backbone.registered_name}' cannot export to PEFT: {problem}")
    native = native_copy(model)
    added = added_tensor_ids(model)
    trained_base = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in added and n.startswith("backbone.")]
    whole = _trained_modules(model, native, trained_base)
    grouped = _native_updates(model, native, skip)
    both = sorted(set(whole) & set(grouped))
    if both:
        raise CompatibilityError(
            f"native module '{both[0]}' has trained weights and a LoRA; PEFT cannot hold both on one module: "
            "merge the run (`adaptkit merge`) instead"
        )
    if not grouped:
        raise CompatibilityError("the model has no low-rank updates to export (a PEFT LoRA directory needs at least one LoRA layer); merge the run (`adaptkit merge`) instead")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    dropouts = set()
    for target, slots in grouped.items():
        module = native.model.get_submodule(target)
        for updates in slots.values():
            dropouts.update(u.dropout for u in updates)
        if "" in slots:
            a, b, scale = stack_updates(slots[""], int(module.weight.shape[0]))
            if isinstance(module, nn.Conv2d):
                b = b[:, :, None, None]
            tensors[f"{PREFIX}{target}.lora_A.weight"], tensors[f"{PREFIX}{target}.lora_B.weight"] = a, b
        else:  # nn.MultiheadAttention: in_proj and out_proj share one rank and one alpha
            in_updates, out_updates = slots.get("in_proj", []), slots.get("out_proj", [])
            rank = max(sum(u.rank for u in in_updates), sum(u.rank for u in out_updates))
            scale = (in_updates or out_updates)[0].scale
            parts = {"": (in_updates, 3 * module.embed_dim), "base_layer.out_proj.": (out_updates, module.embed_dim)}
            for infix, (updates, rows) in parts.items():
                if updates:
                    a, b, _ = stack_updates(updates, rows, rank, scale)
                else:
                    a, b = torch.zeros(rank, module.embed_dim), torch.zeros(rows, rank)
                tensors[f"{PREFIX}{target}.{infix}lora_A.weight"] = a
                tensors[f"{PREFIX}{target}.{infix}lora_B.weight"] = b
        rank = int(tensors[f"{PREFIX}{target}.lora_A.weight"].shape[0])
        ranks[target], alphas[target] = rank, scale * rank
    for theirs in [*native.task_modules.values(), *whole]:
        for pname, p in native.model.get_submodule(theirs).named_parameters():
            tensors[f"{PREFIX}{theirs}.{pname}"] = p.detach().clone()
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    ambiguous = {t for t in grouped if _suffix_of_another(native.model, t)}
    targets: list[str] | str = sorted(grouped)
    if ambiguous:
        targets = "(?:" + "|".join(re.escape(t) for t in sorted(grouped)) + ")"  # a string is matched whole

    def key(target: str) -> str:
        return ("^" if target in ambiguous else "") + re.escape(target)

    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "r": r,
        "lora_alpha": _number(alpha),
        "lora_dropout": max(dropouts),
        "target_modules": targets,
        "rank_pattern": {key(t): v for t, v in ranks.items() if v != r},
        "alpha_pattern": {key(t): _number(v) for t, v in alphas.items() if v != alpha},
        "modules_to_save": sorted([*native.task_modules.values(), *whole]) or None,
        "use_rslora": False,
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    return config, tensors, native


def export_peft(model: nn.Module, directory: str | Path, include_base: bool = False) -> list[str]:
    """Write ``model``'s low-rank updates (and task head) as a PEFT LoRA directory; return the file names.

    Also writes ``adaptkit.json`` (the spec, the plain-model recipe, the base fingerprint:
    what :func:`import_peft` needs to rebuild the model without being told) and, with
    ``include_base``, ``base_model.safetensors``: the base weights with the native library's
    names, for users who have no other copy of them.
    """
    from adaptkit.checkpoint import save_tensors
    from adaptkit.native import leftover_task_tensors

    config, tensors, native = peft_state(model)
    notes = []
    if any(k.endswith(".base_layer.out_proj.lora_B.weight") and v.any() for k, v in tensors.items()):
        notes.append(
            "LoRA on out_proj of nn.MultiheadAttention: PEFT up to at least 0.21.2 adds that update twice in "
            "MultiheadAttention's forward and merge (huggingface/peft pull request 3774); with such a PEFT the "
            "outputs differ from adaptkit's until the fix is released. The factors here are the exact ones."
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_tensors(directory / WEIGHTS_FILE, tensors, {"format": "pt"})
    files = [CONFIG_FILE, WEIGHTS_FILE, *model.backbone.native_config_files(native.model, directory)]
    leftover = leftover_task_tensors(model, native)
    if leftover:
        save_tensors(directory / "task_modules.safetensors", leftover, {"format": "adaptkit.task_modules/1"})
        files.append("task_modules.safetensors")
    if include_base:
        # the whole plain model (a classifier included, which modules_to_save replaces anyway)
        save_tensors(directory / "base_model.safetensors", native.model.state_dict(), {"format": "pt"})
        files.append("base_model.safetensors")
    info = model.adaptkit
    (directory / ADAPTKIT_FILE).write_text(json.dumps({
        "spec": info.spec.to_dict(),
        "base_fingerprint": info.base_fingerprint,
        "recipe": native.recipe,
        "task_modules": native.task_modules,
        "files": files,
        "notes": notes,
    }, indent=2) + "\n")
    (directory / "README.md").write_text(_readme(config, native, files, notes))
    return [*files, ADAPTKIT_FILE, "README.md"]


def _readme(config: dict[str, Any], native: NativeModel, files: list[str], notes: list[str]) -> str:
    recipe = native.recipe
    targets = config["target_modules"]
    count = len(targets) if isinstance(targets, list) else targets.count("|") + 1
    lines = [
        "# LoRA adapter exported by adaptkit", "",
        f"PEFT LoRA: r={config['r']}, lora_alpha={config['lora_alpha']}, {count} target modules"
        + (f", modules_to_save {config['modules_to_save']}" if config["modules_to_save"] else "") + ".", "",
        f"Base model ({recipe.get('library', 'native library')}): `{json.dumps({k: v for k, v in recipe.items() if k != 'python'})}`", "",
        "```python",
        "import json, safetensors.torch",
        "from peft import PeftModel",
        recipe["python_base"] if "python_base" in recipe else f"# {recipe.get('python', 'create the base model')}",
        "model.load_state_dict(safetensors.torch.load_file('base_model.safetensors'))" if "base_model.safetensors" in files
        else "# load the base weights the adapter was trained on (or export with --include-base: base_model.safetensors)",
        "model = PeftModel.from_pretrained(model, '<this directory>')",
        "```", "",
    ]
    if "task_modules.safetensors" in files:
        lines += ["`task_modules.safetensors` holds trained task modules (e.g. a classification head) that the plain model has no place for.", ""]
    if "base_model.safetensors" in files:
        lines += ["`base_model.safetensors` holds the base weights with the library's own names: "
                  "`model.load_state_dict(safetensors.torch.load_file('base_model.safetensors'))` before PeftModel.from_pretrained.", ""]
    lines += [f"Note: {note}\n" for note in notes]
    return "\n".join(lines)


# ------------------------------------------------------------------ import
def read_peft_dir(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config and tensors of a PEFT LoRA directory (``base_model.model.`` stripped)."""
    from adaptkit.checkpoint import load_tensors, load_weights

    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_FILE} (not a PEFT adapter directory)")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{config_path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object")
    if config.get("peft_type") != "LORA":
        raise CompatibilityError(f"{config_path}: peft_type is {config.get('peft_type')!r}; adaptkit imports LORA adapters")
    for key, fine in _UNSUPPORTED.items():
        if config.get(key, fine[0]) not in fine:
            raise CompatibilityError(f"{config_path}: {key}={config[key]!r} is not supported by adaptkit's LoRA (only {fine[0]!r})")
    _check_config(config, config_path)
    weights = directory / WEIGHTS_FILE
    if weights.is_file():
        tensors = load_tensors(weights)[0]
    elif (directory / "adapter_model.bin").is_file():
        tensors = load_weights(directory / "adapter_model.bin")
    else:
        raise CheckpointError(f"{directory}: no {WEIGHTS_FILE} or adapter_model.bin")
    stripped = {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise CheckpointError(f"{weights}: key '{key}' does not start with '{PREFIX}'; is it a PEFT adapter of a plain model?")
        stripped[key[len(PREFIX):]] = value
    return config, stripped


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _check_config(config: dict[str, Any], where: Path) -> None:
    """Refuse config values import reads that PEFT itself would not have written."""
    if "lora_alpha" in config and not _positive(config["lora_alpha"]):
        raise CheckpointError(f"{where}: lora_alpha must be a positive number, got {config['lora_alpha']!r}")
    dropout = config.get("lora_dropout") or 0.0
    if not (dropout == 0.0 or _positive(dropout) and dropout < 1):
        raise CheckpointError(f"{where}: lora_dropout must be a number in [0, 1), got {dropout!r}")
    patterns = config.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise CheckpointError(f"{where}: alpha_pattern must be an object {{regex: alpha}}, got {patterns!r}")
    for key, value in patterns.items():
        try:
            re.compile(key)
        except re.error as exc:
            raise CheckpointError(f"{where}: alpha_pattern key '{key}' is not a valid regular expression ({exc})") from None
        if not _positive(value):
            raise CheckpointError(f"{where}: alpha_pattern '{key}' must be a positive number, got {value!r}")
    saved = config.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(m, str) for m in saved)):
        raise CheckpointError(f"{where}: modules_to_save must be a list of module names, got {saved!r}")


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's rule: the first key K with ``(.*\\.)?(K)$`` matching the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _split_lora(tensors: dict[str, torch.Tensor], modules_to_save: list[str]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """{module: {"A": .., "B": ..}} and the modules_to_save tensors, by native names."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, torch.Tensor] = {}
    pattern = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
    for key, value in tensors.items():
        match = pattern.match(key)
        if match:
            pairs.setdefault(match["module"], {})[match["which"]] = value
            continue
        clean = re.sub(r"\.modules_to_save(\.[^.]+)?\.", ".", key)
        module = clean.rsplit(".", 1)[0]
        if any(module == m or module.endswith(f".{m}") for m in modules_to_save):
            saved[clean] = value
        else:
            raise CheckpointError(f"PEFT tensor '{key}' is neither a LoRA factor nor part of modules_to_save {modules_to_save}")
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise CheckpointError(f"PEFT module '{module}' has lora_{next(iter(pair))} but not its partner")
    return pairs, saved


def import_peft(directory: str | Path, base_spec: Any = None, registry: Any = None, method: str | None = None, check_base: bool = True) -> nn.Module:
    """A built adaptkit model that computes what ``PeftModel.from_pretrained(plain, directory)`` does.

    ``base_spec`` (a spec, dict or YAML path) names the backbone, task and data the adapter
    belongs to; its methods are replaced. Without it, the spec in the directory's
    ``adaptkit.json`` (written by :func:`export_peft`) is used. ``method`` picks the
    low-rank method plugin when several offer ``for_layers``. The returned model's
    ``model.adaptkit.spec`` is the imported spec (``save_adapter`` writes a normal adapter).
    """
    directory = Path(directory)
    config, tensors = read_peft_dir(directory)
    return import_lora(config, tensors, directory, base_spec, registry=registry, method=method, check_base=check_base)


def import_lora(config: dict[str, Any], tensors: dict[str, torch.Tensor], directory: Path, base_spec: Any = None,
                registry: Any = None, method: str | None = None, check_base: bool = True) -> nn.Module:
    """:func:`import_peft` of a PEFT config and tensors already read (native module names, no
    ``base_model.model.``), from ``directory`` (its ``adaptkit.json`` is read when present):
    the door for other LoRA file formats, which translate their files into these two."""
    from adaptkit.builder import build
    from adaptkit.registry import registry as default_registry
    from adaptkit.spec import RunSpec, load_spec, stored_spec

    reg = registry or default_registry()
    ours = _adaptkit_info(directory)
    if base_spec is None:
        if ours is None or "spec" not in ours:
            raise CompatibilityError(
                f"{directory} was not exported by adaptkit (no {ADAPTKIT_FILE}); pass the spec of the base model it "
                "belongs to (backbone, task, data), e.g. `adaptkit import DIR OUT --spec base.yaml`"
            )
        base_spec = stored_spec(ours["spec"], str(directory / ADAPTKIT_FILE))
    spec = load_spec(base_spec, registry=reg) if not isinstance(base_spec, RunSpec) else base_spec
    spec = load_spec({**spec.to_dict(), "methods": []}, registry=reg)
    record = _low_rank_record(reg, method)
    base = build(spec, registry=reg)
    if check_base and ours is not None and ours.get("base_fingerprint") not in (None, base.adaptkit.base_fingerprint):
        raise CheckpointError(
            f"{directory}: the adapter was exported from other base weights (fingerprint {ours['base_fingerprint']}, "
            f"this spec's base is {base.adaptkit.base_fingerprint}); give the spec of the base it was trained on"
        )
    native = native_copy(base)
    pairs, saved = _split_lora(tensors, list(config.get("modules_to_save") or []))
    by_native = _our_layers(base)
    use_rslora = bool(config.get("use_rslora", False))
    default_alpha = float(config.get("lora_alpha", 8))
    layers: dict[str, tuple[int, float]] = {}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    unmatched = sorted(m for m in pairs if _native_layer_name(native.model, m) not in by_native)
    if unmatched:
        raise CompatibilityError(
            f"{len(unmatched)} of the adapter's {len(pairs)} LoRA modules have no adaptable layer in backbone "
            f"'{spec.backbone.name}' ({getattr(spec.backbone, 'model', '')}), e.g. {', '.join(unmatched[:3])}; "
            "is the spec's backbone the adapter's base model?"
        )
    for module, pair in pairs.items():
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module.replace(".base_layer.out_proj", ""), default_alpha))
        native_name = _native_layer_name(native.model, module)
        layer = by_native[native_name]
        a, b = pair["A"], pair["B"]
        if a.ndim not in (2, 4) or b.ndim not in (2, 4) or a.shape[0] == 0:
            raise CheckpointError(
                f"PEFT module '{module}': lora_A has shape {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                "a LoRA's factors are (r, in[, kh, kw]) and (out, r[, 1, 1])"
            )
        rank = int(a.shape[0])
        if b.ndim == 4:
            b = b.flatten(1)
        if tuple(b.shape)[1] != rank:
            raise CheckpointError(f"PEFT module '{module}': lora_A has rank {rank} but lora_B has shape {tuple(pair['B'].shape)}")
        layers[layer] = (rank, alpha)
        factors[layer] = (a, b)
    if not layers:
        raise CheckpointError(f"{directory}: the adapter holds no LoRA factors")
    params = record.for_layers(layers, dropout=float(config.get("lora_dropout") or 0.0), use_rslora=use_rslora)
    methods = [params.model_dump(mode="json")]
    task_saved = set(native.task_modules.values())
    backbone_saved = sorted({key.rsplit(".", 1)[0] for key in saved} - task_saved)
    if backbone_saved:  # whole trained backbone modules (a class embedding): a method that trains exactly them
        unknown = [m for m in backbone_saved if m not in by_native]
        if unknown:
            raise CompatibilityError(
                f"PEFT modules_to_save '{unknown[0]}' is neither a task module nor an adaptable layer of backbone "
                f"'{spec.backbone.name}'; is the spec's backbone the adapter's base model?"
            )
        whole = _whole_module_record(reg)
        methods.append(whole.for_modules([by_native[m] for m in backbone_saved]).model_dump(mode="json"))
    model = build(load_spec({**spec.to_dict(), "methods": methods}, registry=reg), registry=reg)
    filled = set()
    with torch.no_grad():
        for applied in model.adaptkit.methods[:1]:
            for update in applied.low_rank_updates():
                a, b = factors[update.layer]
                if tuple(a.shape) != tuple(update.a.shape) or tuple(b.shape) != tuple(update.b.shape):
                    raise CheckpointError(
                        f"PEFT factors for {update.layer} have shapes {tuple(a.shape)} / {tuple(b.shape)}; the layer takes "
                        f"{tuple(update.a.shape)} / {tuple(update.b.shape)}"
                    )
                update.a.copy_(a)
                update.b.copy_(b)
                filled.add(update.layer)
    missing = sorted(set(factors) - filled)
    if missing:
        raise CompatibilityError(f"method '{record.name}' did not adapt {missing[0]} (and {len(missing) - 1} more)")
    _load_task_modules(model, native, saved)
    model.eval()
    return model


def _adaptkit_info(directory: Path) -> dict[str, Any] | None:
    path = directory / ADAPTKIT_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_bytes()[: 1 << 20])
    except ValueError:
        raise CheckpointError(f"{path}: not valid JSON") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(info).__name__}")
    return info


def _whole_module_record(reg: Any) -> Any:
    offering = [r for r in reg.records("method") if r.for_modules is not None]
    if not offering:
        raise CompatibilityError("the adapter trains whole backbone modules (modules_to_save) and no registered method can hold them (no for_modules in its record)")
    return offering[0]


def _low_rank_record(reg: Any, method: str | None) -> Any:
    if method is not None:
        record = reg.get("method", method)
        if record.for_layers is None:
            raise CompatibilityError(f"method '{method}' cannot hold imported LoRA factors (its record has no for_layers)")
        return record
    offering = [r for r in reg.records("method") if r.for_layers is not None]
    if len(offering) != 1:
        names = ", ".join(r.name for r in offering) or "none"
        raise CompatibilityError(f"{len(offering)} registered methods can hold LoRA factors ({names}); name one with method=")
    return offering[0]


def _our_layers(model: nn.Module) -> dict[str, str]:
    """{native name: our qualified name} for every adaptable layer of the backbone."""
    out: dict[str, str] = {}
    for tower in model.surface.towers.values():
        for name in tower.modules:
            if name.startswith("backbone."):
                try:
                    out[model.backbone.native_module_name(name[len("backbone."):])] = name
                except CompatibilityError:  # a part of the backbone the native model does not hold
                    continue
    return out


def _native_layer_name(native: nn.Module, module: str) -> str:
    """The native layer a PEFT LoRA module adapts (MultiheadAttention: its in_proj or out_proj)."""
    if module.endswith(".base_layer.out_proj"):
        return module.replace(".base_layer.out_proj", ".out_proj")
    try:
        target = native.get_submodule(module)
    except AttributeError:
        return module
    if isinstance(target, nn.MultiheadAttention):
        return f"{module}.in_proj_weight"
    return module


def _load_task_modules(model: nn.Module, native: NativeModel, saved: dict[str, torch.Tensor]) -> None:
    """Fill the task modules and the whole backbone modules of ``modules_to_save``."""
    theirs_to_ours = {**_our_layers(model), **{v: k for k, v in native.task_modules.items()}}
    own = dict(model.named_parameters())
    with torch.no_grad():
        for key, tensor in saved.items():
            module, pname = key.rsplit(".", 1)
            if module not in theirs_to_ours:
                raise CompatibilityError(
                    f"PEFT modules_to_save tensor '{key}' has no counterpart in the task model "
                    f"(the task places {sorted(native.task_modules.values()) or 'no modules'} in the plain model, "
                    "and it is no adaptable layer of the backbone)"
                )
            target = own.get(f"{theirs_to_ours[module]}.{pname}")
            if target is None:
                raise CheckpointError(f"PEFT tensor '{key}': the task's {theirs_to_ours[module]} has no parameter '{pname}'")
            if target.shape != tensor.shape:
                raise CheckpointError(
                    f"PEFT tensor '{key}' has shape {tuple(tensor.shape)}; the task's {theirs_to_ours[module]}.{pname} has "
                    f"{tuple(target.shape)} (a different number of classes?)"
                )
            target.copy_(tensor)
