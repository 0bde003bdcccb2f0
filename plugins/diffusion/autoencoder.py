"""Task ``autoencoder``: train the VAE of a latent diffusion pipeline (the first stage of latent diffusion).

A Stable Diffusion-style pipeline is trained in two stages: an autoencoder that maps
images to a small latent grid and back, then a UNet that denoises those latents. This
task trains the first stage of an ``sd_pipeline`` backbone: the VAE's encoder posterior
is sampled, decoded, and the reconstruction error plus ``kl_weight`` times the KL
divergence to N(0, I) is minimised (the KL-regularised autoencoder of Rombach et al.,
2022, without its perceptual and adversarial terms). Only the VAE is on this task's
surface, so ``full`` (or any method) with ``tower: vae`` or ``all`` trains the VAE alone.

The latents' scaling factor (Stable Diffusion's 0.18215: 1 / the latents' standard
deviation) is estimated while training, saved with the weights, and written into
``vae/config.json`` by ``adaptkit merge``, which makes the pipeline folder the UNet
stage then trains on.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from adaptkit.hookspecs import hookimpl
from adaptkit.params import ComponentParams
from adaptkit.records import TaskRecord
from adaptkit_plugins.diffusion.sd_pipeline import VAE_TOWER


class AutoencoderParams(ComponentParams):
    """Reconstruction + KL training of a pipeline's VAE."""

    name: Literal["autoencoder"] = "autoencoder"
    reconstruction: Literal["mse", "l1"] = Field("mse", description="per-pixel reconstruction loss")
    kl_weight: float = Field(
        1e-6, ge=0, allow_inf_nan=False,
        description="weight of the KL term, summed over latent elements, against the reconstruction error summed over "
        "pixels (Stable Diffusion's autoencoders: 1e-6)",
    )
    scaling_factor: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="the latents' scaling factor written to vae/config.json; default: estimated while training as "
        "1 / the standard deviation of the latents (a running average over the last ~100 steps)",
    )
    preview: int = Field(8, ge=0, description="validation images shown with their reconstructions in reconstructions.png (0: none)")


def build_autoencoder(params: AutoencoderParams, backbone: Any, data_info: Any, ctx: Any) -> Any:
    from adaptkit_plugins.diffusion._autoencoder_impl import AutoencoderModel

    return AutoencoderModel.create(params, backbone, data_info)


@hookimpl
def adaptkit_tasks() -> list[TaskRecord]:
    return [
        TaskRecord(
            name="autoencoder",
            params=AutoencoderParams,
            factory=build_autoencoder,
            summary="train a latent pipeline's VAE (reconstruction + KL); estimates the latents' scaling factor; "
            "adaptkit merge writes the pipeline folder",
            needs=frozenset({"autoencode"}),
            towers={"vae": VAE_TOWER},
            data_kinds=frozenset({"labelled_images", "captioned_images"}),
        )
    ]
