"""Backbone ``ddpm_unet``: a diffusers UNet that predicts the noise of a DDPM.

UNet2DModel for unconditional and class-conditional models; UNet2DConditionModel
(cross-attention) for models conditioned on a sequence of context vectors: learned
class tokens, or the token features of a ``clip`` backbone's text tower.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from adaptkit.hookspecs import hookimpl
from adaptkit.params import BackboneParams
from adaptkit.records import BackboneRecord, TowerInfo
from adaptkit_plugins.diffusion.params import NoiseSchedule, architecture_of, clip_towers, validate_clip_spec

ARCHITECTURES = ("UNet2DModel", "UNet2DConditionModel")

#: roles of every diffusers UNet; the cross-attention UNet adds the transformer-block ones
UNET_ROLES = frozenset({"attn.q", "attn.k", "attn.v", "attn.out", "conv", "time", "embed", "output"})
TRANSFORMER_ROLES = frozenset({"mlp.in", "mlp.out", "proj"})


class DdpmUnetParams(BackboneParams):
    """A diffusers UNet denoiser: a preset (``ddpm_unet_8``), or a class name plus ``kwargs``."""

    name: Literal["ddpm_unet"] = "ddpm_unet"
    model: str = Field("ddpm_unet_8", description="a ddpm_unet preset from registry.yaml, or UNet2DModel / UNet2DConditionModel")
    pretrained: str | None = Field(
        None,
        description="a local diffusers directory (config.json + weights, or a pipeline folder with unet/), "
        "a safetensors / weights-only torch file with diffusers or adaptkit key names, or a hub id (needs a network)",
    )
    conditioning: Literal["none", "class", "text"] = Field(
        "none", description="none; class (a label per image); text (captions through a clip text tower)"
    )
    num_classes: int | None = Field(None, gt=0, description="classes of a class-conditional model (one more row is the null class)")
    text_encoder: dict[str, Any] | None = Field(
        None, description="the clip backbone whose text tower encodes captions (conditioning: text), e.g. {model: clip_tiny_digits}"
    )
    sample_size: int | None = Field(None, gt=0, description="image side; default: the preset's")
    in_channels: int | None = Field(None, gt=0, description="image channels (also the output channels); default: the preset's")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="further constructor arguments of the diffusers UNet class")
    noise_schedule: NoiseSchedule = Field(default_factory=NoiseSchedule)

    @model_validator(mode="after")
    def _conditioning(self) -> "DdpmUnetParams":
        if self.conditioning == "class" and self.num_classes is None:
            raise ValueError("num_classes is required when conditioning is class")
        if self.conditioning != "class" and self.num_classes is not None:
            raise ValueError(f"num_classes only applies to conditioning: class (this model's conditioning is {self.conditioning})")
        if self.conditioning == "text" and not self.text_encoder:
            raise ValueError("conditioning: text needs text_encoder (a clip backbone, e.g. {model: clip_tiny_digits})")
        if self.conditioning != "text" and self.text_encoder:
            raise ValueError("text_encoder only applies to conditioning: text")
        if self.text_encoder:
            validate_clip_spec(self.text_encoder, "text_encoder")
        return self


def unet_tower_info(arch: str | None, conditioning: str) -> TowerInfo:
    """The sites and roles a UNet of class ``arch`` offers, known without building it."""
    cross = arch == "UNet2DConditionModel"
    roles = UNET_ROLES | (TRANSFORMER_ROLES if cross else frozenset())
    if conditioning == "class":
        roles |= {"class_embed"}
    sites = {"layers", "blocks", "attention"} | ({"tokens"} if cross else set())
    return TowerInfo(sites=frozenset(sites), roles=frozenset(roles), modality="image")


def ddpm_unet_towers(params: DdpmUnetParams) -> dict[str, TowerInfo]:
    arch = architecture_of(params.model, ARCHITECTURES)
    if params.conditioning == "text":
        arch = "UNet2DConditionModel"
    return {"unet": unet_tower_info(arch, params.conditioning), **clip_towers(params.text_encoder, ("text",))}


def build_ddpm_unet(params: DdpmUnetParams, ctx: Any) -> Any:
    from adaptkit_plugins.diffusion._ddpm_unet_impl import DdpmUnetBackbone

    return DdpmUnetBackbone.create(params, ctx)


@hookimpl
def adaptkit_backbones() -> list[BackboneRecord]:
    return [
        BackboneRecord(
            name="ddpm_unet",
            params=DdpmUnetParams,
            factory=build_ddpm_unet,
            summary="diffusers UNet noise predictor (DDPM/DDIM): unconditional, class- or text-conditioned; "
            "presets ddpm_unet_8, ddpm_unet_16, ddpm_unet_32, ddpm_unet_cross_8",
            towers=ddpm_unet_towers,
            capabilities=frozenset({"denoise"}),
            # the richest surface: cross-attention, context tokens and a CLIP text tower (class-conditional
            # UNet2DModels are covered by tests/test_diffusion_methods.py)
            example={
                "backbone": {"name": "ddpm_unet", "model": "ddpm_unet_cross_tiny", "conditioning": "text",
                             "text_encoder": {"model": "clip_tiny_digits"}},
                "task": {"name": "text_to_image", "preview": 0},
                "data": {"name": "digits_captions"},
            },
        )
    ]
