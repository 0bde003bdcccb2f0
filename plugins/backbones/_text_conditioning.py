"""Text conditioning through a ``clip`` backbone's text tower (imports torch)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from adaptkit.errors import PluginError
from adaptkit.surface import Tower


class TextConditioner(nn.Module):
    """Encodes captions into the context sequence a cross-attention UNet attends to (GLIDE-style).

    ``encoder`` is a built ``clip`` backbone; its ``text`` tower joins the denoiser's
    surface, so methods can adapt it (``tower: text``) or leave it frozen.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    @classmethod
    def create(cls, spec: dict[str, Any], ctx: Any) -> "TextConditioner":
        reg = ctx.registry
        if "clip" not in reg.names("backbone"):
            raise PluginError("backbone.text_encoder: text conditioning needs the 'clip' backbone, which is not registered")
        raise PluginError("backbone.text_encoder: text conditioning through clip is not available yet")

    @property
    def width(self) -> int:
        raise NotImplementedError

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def towers(self, prefix: str) -> dict[str, Tower]:
        return {}
