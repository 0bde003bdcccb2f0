"""Creating timm models from presets or names, and loading local weights (imports torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaptkit.checkpoint import check_pretrained_state, hub_directory, is_local_path, load_weights
from adaptkit.deferred import load_base_state
from adaptkit.errors import CheckpointError, PluginError, did_you_mean
from adaptkit.surface import LayerSite

#: prefixes under which adaptkit's own checkpoints store a timm backbone's weights
OWN_PREFIXES = ("backbone.net.", "net.")


def create(params: Any, ctx: Any, family: str, expected: type[nn.Module]) -> nn.Module:
    """Create the timm model a backbone's params name, with num_classes=0 (features only)."""
    import timm

    hub_dir = hub_directory(params.pretrained, HUB_CONFIG)
    pretrained_cfg: dict[str, Any] | None = None
    preset = None
    if hub_dir is not None:  # the directory's own config.json says what it holds
        arch, kwargs, pretrained_cfg = hub_config(hub_dir, params)
    else:
        preset = ctx.preset(params.model, params.name)
        if preset is not None:
            arch = preset.config["arch"]
            kwargs = dict(preset.config.get("kwargs") or {})
        else:
            arch, kwargs = params.model, {}
    for key in ("img_size", "in_chans"):
        if getattr(params, key) is not None:
            kwargs[key] = getattr(params, key)
    kwargs["drop_path_rate"] = params.drop_path_rate
    kwargs.update(params.kwargs)
    kwargs["num_classes"] = 0

    hub = params.pretrained if isinstance(params.pretrained, str) and not is_local_path(params.pretrained) else None
    use_hub = params.pretrained is True or hub is not None
    name = hub or arch
    if not use_hub and not timm.is_model(arch):
        known = [p.name for p in ctx.registry.presets(params.name)] + timm.list_models(f"*{family}*")
        raise PluginError(
            f"backbone.model: '{params.model}' is neither a {params.name} preset nor a timm model{did_you_mean(params.model, known)}; "
            f"presets: {', '.join(p.name for p in ctx.registry.presets(params.name))}"
        )
    if pretrained_cfg is not None:  # the checkpoint's preprocessing travels with it
        kwargs["pretrained_cfg"] = pretrained_cfg
    try:
        net = timm.create_model(name, pretrained=use_hub, **kwargs)
    except Exception as exc:  # kwargs timm rejects raise TypeError, ValueError, AssertionError...: none is a traceback
        if use_hub and isinstance(exc, (OSError, RuntimeError, ValueError)):
            raise CheckpointError(
                f"backbone.pretrained: could not fetch '{name}' from the hub ({type(exc).__name__}: {str(exc)[:160]}); "
                "without a network, pass a local weights file instead"
            ) from None
        raise PluginError(f"backbone: timm could not create '{arch}' with {kwargs}: {type(exc).__name__}: {exc}") from None
    if not isinstance(net, expected):
        raise PluginError(
            f"backbone.model: '{params.model}' is a timm {type(net).__name__}, not a {expected.__name__}; "
            f"use the matching backbone"
        )
    if isinstance(params.pretrained, str) and hub is None:
        load_local(net, params.pretrained)
    net.adaptkit_preset_preprocess = dict(preset.config.get("preprocess") or {}) if preset is not None else {}
    # how plain timm creates the same architecture (weights aside), for native export
    net.adaptkit_recipe = {"model_name": arch if hub is None else name,
                           **{k: v for k, v in kwargs.items() if k not in ("num_classes", "pretrained_cfg")}}
    return net


#: what a timm hub-layout checkpoint directory holds (``huggingface-cli download timm/...``, ``push_to_hf_hub``)
HUB_CONFIG = "config.json"


def hub_config(directory: Path, params: Any) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(architecture, create_model arguments, pretrained_cfg) of a timm hub-layout directory, read by
    timm's own parser; a ``model`` the spec names that is not the directory's architecture is an error."""
    from timm.models._hub import load_model_config_from_path

    try:
        pretrained_cfg, arch, model_args = load_model_config_from_path(directory)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"backbone.pretrained: {directory / HUB_CONFIG} is not a timm model config "
            f"({type(exc).__name__}: {str(exc)[:120]}); it needs 'architecture' and 'pretrained_cfg'"
        ) from None
    if "model" in params.model_fields_set and params.model != arch:
        raise PluginError(
            f"backbone.model: '{params.model}', but {directory / HUB_CONFIG} holds a '{arch}'; "
            "leave backbone.model out: the directory says what it holds"
        )
    # timm's loader fields (file, source) would send a later create_model(pretrained=True) to this directory
    pretrained_cfg = {k: v for k, v in pretrained_cfg.items() if k not in ("file", "source", "hf_hub_id")}
    return arch, dict(model_args), pretrained_cfg


def timm_input_config(net: nn.Module, in_chans: int, image_size: Any, preset_preprocess: dict[str, Any] | None) -> Any:
    """What timm says this model expects (``resolve_model_data_config``: the pretrained
    config's mean/std, interpolation and crop), at the size the model was built for.

    A preset may pin fields (``preprocess:`` in registry.yaml): the tiny digits presets
    keep adaptkit's [-1, 1] images.
    """
    from timm.data import resolve_model_data_config

    from adaptkit.data import InputConfig

    cfg = resolve_model_data_config(net)
    tag = (getattr(net, "pretrained_cfg", None) or {}).get("tag")
    arch = (getattr(net, "pretrained_cfg", None) or {}).get("architecture", type(net).__name__)
    source = f"timm pretrained_cfg of {arch}{'.' + tag if tag else ''}"
    size = tuple(image_size) if image_size is not None else tuple(cfg["input_size"][-2:])
    config = InputConfig(
        size=(int(size[0]), int(size[1])), channels=int(in_chans), mean=cfg["mean"], std=cfg["std"],
        interpolation=str(cfg.get("interpolation") or "bicubic"), crop_pct=float(cfg.get("crop_pct") or 1.0),
        crop_mode=str(cfg.get("crop_mode") or "center"), source=source,
    )
    if preset_preprocess:
        config = config.updated(**preset_preprocess, source=f"{source}; preset")
    return config


class TimmNative:
    """Native export for backbones that keep a timm model as ``self.net`` (mixed into Backbone)."""

    net: nn.Module

    def input_config(self) -> Any:
        """timm's data config of this model (see :func:`timm_input_config`)."""
        return timm_input_config(self.net, self.in_chans, self.image_size, getattr(self.net, "adaptkit_preset_preprocess", None))

    def native_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our names (``net.blocks.0.attn.qkv.weight``) -> timm's (``blocks.0.attn.qkv.weight``)."""
        return {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}

    def native_model(self) -> nn.Module:
        import timm

        recipe = dict(self.net.adaptkit_recipe)
        name = recipe.pop("model_name")
        return timm.create_model(name, pretrained=False, num_classes=0, **recipe)

    def native_recipe(self, native: nn.Module) -> dict[str, Any]:
        recipe = {**self.net.adaptkit_recipe, "num_classes": int(getattr(native, "num_classes", 0))}
        return {
            "library": "timm",
            "create_model": recipe,
            "python": "model = timm.create_model(**create_model); "
            "model.load_state_dict(safetensors.torch.load_file('model.safetensors'))",
            "python_base": "model = timm.create_model(**json.load(open('adaptkit.json'))['recipe']['create_model'])",
        }

    def native_classifier(self, native: nn.Module, head: nn.Linear) -> str | None:
        """timm keeps its classifier after pooling (``head`` on ViT, ``head.fc`` on Swin): reset it
        to our class count and copy our head in, so ``native(images)`` gives our logits."""
        native.reset_classifier(head.out_features)
        target = native.get_classifier()
        if not isinstance(target, nn.Linear) or target.in_features != head.in_features:
            return None
        with torch.no_grad():
            target.weight.copy_(head.weight)
            if head.bias is not None and target.bias is not None:
                target.bias.copy_(head.bias)
        return next(name for name, module in native.named_modules() if module is target)


def load_local(net: nn.Module, path: str) -> None:
    """Load a local weights file into a timm model, skipping the classifier head.

    Accepts timm's own key names and adaptkit checkpoints (``backbone.net.*``); a
    file lacking backbone weights, or holding foreign tensors, is a clear error.
    """
    state = load_weights(path, "backbone.pretrained")
    for prefix in OWN_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    own = net.state_dict()
    head_keys = [k for k in state if k.startswith(("head.", "fc.", "classifier."))]
    for key in head_keys:
        if key not in own:
            state.pop(key)
    check_pretrained_state(state, own, path)
    load_base_state(net, state)


def block_layer_sites(prefix: str, block: nn.Module) -> list[LayerSite]:
    """The layer sites of a timm transformer block (``attn.qkv``, ``attn.proj``, ``mlp.fc1/fc2``).

    q, k and v are row slices of the fused ``qkv``. ViT and Swin blocks share these names.
    """
    attn = block.attn
    width = attn.qkv.out_features // 3
    sites = [
        LayerSite(f"{prefix}.attn.qkv", role, attn.qkv, (j * width, (j + 1) * width))
        for j, role in enumerate(("attn.q", "attn.k", "attn.v"))
    ]
    return sites + [
        LayerSite(f"{prefix}.attn.proj", "attn.out", attn.proj),
        LayerSite(f"{prefix}.mlp.fc1", "mlp.in", block.mlp.fc1),
        LayerSite(f"{prefix}.mlp.fc2", "mlp.out", block.mlp.fc2),
    ]


def block_norms(block: nn.Module) -> list[nn.Module]:
    """The LayerNorms before attention and MLP of a timm ViT / Swin block (``norm1``, ``norm2``)."""
    return [n for n in (getattr(block, "norm1", None), getattr(block, "norm2", None)) if isinstance(n, nn.LayerNorm)]
