"""Backbone ``unclip``: the DALL-E 2 recipe on open_clip + diffusers parts.

(1) a CLIP (the ``clip`` backbone), (2) a prior, diffusers' PriorTransformer, that
denoises a CLIP image embedding conditioned on the text's embedding and token
states, (3) a decoder UNet that denoises images conditioned on a CLIP image
embedding. Each stage trains in its own run (``stage: prior`` / ``stage: decoder``)
with the ``text_to_image`` task; generation runs text -> prior -> decoder, and image
variations decode an image's own embedding.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from adaptkit.hookspecs import hookimpl
from adaptkit.params import BackboneParams
from adaptkit.records import BackboneRecord, TowerInfo
from adaptkit_plugins.diffusion.ddpm_unet import unet_tower_info
from adaptkit_plugins.diffusion.params import NoiseSchedule, clip_towers, validate_clip_spec

PRIOR_ROLES = frozenset({"attn.q", "attn.k", "attn.v", "attn.out", "mlp.in", "mlp.out", "time", "embed", "output"})


class PriorSpec(BaseModel):
    """The prior: a PriorTransformer preset, its weights, its schedule and how it samples."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("unclip_prior_small", description="an unclip prior preset (arch PriorTransformer) from registry.yaml")
    pretrained: str | None = Field(None, description="a prior run's adapter.safetensors, a diffusers directory or a weights file")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="further PriorTransformer arguments")
    noise_schedule: NoiseSchedule = Field(default_factory=NoiseSchedule)
    steps: int = Field(25, gt=0, description="sampling steps of the prior when generating")
    guidance_scale: float = Field(4.0, ge=0, description="classifier-free guidance of the prior when generating")


class DecoderSpec(BaseModel):
    """The decoder: a UNet2DModel preset conditioned on the CLIP image embedding, and its weights."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("unclip_decoder_8", description="an unclip decoder preset (arch UNet2DModel) from registry.yaml")
    pretrained: str | None = Field(None, description="a decoder run's adapter.safetensors, a diffusers directory or a weights file")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="further UNet2DModel arguments")
    sample_size: int | None = Field(None, gt=0, description="image side; default: the preset's")
    in_channels: int | None = Field(None, gt=0, description="image channels; default: the preset's")
    noise_schedule: NoiseSchedule = Field(default_factory=NoiseSchedule)


class UnclipParams(BackboneParams):
    """unCLIP: CLIP + prior (text -> image embedding) + decoder (image embedding -> image)."""

    name: Literal["unclip"] = "unclip"
    clip: dict[str, Any] = Field(
        default_factory=lambda: {"model": "clip_tiny_digits"},
        description="the clip backbone (usually pretrained: a contrastive run's adapter.safetensors); frozen, "
        "except its text tower where a prior-stage method adapts it",
    )
    stage: Literal["prior", "decoder"] = Field("prior", description="which stage this run trains")
    prior: PriorSpec = Field(default_factory=PriorSpec)
    decoder: DecoderSpec = Field(default_factory=DecoderSpec)

    @field_validator("clip")
    @classmethod
    def _clip(cls, value: dict[str, Any]) -> dict[str, Any]:
        return validate_clip_spec(value, "clip")


def unclip_towers(params: UnclipParams) -> dict[str, TowerInfo]:
    """A stage's surface: its denoiser, plus (prior) the CLIP text tower that conditions it."""
    if params.stage == "prior":
        prior = TowerInfo(sites=frozenset({"layers", "blocks", "attention"}), roles=PRIOR_ROLES, modality="embedding")
        return {"prior": prior, **clip_towers(params.clip, ("text",))}
    return {"decoder": unet_tower_info("UNet2DModel", "image")}


def build_unclip(params: UnclipParams, ctx: Any) -> Any:
    from adaptkit_plugins.diffusion._unclip_impl import UnclipBackbone

    return UnclipBackbone.create(params, ctx)


@hookimpl
def adaptkit_backbones() -> list[BackboneRecord]:
    return [
        BackboneRecord(
            name="unclip",
            params=UnclipParams,
            factory=build_unclip,
            summary="unCLIP (DALL-E 2): CLIP + PriorTransformer prior + UNet decoder; stages train from YAML; "
            "text -> prior -> decoder generation and image variations",
            towers=unclip_towers,
            capabilities=frozenset({"denoise"}),
            example={
                "backbone": {"name": "unclip", "stage": "prior", "prior": {"model": "unclip_prior_tiny"},
                             "decoder": {"model": "unclip_decoder_tiny"}},
                "task": {"name": "text_to_image", "preview": 0},
                "data": {"name": "digits_captions"},
            },
        )
    ]
