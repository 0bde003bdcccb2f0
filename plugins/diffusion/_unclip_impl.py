"""The built ``unclip`` backbone (imports torch, diffusers and open_clip)."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adaptkit.checkpoint import is_local_path
from adaptkit.errors import CheckpointError, CompatibilityError
from adaptkit.surface import LayerSite, Surface
from adaptkit_plugins.diffusion import weights
from adaptkit_plugins.diffusion.surface import diffusers_tower
from adaptkit_plugins.diffusion.common import (
    Condition,
    DiffusionBackbone,
    SamplerSettings,
    repeat_condition,
    sample,
    too_many_steps,
)
from adaptkit_plugins.diffusion.text_conditioning import build_clip


class PriorDenoiser:
    """The prior as a denoiser: x is a (scaled) CLIP image embedding, the condition the text."""

    def __init__(self, owner: "UnclipBackbone", schedule: dict[str, Any]) -> None:
        self.owner, self.schedule = owner, schedule
        self.sample_shape = (owner.embed_dim,)

    def predict_noise(self, x: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        prior = self.owner.prior
        tokens = self.owner.token_proj(cond["tokens"])
        return prior(x, t, proj_embedding=cond["text_embed"], encoder_hidden_states=tokens,
                     attention_mask=cond["mask"]).predicted_image_embedding

    def null_condition(self, n: int) -> Condition:
        return repeat_condition(self.owner.text_condition([""]), n)


class DecoderDenoiser:
    """The decoder as a denoiser: the condition is a (scaled) CLIP image embedding; its null is zeros."""

    def __init__(self, owner: "UnclipBackbone", schedule: dict[str, Any]) -> None:
        self.owner, self.schedule = owner, schedule
        self.sample_shape = owner.sample_shape

    def predict_noise(self, x: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        return self.owner.decoder(x, t, class_labels=self.owner.image_proj(cond["image_embed"])).sample

    def null_condition(self, n: int) -> Condition:
        return {"image_embed": torch.zeros(n, self.owner.embed_dim, device=self.owner.image_proj.weight.device)}


class UnclipBackbone(DiffusionBackbone):
    """CLIP + prior + decoder (see plugins/diffusion/unclip.py).

    Embeddings enter both denoisers L2-normalised and scaled by sqrt(dim), so each of
    their coordinates has unit variance, as the noise has. The CLIP's image side stays
    frozen (both stages live in its embedding space); in the prior stage its text tower is
    on the surface, so a method may adapt how captions are read (``tower: text``).
    """

    accepts_images = True

    def __init__(self, clip: nn.Module, prior: nn.Module, decoder: nn.Module, stage: str, params: Any) -> None:
        super().__init__()
        self.clip = clip
        self.prior = prior
        self.decoder = decoder
        self.stage = stage
        self.embed_dim = int(clip.feature_dim)
        self.text_width = int(clip.text_tokens.dim)
        prior_dim = int(prior.config.embedding_dim)
        # the prior reads text token states of its own embedding width
        self.token_proj = nn.Identity() if self.text_width == prior_dim else nn.Linear(self.text_width, prior_dim)
        self.image_proj = nn.Linear(self.embed_dim, self._time_embed_dim(decoder))
        config = decoder.config
        size = config.sample_size
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        self.in_chans = config.in_channels
        self.sample_shape = (config.in_channels, *self.image_size)
        self.conditioning = "text" if stage == "prior" else "image"
        self.prior_denoiser = PriorDenoiser(self, params.prior.noise_schedule.scheduler_config())
        self.decoder_denoiser = DecoderDenoiser(self, params.decoder.noise_schedule.scheduler_config())
        self.prior_settings = SamplerSettings(steps=params.prior.steps, guidance=params.prior.guidance_scale)
        self.ready = {"prior": stage == "prior" or bool(params.prior.pretrained),
                      "decoder": stage == "decoder" or bool(params.decoder.pretrained)}

    @staticmethod
    def _time_embed_dim(decoder: nn.Module) -> int:
        return int(decoder.time_embedding.linear_2.out_features)

    @classmethod
    def create(cls, params: Any, ctx: Any) -> "UnclipBackbone":
        clip = build_clip(params.clip, ctx, "backbone.clip")
        clip.requires_grad_(False)
        prior = _stage_model(params.prior, ctx, "PriorTransformer", "prior", {
            "embedding_dim": int(clip.feature_dim), "num_embeddings": int(clip.context_length),
        })
        decoder_kwargs = {"class_embed_type": "identity"}
        if params.decoder.sample_size is not None:
            decoder_kwargs["sample_size"] = params.decoder.sample_size
        if params.decoder.in_channels is not None:
            decoder_kwargs["in_channels"] = decoder_kwargs["out_channels"] = params.decoder.in_channels
        decoder = _stage_model(params.decoder, ctx, "UNet2DModel", "decoder", decoder_kwargs)
        if decoder.config.class_embed_type != "identity":
            raise CompatibilityError("backbone.decoder: the decoder UNet must have class_embed_type 'identity' (it adds the image embedding)")
        backbone = cls(clip, prior, decoder, params.stage, params)
        for stage, spec in (("prior", params.prior), ("decoder", params.decoder)):
            if spec.pretrained:
                own = ("prior.", "token_proj.") if stage == "prior" else ("decoder.", "image_proj.")
                weights.load_into(backbone, spec.pretrained, f"{stage}.", own, f"backbone.{stage}.pretrained", only=own)
        return backbone

    # ------------------------------------------------------------------ embeddings
    def _clip_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images of the decoder's geometry fitted to the CLIP's input (size and channels)."""
        size = tuple(self.clip.image_size)
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
        if images.shape[1] != self.clip.in_chans:
            images = images.repeat(1, self.clip.in_chans, 1, 1) if images.shape[1] == 1 else images.mean(1, keepdim=True)
        return images

    def _scaled(self, embedding: torch.Tensor) -> torch.Tensor:
        return F.normalize(embedding.float(), dim=-1) * math.sqrt(self.embed_dim)

    @torch.no_grad()
    def image_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled CLIP image embeddings (B, dim) of images in [-1, 1]."""
        return self._scaled(self.clip.encode_image(self._clip_images(images)))

    def text_condition(self, prompts: list[str]) -> Condition:
        pooled, states, mask = self.clip.encode_text_tokens(list(prompts))
        return {"text_embed": self._scaled(pooled), "tokens": states, "mask": mask}

    # ------------------------------------------------------------------ the trained stage
    @property
    def denoiser(self) -> Any:
        return self.prior_denoiser if self.stage == "prior" else self.decoder_denoiser

    def target(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.image_embedding(batch["images"]) if self.stage == "prior" else batch["images"]

    def condition(self, labels: torch.Tensor | None = None, prompts: list[str] | None = None,
                  images: torch.Tensor | None = None) -> Condition:
        if self.stage == "prior":
            if prompts is None:
                raise CompatibilityError("the unclip prior is conditioned on text; give prompts")
            return self.text_condition(prompts)
        if images is None:
            raise CompatibilityError("the unclip decoder is conditioned on images' CLIP embeddings; give images")
        return {"image_embed": self.image_embedding(images)}

    # ------------------------------------------------------------------ generation
    def steps_problem(self, steps: int) -> str | None:
        # the sampling steps drive the decoder; the prior samples with its own backbone.prior.steps
        return (too_many_steps(steps, self.decoder_denoiser.schedule, "steps")
                or too_many_steps(self.prior_settings.steps, self.prior_denoiser.schedule, "backbone.prior.steps"))

    def generation_problem(self, prompts: bool) -> str | None:
        needed = ["prior", "decoder"] if prompts else ["decoder"]
        missing = [s for s in needed if not self.ready[s]]
        if not missing:
            return None
        stage = missing[0]
        return (f"the unclip {stage} is untrained in this run: set backbone.{stage}.pretrained to the adapter.safetensors "
                f"of a run with stage: {stage}")

    def generate(self, count: int, settings: SamplerSettings, generator: torch.Generator,
                 labels: torch.Tensor | None = None, prompts: list[str] | None = None,
                 images: torch.Tensor | None = None) -> torch.Tensor:
        problem = self.generation_problem(prompts=images is None)
        if problem:
            raise CompatibilityError(problem)
        device = self.image_proj.weight.device
        if images is not None:
            embeds = self.image_embedding(images)
        else:
            if prompts is None:
                raise CompatibilityError("unclip generates from prompts or from images")
            prior_settings = SamplerSettings(sampler=settings.sampler, steps=self.prior_settings.steps,
                                             guidance=self.prior_settings.guidance, eta=settings.eta)
            embeds = sample(self.prior_denoiser, self.text_condition(prompts), count, prior_settings, generator, device)
            embeds = self._scaled(embeds)
        return sample(self.decoder_denoiser, {"image_embed": embeds}, count, settings, generator, device)

    # ------------------------------------------------------------------ surface
    def make_surface(self) -> Surface:
        if self.stage == "prior":
            tower = diffusers_tower(
                "prior", self.prior, "prior.", dim=int(self.prior.config.num_attention_heads * self.prior.config.attention_head_dim),
                own_roles={"proj_in": "embed", "embedding_proj": "embed", "encoder_hidden_states_proj": "embed",
                           "proj_to_clip_embeddings": "output"},
                embeddings=["positional_embedding", "prd_embedding"], extra_prefixes=["token_proj."],
            )
            if isinstance(self.token_proj, nn.Linear):
                tower.layers.append(LayerSite("token_proj", "embed", self.token_proj))
                tower.modules["token_proj"] = self.token_proj
            text = self.clip.surface.towers["text"].prefixed("clip.")
            return Surface("unclip", {"prior": tower, "text": text})
        config = self.decoder.config
        tower = diffusers_tower("decoder", self.decoder, "decoder.", dim=config.block_out_channels[-1],
                                own_roles={"conv_in": "embed", "conv_out": "output"}, extra_prefixes=["image_proj."])
        tower.layers.append(LayerSite("image_proj", "embed", self.image_proj))
        tower.modules["image_proj"] = self.image_proj
        return Surface("unclip", {"decoder": tower})


def _stage_model(spec: Any, ctx: Any, arch: str, stage: str, forced: dict[str, Any]) -> nn.Module:
    """A stage's diffusers model, from its preset with ``forced`` arguments (weights load later)."""
    where = f"backbone.{stage}"
    if spec.pretrained and not is_local_path(spec.pretrained):
        raise CheckpointError(f"{where}.pretrained: give a local weights file (the adapter.safetensors of a run with stage: {stage})")
    named = SimpleNamespace(model=spec.model, name="unclip", kwargs=spec.kwargs)
    found, kwargs = weights.resolve_architecture(named, ctx, (arch,), where=f"{where}.model")
    kwargs.update(forced)
    return weights.construct(found, kwargs, where)
