"""The built ``ddpm_unet`` backbone (imports torch and diffusers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaptkit.errors import CompatibilityError, PluginError
from adaptkit.surface import LayerSite, Surface
from adaptkit_plugins.diffusion import weights
from adaptkit_plugins.diffusion.native import DiffusersNative
from adaptkit_plugins.diffusion.surface import ContextTokenSite, diffusers_tower
from adaptkit_plugins.diffusion.common import Condition, DiffusionBackbone, repeat_condition
from adaptkit_plugins.diffusion.text_conditioning import TextConditioner
from adaptkit_plugins.diffusion.ddpm_unet import ARCHITECTURES

WHERE = "backbone.pretrained"


class DdpmUnetBackbone(DiffusersNative, DiffusionBackbone):
    """A diffusers UNet noise predictor with its conditioning.

    - ``UNet2DModel``: unconditional, or class labels through its class embedding
      (row ``num_classes`` is the null class of classifier-free guidance);
    - ``UNet2DConditionModel``: a context sequence through cross-attention: a learned
      token per class (``class_context``), or a ``clip`` text tower's token features.
    """

    def __init__(self, unet: nn.Module, conditioning: str, num_classes: int, schedule: dict[str, Any],
                 text: TextConditioner | None = None) -> None:
        super().__init__()
        self.unet = unet
        self.conditioning = conditioning
        self.num_classes = num_classes
        self.schedule = schedule
        self.cross = type(unet).__name__ == "UNet2DConditionModel"
        config = unet.config
        size = config.sample_size
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        self.in_chans = config.in_channels
        self.sample_shape = (config.in_channels, *self.image_size)
        self.class_context = nn.Embedding(num_classes + 1, config.cross_attention_dim) if conditioning == "class" and self.cross else None
        self.text = text

    @classmethod
    def create(cls, params: Any, ctx: Any) -> "DdpmUnetBackbone":
        pretrained = params.pretrained
        local = bool(pretrained) and not weights.is_hub_repo(pretrained)
        folder = weights.is_diffusers_directory(Path(pretrained), "unet") if local else None
        text = TextConditioner.create(params.text_encoder, ctx) if params.conditioning == "text" else None
        num_classes = params.num_classes or 0
        if folder is None:  # else the directory's config.json says what it holds
            arch, kwargs = weights.resolve_architecture(params, ctx, ARCHITECTURES)
            _check_architecture(arch, params, params.model)
            if params.sample_size is not None:
                kwargs["sample_size"] = params.sample_size
            if params.in_channels is not None:
                kwargs["in_channels"] = kwargs["out_channels"] = params.in_channels
            if text is not None:
                kwargs["cross_attention_dim"] = text.width
            if params.conditioning == "class" and arch == "UNet2DModel":
                kwargs["num_class_embeds"] = num_classes + 1
        schedule = params.noise_schedule
        if folder is not None:
            unet = weights.from_directory(folder, ARCHITECTURES, WHERE)
            if "noise_schedule" not in params.model_fields_set:  # a pipeline folder's scheduler travels with it
                schedule = weights.pipeline_schedule(folder, schedule, WHERE)
        elif pretrained and not local:
            unet = weights.from_hub(pretrained, arch, "unet", WHERE)
        else:
            unet = weights.construct(arch, kwargs, "backbone")
        if folder is not None or (pretrained and not local):  # a saved model: check it fits the conditioning
            _check_architecture(type(unet).__name__, params, str(folder or pretrained))
            _check_loaded(unet, params, num_classes, text)
        backbone = cls(unet, params.conditioning, num_classes, schedule.scheduler_config(), text)
        if local and folder is None:
            weights.load_into(backbone, pretrained, "unet.", ("unet.", "class_context."), WHERE)
        return backbone

    # ------------------------------------------------------------------ denoiser
    @property
    def denoiser(self) -> "DdpmUnetBackbone":
        return self

    def predict_noise(self, x: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        if self.cross:
            if "labels" in cond:
                context, mask = self.class_context(cond["labels"])[:, None], None
            else:
                context, mask = cond["context"], cond.get("mask")
            return self.unet(x, t, encoder_hidden_states=context, encoder_attention_mask=mask).sample
        return self.unet(x, t, class_labels=cond.get("labels")).sample

    def condition(self, labels: torch.Tensor | None = None, prompts: list[str] | None = None,
                  images: torch.Tensor | None = None) -> Condition:
        if self.conditioning == "class":
            if labels is None:
                raise CompatibilityError("this model is conditioned on class labels; give classes")
            return {"labels": labels.to(self.unet.device)}
        if self.conditioning == "text":
            if prompts is None:
                raise CompatibilityError("this model is conditioned on text; give prompts")
            return self.text.encode(prompts)
        return {}

    def null_condition(self, n: int) -> Condition:
        if self.conditioning == "class":
            return {"labels": torch.full((n,), self.num_classes, dtype=torch.long, device=self.unet.device)}
        if self.conditioning == "text":
            return repeat_condition(self.text.encode([""]), n)
        return {}

    # ------------------------------------------------------------------ surface
    def make_surface(self) -> Surface:
        config = self.unet.config
        own_roles = {"conv_in": "embed", "conv_out": "output"}
        embeddings = []
        if getattr(self.unet, "class_embedding", None) is not None:
            own_roles["class_embedding"] = "class_embed"
            embeddings.append("class_embedding.weight")
        tokens = None
        if self.cross:
            cross = [m for m in self.unet.modules() if type(m).__name__ == "Attention" and m.is_cross_attention]
            tokens = ContextTokenSite(config.cross_attention_dim, cross)
        unet = diffusers_tower(
            "unet", self.unet, "unet.", dim=config.block_out_channels[-1], own_roles=own_roles, embeddings=embeddings,
            extra_prefixes=["class_context."] if self.class_context is not None else [], tokens=tokens,
        )
        if self.class_context is not None:
            unet.layers.append(LayerSite("class_context", "class_embed", self.class_context))
            unet.modules["class_context"] = self.class_context
            unet.embeddings.append("class_context.weight")
        towers = {"unet": unet}
        if self.text is not None:
            towers.update(self.text.towers("text."))
        return Surface("ddpm_unet", towers)


def _check_architecture(arch: str, params: Any, source: str) -> None:
    """``source`` (the preset, directory or hub id the UNet comes from) names it in the messages."""
    if params.conditioning == "text" and arch != "UNet2DConditionModel":
        raise PluginError(
            f"backbone.model: conditioning: text needs a cross-attention UNet (UNet2DConditionModel, e.g. preset "
            f"ddpm_unet_cross_8); '{source}' is a {arch}"
        )
    if params.conditioning == "none" and arch == "UNet2DConditionModel":
        raise PluginError(f"backbone.conditioning: '{source}' is a cross-attention UNet; condition it on class or text")


def _check_loaded(unet: nn.Module, params: Any, num_classes: int, text: TextConditioner | None) -> None:
    """A UNet loaded from a directory or the hub must match the spec's conditioning."""
    config = unet.config
    if params.conditioning == "class" and type(unet).__name__ == "UNet2DModel" and config.num_class_embeds != num_classes + 1:
        raise CompatibilityError(
            f"backbone.num_classes: the UNet has {config.num_class_embeds or 0} class embeddings; a model for "
            f"{num_classes} classes needs {num_classes + 1} (one per class plus the null class)"
        )
    if text is not None and config.cross_attention_dim != text.width:
        raise CompatibilityError(
            f"backbone.text_encoder: the UNet attends to {config.cross_attention_dim}-d context, the text tower gives {text.width}-d tokens"
        )
