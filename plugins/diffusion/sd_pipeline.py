"""Backbone ``sd_pipeline``: a Stable Diffusion-style latent diffusion pipeline from a diffusers folder.

The folder has the layout of Stable Diffusion repositories: ``unet/`` (a
UNet2DConditionModel on VAE latents), ``vae/`` (AutoencoderKL, always frozen),
``text_encoder/`` and ``tokenizer/`` (transformers' CLIPTextModel / CLIPTokenizer) and
``scheduler/``. Training encodes images to latents (scaled by the VAE's scaling factor),
generation decodes them; prompts go through the pipeline's own tokenizer and text
encoder (last hidden states). Without ``pretrained`` a preset's tiny configs build one
with random weights (tests). transformers is imported only when the backbone is built.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from adaptkit.hookspecs import hookimpl
from adaptkit.params import BackboneParams
from adaptkit.records import BackboneRecord, TowerInfo
from adaptkit_plugins.diffusion.ddpm_unet import unet_tower_info

#: the roles of the pipeline's CLIP text encoder (the clip backbone's text tower has the same)
TEXT_ROLES = frozenset({"attn.q", "attn.k", "attn.v", "attn.out", "mlp.in", "mlp.out"})
SD_TOWERS = {
    "unet": unet_tower_info("UNet2DConditionModel", "text"),
    "text": TowerInfo(sites=frozenset({"layers", "blocks", "attention", "tokens", "text"}), roles=TEXT_ROLES, modality="text"),
}
#: the VAE, a tower of the ``autoencoder`` task only (every other task keeps it frozen)
VAE_TOWER = TowerInfo(sites=frozenset({"layers", "blocks", "attention"}),
                      roles=frozenset({"conv", "attn.q", "attn.k", "attn.v", "attn.out", "embed", "proj", "output"}), modality="image")


class SdPipelineParams(BackboneParams):
    """A diffusers pipeline folder (``pretrained``), or a preset's tiny configs with random weights."""

    name: Literal["sd_pipeline"] = "sd_pipeline"
    pretrained: str | None = Field(
        None, description="a diffusers pipeline folder with unet/, vae/, text_encoder/, tokenizer/ and scheduler/ "
        "(e.g. a downloaded Stable Diffusion 1.x/2.x repository, or one written by adaptkit merge)",
    )
    model: str = Field("sd_tiny", description="an sd_pipeline preset from registry.yaml: tiny configs used when pretrained is not given")


def build_sd_pipeline(params: SdPipelineParams, ctx: object) -> object:
    from adaptkit_plugins.diffusion._sd_pipeline_impl import SdPipelineBackbone

    return SdPipelineBackbone.create(params, ctx)


@hookimpl
def adaptkit_backbones() -> list[BackboneRecord]:
    return [
        BackboneRecord(
            name="sd_pipeline",
            params=SdPipelineParams,
            factory=build_sd_pipeline,
            summary="Stable Diffusion-style latent pipeline (diffusers folder: UNet + VAE + CLIP text encoder + tokenizer "
            "+ scheduler); preset sd_tiny",
            towers=SD_TOWERS,
            capabilities=frozenset({"denoise", "autoencode"}),
            example={
                "backbone": {"name": "sd_pipeline", "model": "sd_tiny"},
                "task": {"name": "text_to_image", "preview": 0, "steps": 2},
                "data": {"name": "digits_captions"},
            },
        )
    ]
