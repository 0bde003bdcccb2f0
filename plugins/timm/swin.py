"""Backbone ``swin``: timm SwinTransformer (shifted-window attention) with its adaptation surface.

Swin partitions its tokens into windows, so it has no token site: prompt tuning
reaches it through the attention sites (prompt keys/values join every window),
which equals VPT-deep.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from adaptkit.hookspecs import hookimpl
from adaptkit.records import BackboneRecord, TowerInfo
from adaptkit_plugins.timm.params import TimmParams

SWIN_ROLES = frozenset({"attn.q", "attn.k", "attn.v", "attn.out", "mlp.in", "mlp.out", "merge", "embed", "head"})


class SwinParams(TimmParams):
    """A timm Swin Transformer: a preset (``swin_tiny_digits``) or any timm Swin name."""

    name: Literal["swin"] = "swin"
    model: str = Field("swin_tiny_digits", description="a swin preset from registry.yaml or a timm Swin name")


def build_swin(params: SwinParams, ctx: Any) -> Any:
    from adaptkit_plugins.timm._swin_impl import SwinBackbone

    return SwinBackbone.create(params, ctx)


@hookimpl
def adaptkit_backbones() -> list[BackboneRecord]:
    return [
        BackboneRecord(
            name="swin",
            params=SwinParams,
            factory=build_swin,
            summary="timm SwinTransformer (shifted windows, patch merging, mean pool); "
            "presets swin_tiny_digits, swin_tiny_32, swin_tiny_224",
            towers={"vision": TowerInfo(sites=frozenset({"layers", "blocks", "attention"}), roles=SWIN_ROLES)},
            capabilities=frozenset({"image_features"}),
            example={
                "backbone": {"name": "swin", "model": "swin_tiny_digits"},
                "task": {"name": "classification"},
                "data": {"name": "digits"},
            },
        )
    ]
