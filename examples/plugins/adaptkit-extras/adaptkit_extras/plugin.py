"""The module the `adaptkit` entry point names: hooks returning typed records.

It imports only pydantic and adaptkit's torch-free modules, so `adaptkit plugins` and
`adaptkit validate` stay fast; torch and timm load inside the factories.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from adaptkit import BackboneRecord, ComponentParams, MethodRecord, PresetRecord, TowerInfo, hookimpl
from adaptkit.compat import require

CONVNEXT_ROLES = frozenset({"embed", "conv", "mlp.in", "mlp.out", "merge", "head"})


class Ia3Params(ComponentParams):
    """(IA)^3: rescale keys and values (output rows) and the MLP hidden activations (input of mlp.out)."""

    name: Literal["ia3"] = "ia3"
    scale_outputs: list[str] = Field(["attn.k", "attn.v"], description="roles whose outputs are rescaled")
    scale_inputs: list[str] = Field(["mlp.out"], description="roles whose inputs are rescaled")
    tower: str | list[str] = "all"


def check_ia3(params: Ia3Params, backbone: str, towers: Any) -> list[str]:
    from adaptkit.compat import tower_names

    names = tower_names(params.tower, towers) or []
    available = set().union(*(towers[n].roles for n in names)) if names else set()
    wanted = [r for r in params.scale_outputs + params.scale_inputs if r in available] or params.scale_outputs + params.scale_inputs
    return require("ia3", backbone, towers, params.tower, "layers", wanted)


def apply_ia3(params: Ia3Params, surface: Any, ctx: Any) -> Any:
    from adaptkit_extras._ia3 import apply

    return apply(params, surface)


class ConvNextParams(ComponentParams):
    """A timm ConvNeXt: a preset or any timm ConvNeXt name."""

    name: Literal["convnext"] = "convnext"
    model: str = Field("convnext_tiny_digits", description="a convnext preset or a timm ConvNeXt name")
    pretrained: bool | str = Field(False, description="false, a local weights file, or a hub tag (needs a network)")
    in_chans: int | None = Field(None, gt=0, le=64)
    drop_path_rate: float = Field(0.0, ge=0, lt=1)


def build_convnext(params: ConvNextParams, ctx: Any) -> Any:
    from adaptkit_extras._convnext import ConvNextBackbone

    return ConvNextBackbone.create(params, ctx)


@hookimpl
def adaptkit_methods() -> list[MethodRecord]:
    return [
        MethodRecord(
            name="ia3", params=Ia3Params, factory=apply_ia3, check=check_ia3,
            summary="(IA)^3: learned rescaling of keys, values and MLP activations; identity at start; mergeable",
            recommended={"lr": 3e-2, "weight_decay": 0.0}, example={},
        )
    ]


@hookimpl
def adaptkit_backbones() -> list[BackboneRecord]:
    return [
        BackboneRecord(
            name="convnext", params=ConvNextParams, factory=build_convnext,
            summary="timm ConvNeXt (depthwise 7x7 convs, inverted-bottleneck MLPs); preset convnext_tiny_digits",
            towers={"vision": TowerInfo(sites=frozenset({"layers", "blocks"}), roles=CONVNEXT_ROLES)},
            capabilities=frozenset({"image_features"}),
            example={"backbone": {"name": "convnext", "model": "convnext_tiny_digits"},
                     "task": {"name": "classification"}, "data": {"name": "digits"}},
        )
    ]


@hookimpl
def adaptkit_presets() -> list[PresetRecord]:
    return [
        PresetRecord(
            name="convnext_tiny_digits", backbone="convnext", summary="ConvNeXt for 8x8 one-channel digits (113k params)",
            config={"arch": "convnext_atto", "kwargs": {"in_chans": 1, "depths": [1, 1, 2, 1], "dims": [16, 32, 48, 64], "patch_size": 1}},
        )
    ]
