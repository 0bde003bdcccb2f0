"""Backbone ``vit``: timm VisionTransformer with its adaptation surface."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from adaptkit.hookspecs import hookimpl
from adaptkit.records import BackboneRecord, TowerInfo
from adaptkit_plugins.timm.params import TimmParams

VIT_ROLES = frozenset({"attn.q", "attn.k", "attn.v", "attn.out", "mlp.in", "mlp.out", "embed", "head"})


class VitParams(TimmParams):
    """A timm Vision Transformer: a preset (``vit_tiny_digits``) or any timm ViT name."""

    name: Literal["vit"] = "vit"
    model: str = Field("vit_tiny_digits", description="a vit preset from registry.yaml or a timm ViT name")
    global_pool: Literal["token", "avg"] | None = Field(None, description="pooling: the [CLS] token or the mean of patch tokens")


def build_vit(params: VitParams, ctx: Any) -> Any:
    from adaptkit_plugins.timm._vit_impl import VitBackbone

    return VitBackbone.create(params, ctx)


@hookimpl
def adaptkit_backbones() -> list[BackboneRecord]:
    return [
        BackboneRecord(
            name="vit",
            params=VitParams,
            factory=build_vit,
            summary="timm VisionTransformer (patches -> encoder -> [CLS]); presets vit_tiny_digits, vit_tiny_32, vit_small_16",
            towers={"vision": TowerInfo(sites=frozenset({"layers", "blocks", "attention", "tokens"}), roles=VIT_ROLES)},
            capabilities=frozenset({"image_features"}),
            example={
                "backbone": {"name": "vit", "model": "vit_tiny_digits"},
                "task": {"name": "classification"},
                "data": {"name": "digits"},
            },
        )
    ]
