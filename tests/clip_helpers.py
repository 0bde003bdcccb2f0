"""Helpers for the CLIP tests: tiny backbones built directly, and simple prompt sources."""

from __future__ import annotations

import copy
from typing import Any


def tiny_clip(seed: int = 0, mean: tuple[float, ...] = (0.5,) * 3, std: tuple[float, ...] = (0.5,) * 3) -> tuple[Any, Any]:
    """(plain open_clip model, ClipBackbone built from a copy of it) for the clip_tiny_digits preset."""
    import open_clip
    import torch

    from adaptkit.registry import registry
    from adaptkit_plugins.clip.model import ClipBackbone, quiet_open_clip, register_model_config

    preset = registry().preset("clip_tiny_digits")
    register_model_config("clip_tiny_digits", dict(preset.config["model_cfg"]))
    torch.manual_seed(seed)
    with quiet_open_clip():
        native = open_clip.create_model("clip_tiny_digits")
    # break the symmetry of the fresh init (zero biases, unit norms) so that mistakes show
    with torch.no_grad():
        for p in native.parameters():
            p.add_(0.05 * torch.randn_like(p))
    native.eval()
    backbone = ClipBackbone(copy.deepcopy(native), open_clip.get_tokenizer("clip_tiny_digits"), mean, std).eval()
    return native, backbone


class FixedPrompts:
    """A PromptSource with given tokens (count, dim); ``deep`` ones are ``layers`` (layers, count, dim)."""

    def __init__(self, tokens: Any, deep: bool = False) -> None:
        self.t = tokens
        self.deep = deep
        self.count = tokens.shape[-2]

    def tokens(self, batch: int, layer: int) -> Any:
        t = self.t[layer] if self.deep else self.t
        return t.unsqueeze(0).expand(batch, -1, -1)
