"""The built ``sd_pipeline`` backbone (imports torch, diffusers and transformers)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaptkit import deferred
from adaptkit.base_fingerprint import note_weights_file, safetensors_dtypes
from adaptkit.checkpoint import load_weights, refuse_non_finite_file
from adaptkit.deferred import load_base_state
from adaptkit.errors import CheckpointError
from adaptkit.surface import Surface
from adaptkit_plugins.diffusion import weights
from adaptkit_plugins.diffusion.clip_text import PipelineText
from adaptkit_plugins.diffusion.common import Condition, DiffusionBackbone, SamplerSettings, make_scheduler, repeat_condition
from adaptkit_plugins.diffusion.params import NoiseSchedule
from adaptkit_plugins.diffusion.surface import ContextTokenSite, diffusers_tower

WHERE = "backbone.pretrained"

#: the parts of a pipeline folder and what each holds
PARTS = {
    "unet": "the UNet2DConditionModel: config.json + diffusion_pytorch_model.safetensors",
    "vae": "the AutoencoderKL: config.json + diffusion_pytorch_model.safetensors",
    "text_encoder": "the CLIPTextModel: config.json + model.safetensors",
    "tokenizer": "the CLIPTokenizer: tokenizer.json, or vocab.json + merges.txt",
    "scheduler": "the scheduler: scheduler_config.json",
}
PART_FILES = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json", "scheduler": "scheduler_config.json"}


class PipelineModules(nn.Module):
    """The three networks of a pipeline under the pipeline's own component names (the native model of merges)."""

    def __init__(self, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder


class SdPipelineBackbone(DiffusionBackbone):
    """A latent diffusion pipeline: the UNet denoises VAE latents conditioned on CLIP text states.

    Its modules are named as the pipeline's components (``unet``, ``vae``, ``text_encoder``),
    so its state dict is the pipeline's. The VAE is never part of the surface: it stays frozen.
    """

    conditioning = "text"

    def __init__(self, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, tokenizer: Any,
                 scheduler_config: dict[str, Any], schedule: dict[str, Any]) -> None:
        super().__init__()
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.text = PipelineText(text_encoder, tokenizer)
        self.scheduler_config = scheduler_config
        self.schedule = schedule
        self.native_attention = text_encoder.config._attn_implementation
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        size = unet.config.sample_size
        latent = (size, size) if isinstance(size, int) else tuple(size)
        self.sample_shape = (unet.config.in_channels, *latent)
        self.image_size = tuple(side * self.vae_scale_factor for side in latent)
        self.in_chans = vae.config.in_channels
        vae.requires_grad_(False)

    @classmethod
    def create(cls, params: Any, ctx: Any) -> "SdPipelineBackbone":
        if params.pretrained:
            return cls.from_folder(Path(params.pretrained))
        from adaptkit_plugins.diffusion.tiny_pipeline import clip_tokenizer, preset_config, tiny_components

        config = preset_config(params.model)
        parts = tiny_components(config, seed=None)
        scheduler = parts["scheduler"]
        tokenizer = clip_tokenizer(int(config["text"]["max_position_embeddings"]))
        scheduler_config = {**dict(scheduler.config), "_class_name": type(scheduler).__name__}  # as a folder's config names it
        schedule = _schedule(scheduler_config, f"backbone.model: preset '{params.model}'")
        return cls(parts["unet"], parts["vae"], parts["text_encoder"], tokenizer, scheduler_config, schedule)

    @classmethod
    def from_folder(cls, folder: Path) -> "SdPipelineBackbone":
        check_pipeline_folder(folder)
        unet = weights.from_directory(folder / "unet", ("UNet2DConditionModel",), WHERE)
        vae = weights.from_directory(folder / "vae", ("AutoencoderKL",), WHERE)
        text_encoder, tokenizer = _load_text(folder)
        path = folder / "scheduler" / "scheduler_config.json"
        try:
            scheduler_config = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{WHERE}: {path} is not readable JSON ({exc})") from None
        if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
            raise CheckpointError(f"{WHERE}: {folder}: the UNet attends to {unet.config.cross_attention_dim}-d context, the text "
                                  f"encoder gives {text_encoder.config.hidden_size}-d states; the parts are from different pipelines")
        if unet.config.in_channels != vae.config.latent_channels:
            raise CheckpointError(f"{WHERE}: {folder}: the UNet takes {unet.config.in_channels}-channel latents, the VAE makes "
                                  f"{vae.config.latent_channels}; the parts are from different pipelines")
        return cls(unet, vae, text_encoder, tokenizer, scheduler_config, _schedule(scheduler_config, f"{WHERE}: {path}"))

    # ------------------------------------------------------------------ denoiser
    @property
    def denoiser(self) -> "SdPipelineBackbone":
        return self

    def predict_noise(self, x: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=cond["context"]).sample

    def condition(self, labels: torch.Tensor | None = None, prompts: list[str] | None = None,
                  images: torch.Tensor | None = None) -> Condition:
        if prompts is None:
            from adaptkit.errors import CompatibilityError

            raise CompatibilityError("this model is conditioned on text; give prompts")
        return {"context": self.text.encode(prompts)}

    def null_condition(self, n: int) -> Condition:
        return repeat_condition(self.condition(prompts=[""]), n)

    # ------------------------------------------------------------------ latents
    def target(self, batch: dict[str, Any]) -> torch.Tensor:
        """The VAE latents of the batch's images, sampled and scaled as diffusers' training scripts do."""
        with torch.no_grad():
            images = batch["images"].to(self.vae.device)
            latents = self.vae.encode(images).latent_dist.sample()
        return latents * self.vae.config.scaling_factor

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(x / self.vae.config.scaling_factor).sample.clamp(-1, 1)

    samplers = ("pipeline", "ddim", "ddpm", "euler", "dpmsolver++")

    def scheduler(self, settings: SamplerSettings) -> Any:
        return make_scheduler(self.schedule, settings, self.scheduler_config)

    # ------------------------------------------------------------------ surface
    def make_surface(self) -> Surface:
        cross = [m for m in self.unet.modules() if type(m).__name__ == "Attention" and m.is_cross_attention]
        unet = diffusers_tower(
            "unet", self.unet, "unet.", dim=self.unet.config.block_out_channels[-1],
            own_roles={"conv_in": "embed", "conv_out": "output"},
            tokens=ContextTokenSite(self.unet.config.cross_attention_dim, cross),
        )
        return Surface("sd_pipeline", {"unet": unet, "text": self.text.tower("text_encoder.")})

    def vae_tower(self) -> Any:
        """The VAE as a tower (on the surface of the ``autoencoder`` task only: every other task keeps it frozen)."""
        own = {"encoder.conv_in": "embed", "encoder.conv_out": "proj", "quant_conv": "proj", "post_quant_conv": "proj",
               "decoder.conv_in": "proj", "decoder.conv_out": "output"}
        return diffusers_tower("vae", self.vae, "vae.", dim=self.vae.config.block_out_channels[-1], own_roles=own)

    # ------------------------------------------------------------------ native (merge, export)
    native_side_modules = ()

    def native_model(self) -> nn.Module:
        text_config = copy.deepcopy(self.text_encoder.config)
        text_config._attn_implementation = self.native_attention  # not adaptkit's site attention
        return PipelineModules(type(self.unet).from_config(self.unet.config), type(self.vae).from_config(self.vae.config),
                               type(self.text_encoder)(text_config))

    def native_recipe(self, native: nn.Module) -> dict[str, Any]:
        return {"library": "diffusers", "class": "StableDiffusionPipeline",
                "python": "pipeline = diffusers.StableDiffusionPipeline.from_pretrained('<merged directory>')"}

    def native_pipeline(self, native: PipelineModules) -> Any:
        """A diffusers StableDiffusionPipeline of ``native``'s networks with this pipeline's tokenizer and scheduler."""
        import diffusers

        scheduler = getattr(diffusers, self.scheduler_config["_class_name"]).from_config(self.scheduler_config)
        return diffusers.StableDiffusionPipeline(
            unet=native.unet, vae=native.vae, text_encoder=native.text_encoder, tokenizer=self.text.tokenizer,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )

    def save_native(self, native: nn.Module, directory: Path, recipe: dict[str, Any]) -> list[str]:
        self.native_pipeline(native).save_pretrained(str(directory), safe_serialization=True)
        return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def check_pipeline_folder(folder: Path) -> None:
    """One clear error for a folder that is not a complete pipeline: which part is missing, where."""
    if not folder.is_dir():
        raise CheckpointError(f"{WHERE}: {folder} is not a directory; give a diffusers pipeline folder "
                              f"(with {', '.join(p + '/' for p in PARTS)})")
    for part, what in PARTS.items():
        sub = folder / part
        if not sub.is_dir():
            raise CheckpointError(f"{WHERE}: {folder} lacks {part}/ ({what}); a Stable Diffusion-style pipeline folder "
                                  f"has {', '.join(p + '/' for p in PARTS)}")
        needed = PART_FILES.get(part)
        if needed and not (sub / needed).is_file():
            raise CheckpointError(f"{WHERE}: {sub} lacks {needed} ({what})")
    tokenizer = folder / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file() and not ((tokenizer / "vocab.json").is_file() and (tokenizer / "merges.txt").is_file()):
        raise CheckpointError(f"{WHERE}: {tokenizer} lacks tokenizer.json (or vocab.json + merges.txt): {PARTS['tokenizer']}")


def _load_text(folder: Path) -> tuple[nn.Module, Any]:
    from transformers import CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as transformers_logging

    level, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()  # a tiny folder loads at once; our own messages say what is wrong
    found = folder / "text_encoder" / "model.safetensors"
    try:
        if deferred.active():
            text_encoder = _deferred_text_encoder(folder / "text_encoder", found)
        else:
            text_encoder = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{WHERE}: cannot load the text encoder or tokenizer of {folder}: {str(exc)[:300]}") from None
    finally:
        transformers_logging.set_verbosity(level)
        if bars:
            transformers_logging.enable_progress_bar()
    if not deferred.is_deferred(text_encoder):  # a deferred weight is checked when its rows are read
        if found.is_file():
            refuse_non_finite_file(text_encoder.state_dict(), found, f"{WHERE}: {folder}/text_encoder")
            note_weights_file(found, safetensors_dtypes(found))
        else:
            weights.check_finite_weights(text_encoder.state_dict(), f"{WHERE}: {folder}/text_encoder")
    return text_encoder.eval(), tokenizer


def _deferred_text_encoder(folder: Path, path: Path) -> nn.Module:
    """The CLIPTextModel of ``folder`` with its parameters on the meta device, each knowing where in
    ``model.safetensors`` its values lie (``train.strategy: fsdp``): built from its config, the file
    mapped strictly by :func:`load_base_state` (``from_pretrained`` would read every weight)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    if not path.is_file():
        raise deferred.CannotDefer(f"{folder} holds no model.safetensors to read by rows")
    model = CLIPTextModel._from_config(CLIPTextConfig.from_pretrained(str(folder), local_files_only=True))
    load_base_state(model, load_weights(path, f"{WHERE}: {folder}"))
    return model


def _schedule(config: dict[str, Any], where: str) -> dict[str, Any]:
    """The training noise schedule (diffusers' DDPM betas) of a pipeline's scheduler config."""
    return weights.scheduler_schedule(config, NoiseSchedule(), where).scheduler_config()
