"""Backbone ``clip``: an open_clip image-text model with a ``vision`` and a ``text`` tower."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from adaptkit.hookspecs import hookimpl
from adaptkit.params import BackboneParams
from adaptkit.records import BackboneRecord, TowerInfo

ATTENTION_ROLES = frozenset({"attn.q", "attn.k", "attn.v", "attn.out", "mlp.in", "mlp.out"})
CLIP_TOWERS = {
    "vision": TowerInfo(sites=frozenset({"layers", "blocks", "attention", "tokens"}), roles=ATTENTION_ROLES | {"embed"}),
    "text": TowerInfo(sites=frozenset({"layers", "blocks", "attention", "tokens", "text"}), roles=ATTENTION_ROLES, modality="text"),
}


class ClipParams(BackboneParams):
    """An open_clip model (ViT image tower + transformer text tower): a preset or an open_clip name."""

    name: Literal["clip"] = "clip"
    model: str = Field(
        "clip_tiny_digits",
        description="a clip preset from registry.yaml (clip_tiny_digits, clip_tiny_32) or an open_clip model name (ViT-B-32, ...)",
    )
    pretrained: bool | str = Field(
        False,
        description="false; a local weights file or directory (open_clip's own key names, or an adaptkit run's "
        "adapter.safetensors); or an open_clip pretrained tag such as 'openai' or 'laion2b_s34b_b79k' (needs a network)",
    )
    image_size: int | None = Field(None, gt=0, description="input size; default: the model's (open_clip force_image_size)")
    context_length: int | None = Field(None, gt=2, description="text context length; default: the model's")
    quick_gelu: bool = Field(False, description="QuickGELU activations (OpenAI's original weights were trained with them)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="further keyword arguments for open_clip.create_model")

    @field_validator("pretrained")
    @classmethod
    def _pretrained(cls, value: bool | str) -> bool | str:
        if value is True:
            raise ValueError("give a local weights file or an open_clip pretrained tag (e.g. 'openai'), not true")
        return value


def build_clip(params: ClipParams, ctx: Any) -> Any:
    from adaptkit_plugins.clip.model import ClipBackbone

    return ClipBackbone.create(params, ctx)


@hookimpl
def adaptkit_backbones() -> list[BackboneRecord]:
    return [
        BackboneRecord(
            name="clip",
            params=ClipParams,
            factory=build_clip,
            summary="open_clip CLIP: vision + text towers in one embedding space; presets clip_tiny_digits, clip_tiny_32, or ViT-B-32 etc.",
            towers=CLIP_TOWERS,
            capabilities=frozenset({"image_features", "text_features"}),
            example={
                "backbone": {"name": "clip", "model": "clip_tiny_digits"},
                "task": {"name": "zero_shot"},
                "data": {"name": "digits"},
            },
        )
    ]
