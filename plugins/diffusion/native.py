"""Native export of the ``ddpm_unet`` backbone: plain diffusers UNets (imports torch and diffusers).

A merged model is written with diffusers' own ``save_pretrained`` (``config.json`` +
``diffusion_pytorch_model.safetensors``), so ``UNet2DModel.from_pretrained(dir)`` (or
``UNet2DConditionModel``) loads it without adaptkit. PEFT adapters go on the same plain
UNet. What belongs to adaptkit rather than to the UNet travels beside it or is refused:

- the learned class tokens of a class-conditional cross-attention UNet (``class_context``,
  an ``nn.Embedding`` whose row ``label`` is the one-token context) are written as
  ``class_context.safetensors``;
- the text tower of a text-conditioned UNet is a ``clip`` backbone, not part of the UNet:
  a method that adapts it cannot travel with the UNet (:meth:`native_module_name` says so).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaptkit.errors import CompatibilityError

CLASS_CONTEXT_FILE = "class_context.safetensors"


class DiffusersNative:
    """Mixed into DdpmUnetBackbone (which keeps the diffusers model as ``self.unet``)."""

    unet: nn.Module
    class_context: nn.Module | None
    native_side_modules = ("class_context",)

    def native_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """diffusers' own names for the UNet's tensors (what UNet2DModel.load_state_dict expects)."""
        return {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}

    def native_module_name(self, name: str) -> str:
        if not name.startswith("unet."):
            raise CompatibilityError(
                f"backbone 'ddpm_unet': {name} is not part of the diffusers UNet"
                + (" (the text encoder is a separate open_clip model)" if name.startswith("text.") else "")
                + "; only adaptations of the UNet (tower: unet) export to PEFT or merge into a plain diffusers model"
            )
        return name[len("unet."):]

    def native_model(self) -> nn.Module:
        return type(self.unet).from_config(self.unet.config)

    def native_recipe(self, native: nn.Module) -> dict[str, Any]:
        cls = type(native).__name__
        recipe: dict[str, Any] = {
            "library": "diffusers",
            "class": cls,
            "config": {k: v for k, v in dict(native.config).items() if not k.startswith("_")},
            "python": f"model = diffusers.{cls}.from_pretrained('<merged directory>')  # merged models; "
            f"for PEFT: diffusers.{cls}.from_config(config) and load the base weights",
            "python_base": f"model = diffusers.{cls}.from_config(json.load(open('adaptkit.json'))['recipe']['config'])",
        }
        if self.class_context is not None:
            recipe["class_context"] = (
                f"{CLASS_CONTEXT_FILE}: the context of class c is weight[c] as one token: "
                "encoder_hidden_states = weight[labels][:, None]"
            )
        return recipe

    def save_native(self, native: nn.Module, directory: Path, recipe: dict[str, Any]) -> list[str]:
        from adaptkit.checkpoint import save_tensors

        native.save_pretrained(str(directory), safe_serialization=True)
        files = ["config.json", "diffusion_pytorch_model.safetensors"]
        if self.class_context is not None:
            save_tensors(directory / CLASS_CONTEXT_FILE, {"weight": self.class_context.weight.detach()}, {"format": "pt"})
            files.append(CLASS_CONTEXT_FILE)
        return files
