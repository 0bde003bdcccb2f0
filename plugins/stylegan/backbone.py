"""Backbone ``stylegan2``: a StyleGAN2 generator in plain PyTorch (rosinality checkpoint layout)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from adaptkit.errors import CompatibilityError
from adaptkit.hookspecs import hookimpl
from adaptkit.params import BackboneParams
from adaptkit.records import BackboneRecord, TowerInfo

STYLEGAN2_TOWERS = {
    # the mapping MLP z -> w; its layers pair up as (mlp.in, mlp.out) blocks
    "mapping": TowerInfo(sites=frozenset({"layers", "blocks"}), roles=frozenset({"mlp.in", "mlp.out"}), modality="latent"),
    # the synthesis network: modulated 3x3 convs, their style (modulation) linears, ToRGB 1x1 convs
    "synthesis": TowerInfo(sites=frozenset({"layers", "blocks"}), roles=frozenset({"conv", "modulation", "to_rgb"})),
}


class StyleGan2Params(BackboneParams):
    """A StyleGAN2 generator: a preset, optionally with its fields overridden, and local weights."""

    name: Literal["stylegan2"] = "stylegan2"
    model: str = Field("stylegan2_tiny_16", description="a stylegan2 preset from registry.yaml (stylegan2_tiny_8/16/32, stylegan2_ffhq_256, ...)")
    pretrained: bool | str = Field(
        False,
        description="false, or a local generator file: a rosinality stylegan2-pytorch checkpoint (.pt with g_ema/g, "
        "loaded weights_only), a safetensors file in that layout, or an adaptkit stylegan2 run's generator.safetensors",
    )
    checkpoint_key: Literal["g_ema", "g"] = Field("g_ema", description="which generator of a rosinality checkpoint to load")
    size: int | None = Field(None, description="output resolution (a power of two >= 4); default: the preset's")
    style_dim: int | None = Field(None, gt=0, description="dimension of z and w; default: the preset's")
    n_mlp: int | None = Field(None, ge=2, description="layers of the mapping MLP; default: the preset's")
    channels: dict[int, int] | None = Field(None, description="channels per resolution, e.g. {4: 64, 8: 32}; default: the preset's")
    channel_multiplier: int | None = Field(None, gt=0, description="rosinality's channel multiplier (when channels is unset)")
    img_channels: Literal[1, 3] | None = Field(None, description="output image channels (1 for grayscale); default: the preset's")
    lr_mlp: float | None = Field(None, gt=0, description="learning-rate multiplier of the mapping MLP (0.01 in StyleGAN2)")

    @field_validator("pretrained")
    @classmethod
    def _pretrained(cls, value: bool | str) -> bool | str:
        if value is True:
            raise ValueError("there is no hub for StyleGAN2 weights here; give a local file (rosinality .pt or safetensors)")
        return value

    @field_validator("size")
    @classmethod
    def _size(cls, value: int | None) -> int | None:
        if value is not None and (value < 4 or value & (value - 1)):
            raise ValueError(f"size must be a power of two >= 4, got {value}")
        return value

    @model_validator(mode="after")
    def _channels_cover(self) -> "StyleGan2Params":
        if self.channels is not None and self.size is not None:
            missing = [2**i for i in range(2, self.size.bit_length()) if 2**i not in self.channels]
            if missing:
                raise ValueError(f"channels lacks resolutions {missing} (size {self.size} needs every power of two from 4)")
        return self


def build_stylegan2(params: StyleGan2Params, ctx: Any) -> Any:
    from adaptkit_plugins.stylegan.generator import StyleGan2Backbone

    refuse_sharding(ctx)
    return StyleGan2Backbone.create(params, ctx)


def refuse_sharding(ctx: Any) -> None:
    """A clear error for ``train.strategy: fsdp`` under torchrun: the generator computes every
    block's styles (StyleSpace) before running the blocks, outside the block's own forward, where
    FSDP gathers a block's weights; the sharded weights would reach the maths unsharded."""
    import torch.distributed as dist

    if ctx.spec.train.strategy == "fsdp" and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise CompatibilityError(
            "backbone 'stylegan2': train.strategy fsdp is not supported (the generator reads every block's style "
            "weights outside the block, where FSDP does not gather them); use train.strategy=ddp"
        )


@hookimpl
def adaptkit_backbones() -> list[BackboneRecord]:
    return [
        BackboneRecord(
            name="stylegan2",
            params=StyleGan2Params,
            factory=build_stylegan2,
            summary="StyleGAN2 generator in plain PyTorch (rosinality layout): mapping + modulated convs, W/W+, truncation; "
            "presets stylegan2_tiny_8/16/32",
            towers=STYLEGAN2_TOWERS,
            capabilities=frozenset({"style_generator"}),
            example={
                "backbone": {"name": "stylegan2", "model": "stylegan2_tiny_8"},
                "task": {"name": "stylegan2"},
                "data": {"name": "digits"},
            },
        )
    ]
