"""Export format ``diffusers``: the LoRA file of Stable Diffusion-style pipelines, both ways.

``adaptkit export RUN OUT --format diffusers`` writes ``OUT/pytorch_lora_weights.safetensors``
with diffusers' key names (``unet.<module>.lora_A.weight`` / ``lora_B.weight``,
``text_encoder.<module>.lora_A.weight`` ...) and each component's rank and alpha in the
file's ``lora_adapter_metadata``, which ``StableDiffusionPipeline.load_lora_weights(OUT)``
reads. ``adaptkit import`` reads such files back, and the older forms diffusers' training
scripts wrote: ``<module>.lora.down/up.weight`` (UNet), ``lora_linear_layer.down/up``
(text encoder), attention-processor keys (``attn1.processor.to_q_lora.down.weight``),
network alphas (``<module>.alpha``) and transformers 4's ``text_model.`` names.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from adaptkit.errors import CheckpointError, CompatibilityError
from adaptkit.hookspecs import hookimpl
from adaptkit.records import ExportFormatRecord

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
COMPONENTS = ("unet", "text_encoder")

_FACTOR = re.compile(r"^(?P<module>.+?)\.(?:lora_(?P<ab>[AB])|lora\.(?P<old>down|up)|lora_linear_layer\.(?P<linear>down|up))\.weight$")
_PROCESSOR = re.compile(r"^(?P<parent>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<which>down|up)\.weight$")
_ALPHA = re.compile(r"^(?P<module>.+?)(?:\.lora)?\.alpha$")


# ------------------------------------------------------------------ export
def write_diffusers(model: Any, directory: Path, *, include_base: bool = False) -> list[str]:
    """Write ``model``'s LoRA (UNet and text encoder) as diffusers' ``pytorch_lora_weights.safetensors``."""
    from adaptkit.checkpoint import save_tensors
    from adaptkit.peft_format import PREFIX, peft_state
    from adaptkit_plugins.diffusion._sd_pipeline_impl import SdPipelineBackbone

    if not isinstance(model.backbone, SdPipelineBackbone):
        raise CompatibilityError(f"format diffusers holds the LoRA of an sd_pipeline run; this run's backbone is "
                                 f"'{model.backbone.registered_name}' (export it with --format peft)")
    if include_base:
        raise CompatibilityError("--include-base: diffusers' LoRA file holds the LoRA only; `adaptkit merge RUN OUT` "
                                 "writes the whole pipeline folder")
    from adaptkit_plugins.methods.prompt import learns_words

    words = [method for method in model.adaptkit.methods if learns_words(method)]
    if len(words) == len(model.adaptkit.methods):  # textual inversion alone: the learned words are the export
        config, tensors = {}, {}
    else:
        config, tensors, _ = peft_state(model, skip=words)
    if config.get("modules_to_save"):
        raise CompatibilityError(f"the run trained whole modules ({', '.join(config['modules_to_save'][:3])}), which diffusers' "
                                 "LoRA file cannot hold; merge the run (`adaptkit merge`) instead")
    out: dict[str, Any] = {}
    metadata: dict[str, Any] = {}
    for component in COMPONENTS:
        prefix = f"{PREFIX}{component}."
        own = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
        if not own:
            continue
        out.update({f"{component}.{key}": value.contiguous() for key, value in own.items()})
        targets = sorted(key[: -len(".lora_A.weight")] for key in own if key.endswith(".lora_A.weight"))
        ranks = {t: int(own[f"{t}.lora_A.weight"].shape[0]) for t in targets}
        alphas = {t: _alpha_of(config, f"{component}.{t}") for t in targets}
        r = Counter(ranks.values()).most_common(1)[0][0]
        alpha = Counter(alphas.values()).most_common(1)[0][0]
        component_config = {
            "r": r, "lora_alpha": alpha, "target_modules": targets,
            "rank_pattern": {re.escape(t): v for t, v in ranks.items() if v != r},
            "alpha_pattern": {re.escape(t): v for t, v in alphas.items() if v != alpha},
        }
        metadata.update({f"{component}.{key}": value for key, value in component_config.items()})
    files = []
    if out:
        save_tensors(directory / WEIGHT_NAME, out, {"format": "pt", "lora_adapter_metadata": json.dumps(metadata)})
        files.append(WEIGHT_NAME)
    files += _write_placeholders(model, directory)
    info = model.adaptkit
    (directory / "adaptkit.json").write_text(json.dumps({
        "spec": info.spec.to_dict(), "base_fingerprint": info.base_fingerprint, "files": files,
        "python": "pipeline = diffusers.StableDiffusionPipeline.from_pretrained(<base pipeline folder>); "
                  "pipeline.load_lora_weights('<this directory>')",
    }, indent=2) + "\n")
    return [*files, "adaptkit.json"]


def _alpha_of(config: dict[str, Any], target: str) -> float | int:
    """The alpha PEFT's config gives ``target`` (its alpha_pattern key is the escaped name, perhaps anchored)."""
    patterns = config.get("alpha_pattern") or {}
    for key in (re.escape(target), "^" + re.escape(target)):
        if key in patterns:
            return patterns[key]
    return config["lora_alpha"]


def _write_placeholders(model: Any, directory: Path) -> list[str]:
    """Textual-inversion words of the run (the ``prompt`` method with a placeholder), in the file
    diffusers' ``load_textual_inversion`` reads (one word per file)."""
    from adaptkit_plugins.methods.prompt import placeholder_embeddings, write_learned_embeds

    if not placeholder_embeddings(model):
        return []
    return [path.name for path in write_learned_embeds(model, directory)]


# ------------------------------------------------------------------ import
def is_diffusers_lora(source: Path) -> bool:
    source = Path(source)
    return (source / WEIGHT_NAME).is_file() if source.is_dir() else source.suffix == ".safetensors" and source.is_file()


def read_diffusers(source: Path, base_spec: Any, method: str | None = None) -> Any:
    """The adaptkit model of a diffusers LoRA file (or a folder holding ``pytorch_lora_weights.safetensors``)."""
    from adaptkit.checkpoint import load_tensors
    from adaptkit.peft_format import import_lora

    source = Path(source)
    path = source / WEIGHT_NAME if source.is_dir() else source
    tensors, file_metadata = load_tensors(path)
    metadata = _component_metadata(file_metadata.get("lora_adapter_metadata"), path)
    pairs, alphas = _factors(tensors, path)
    config_alphas = {}
    for module, pair in pairs.items():
        component = module.split(".", 1)[0]
        rank = int(pair["A"].shape[0])
        meta = metadata.get(component, {})
        alpha = alphas.get(module)
        if alpha is None and meta:
            alpha = _pattern_alpha(meta.get("alpha_pattern") or {}, module[len(component) + 1:], meta.get("lora_alpha", rank))
        config_alphas[re.escape(module)] = float(alpha if alpha is not None else rank)  # no alpha anywhere: alpha = rank
    rank = Counter(int(pair["A"].shape[0]) for pair in pairs.values()).most_common(1)[0][0]
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": float(rank), "alpha_pattern": config_alphas, "target_modules": sorted(pairs)}
    peft_tensors = {f"{module}.lora_{which}.weight": value for module, pair in pairs.items() for which, value in pair.items()}
    return import_lora(config, peft_tensors, source if source.is_dir() else source.parent, base_spec, method=method)


def _component_metadata(raw: str | None, path: Path) -> dict[str, dict[str, Any]]:
    """diffusers' ``lora_adapter_metadata`` ({"unet.r": 4, ...}) by component."""
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except ValueError:
        raise CheckpointError(f"{path}: its lora_adapter_metadata is not valid JSON") from None
    out: dict[str, dict[str, Any]] = {}
    for key, value in (flat.items() if isinstance(flat, dict) else ()):
        component, _, field = key.partition(".")
        out.setdefault(component, {})[field] = value
    return out


def _pattern_alpha(patterns: dict[str, Any], name: str, default: Any) -> Any:
    for key, value in patterns.items():  # PEFT's rule: the first key matching the name's end
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _native_name(module: str) -> str:
    """``unet.<module>`` / ``text_encoder.<module>`` as the pipeline's networks name it today."""
    component, _, rest = module.partition(".")
    if component not in COMPONENTS:  # the oldest diffusers files: UNet keys with no prefix
        component, rest = "unet", module
    if component == "text_encoder":
        rest = rest.removeprefix("text_model.")  # transformers 4 nested the CLIP text model one level deeper
    return f"{component}.{rest}"


def _factors(tensors: dict[str, Any], path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """{module: {"A": down, "B": up}} and the alphas some files store, by the pipeline's module names."""
    pairs: dict[str, dict[str, Any]] = {}
    alphas: dict[str, float] = {}
    for key, value in tensors.items():
        factor, processor, alpha = _FACTOR.match(key), _PROCESSOR.match(key), _ALPHA.match(key)
        if processor:
            proj = "to_out.0" if processor["proj"] == "to_out" else processor["proj"]
            module, which = f"{processor['parent']}.{proj}", "A" if processor["which"] == "down" else "B"
        elif factor:
            module = factor["module"]
            which = factor["ab"] or ("A" if (factor["old"] or factor["linear"]) == "down" else "B")
        elif alpha and value.numel() == 1:
            alphas[_native_name(alpha["module"])] = float(value)
            continue
        else:
            raise CheckpointError(f"{path}: key '{key}' is not a LoRA factor of diffusers' formats "
                                  "(<module>.lora_A/lora_B.weight, lora.down/up, lora_linear_layer.down/up, <module>.alpha)")
        pairs.setdefault(_native_name(module), {})[which] = value
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise CheckpointError(f"{path}: LoRA module '{module}' has only its {'down (A)' if 'A' in pair else 'up (B)'} factor")
    if not pairs:
        raise CheckpointError(f"{path}: holds no LoRA factors")
    return pairs, {m: a for m, a in alphas.items() if m in pairs}


@hookimpl
def adaptkit_export_formats() -> list[ExportFormatRecord]:
    return [ExportFormatRecord(
        name="diffusers", write=write_diffusers, read=read_diffusers, recognises=is_diffusers_lora,
        summary="diffusers' LoRA file of an sd_pipeline run: StableDiffusionPipeline.load_lora_weights(OUT)",
    )]
