"""Text conditioning through a ``clip`` backbone's text tower (imports torch)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from adaptkit.surface import Tower


def build_clip(spec: dict[str, Any], ctx: Any, where: str) -> nn.Module:
    """Build the ``clip`` backbone a nested spec describes (``{model: clip_tiny_digits, pretrained: ...}``)."""
    from adaptkit.builder import build_nested_backbone

    return build_nested_backbone(spec, ctx, where, name="clip")


class TextConditioner(nn.Module):
    """Encodes captions into the context sequence a cross-attention UNet attends to (GLIDE-style).

    ``encoder`` is a built ``clip`` backbone: the context is its text tower's final token
    states, with a mask that hides the padding after each text's end token. The text
    tower joins the denoiser's surface, so methods can adapt it (``tower: text``), and
    its text site rewrites every prompt (``system_prompt``); by default it stays frozen.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    @classmethod
    def create(cls, spec: dict[str, Any], ctx: Any) -> "TextConditioner":
        return cls(build_clip(spec, ctx, "backbone.text_encoder"))

    @property
    def width(self) -> int:
        """Width of the token states (the UNet's cross_attention_dim)."""
        return int(self.encoder.text_tokens.dim)

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        _, states, mask = self.encoder.encode_text_tokens(list(prompts))
        return {"context": states, "mask": mask}

    def towers(self, prefix: str) -> dict[str, Tower]:
        return {"text": self.encoder.surface.towers["text"].prefixed(prefix + "encoder.")}
