"""Parameters shared by the timm backbones (ViT, Swin). No torch import here."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from adaptkit.params import BackboneParams


class TimmParams(BackboneParams):
    model: str = Field(..., description="a preset from registry.yaml or any timm model name of this family")
    pretrained: bool | str = Field(
        False,
        description="false; a local weights file or directory (safetensors, or a torch state dict loaded with "
        "weights_only); true or a hub tag such as 'timm/vit_small_patch16_224.augreg_in21k' (needs a network)",
    )
    img_size: int | None = Field(None, gt=0, le=4096, description="input size; default: the preset's or the model's")
    in_chans: int | None = Field(None, gt=0, le=64, description="input channels; default: the preset's or the model's")
    drop_path_rate: float = Field(0.0, ge=0, lt=1, description="stochastic depth rate")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="further keyword arguments for timm.create_model")
