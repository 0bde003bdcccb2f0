"""The autoencoder task model (imports torch and diffusers)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adaptkit.surface import Surface
from adaptkit.task import StepOutput, TaskModel

#: weight of the newest batch in the running variance of the latents (about the last 100 steps)
MOMENTUM = 0.01


class LatentScale(nn.Module):
    """The latents' scaling factor: 1 / their standard deviation, a running estimate while training.

    It is a parameter so that it is saved with the trained weights (and read back by
    ``adaptkit merge``), but no gradient reaches it: the training step sets it, and the
    optimizer (which skips parameters without a gradient) never moves it.
    """

    def __init__(self, value: float, estimated: bool) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.tensor([float(value)]), requires_grad=estimated)  # 1-d: fsdp shards no 0-d tensor
        self.seen = False

    @property
    def factor(self) -> float:
        return float(self.value.detach()[0])

    @torch.no_grad()
    def update(self, latents: torch.Tensor) -> None:
        variance = latents.detach().float().var()
        if not bool(torch.isfinite(variance)) or float(variance) <= 0:
            return
        old = self.value.float().pow(-2)[0]
        new = variance if not self.seen else (1 - MOMENTUM) * old + MOMENTUM * variance
        self.seen = True
        self.value.copy_(new.rsqrt().reshape(1).to(self.value.dtype))


class AutoencoderModel(TaskModel):
    """Trains the VAE of a latent pipeline: reconstruction of sampled latents + KL to N(0, I)."""

    primary_metric = "loss"
    # the scaling factor is saved like a trained tensor but set by the step, not by gradients
    ddp_find_unused_parameters = True

    def __init__(self, backbone: Any, params: Any) -> None:
        super().__init__(backbone)
        self.params = params
        given = params.scaling_factor
        self.latent_scale = LatentScale(given if given is not None else backbone.vae.config.scaling_factor, given is None)
        self._preview_written = False

    # the running estimate's state goes into every checkpoint (the factor itself is saved as a trained
    # tensor): a resumed run goes on averaging instead of starting over from the next batch alone
    def extra_state(self) -> dict[str, torch.Tensor]:
        return {"latent_scale_seen": torch.tensor([1.0 if self.latent_scale.seen else 0.0])}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        seen = tensors.get("latent_scale_seen")
        if seen is not None:
            self.latent_scale.seen = bool(seen.reshape(-1)[0] > 0)

    def finish_training(self) -> None:
        """Nothing to put into the trained tensors: the factor is already the running estimate."""

    @classmethod
    def create(cls, params: Any, backbone: Any, info: Any) -> "AutoencoderModel":
        from adaptkit.errors import DataError

        if info.channels is not None and info.channels != backbone.in_chans:
            raise DataError(f"data: images have {info.channels} channels but the VAE takes {backbone.in_chans}; "
                            f"set data.channels={backbone.in_chans}")
        return cls(backbone, params)

    # ------------------------------------------------------------------ surface: the VAE alone
    def extend_surface(self, surface: Surface) -> None:
        surface.towers.clear()
        surface.towers["vae"] = self.backbone.vae_tower().prefixed("backbone.")

    # ------------------------------------------------------------------ losses
    def losses(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Reconstruction error (mean per pixel), KL (summed over a latent, per pixel) and the loss."""
        vae = self.backbone.vae
        posterior = vae.encode(images).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean.device, posterior.mean.dtype) \
            if generator is not None else torch.randn_like(posterior.mean)
        latents = posterior.mean + posterior.std * noise
        decoded = vae.decode(latents).sample.float()
        target = images.float()
        reconstruction = F.l1_loss(decoded, target) if self.params.reconstruction == "l1" else F.mse_loss(decoded, target)
        pixels = target[0].numel()
        kl = posterior.kl().float().mean() / pixels  # LDM sums both terms per image; this is that sum / pixels
        return {"reconstruction": reconstruction, "kl": kl, "loss": reconstruction + self.params.kl_weight * kl,
                "latents": latents, "mean": posterior.mean}

    def training_step(self, batch: dict[str, Any]) -> StepOutput:
        out = self.losses(batch["images"])
        if self.latent_scale.value.requires_grad:
            self.latent_scale.update(out["latents"])
        return StepOutput(out["loss"], len(batch["images"]))

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, Any]]) -> dict[str, Any]:
        """Validation loss, reconstruction error, KL and PSNR (images in [-1, 1]) on latents drawn with a fixed seed."""
        sums = {"loss": 0.0, "reconstruction": 0.0, "kl": 0.0, "psnr": 0.0}
        count = 0
        for index, batch in enumerate(batches):
            images = batch["images"]
            self.remember_preview(batch)
            out = self.losses(images, torch.Generator().manual_seed(1234 + index))
            n = len(images)
            for key in ("loss", "reconstruction", "kl"):
                sums[key] += float(out[key]) * n
            decoded = self.backbone.vae.decode(out["mean"]).sample.clamp(-1, 1).float()  # the posterior mean's reconstruction
            mse = (decoded - images.float()).pow(2).flatten(1).mean(1).clamp_min(1e-12)
            sums["psnr"] += float((10 * torch.log10(4.0 / mse)).sum())
            count += n
        if not count:
            return {}
        return {**{k: v / count for k, v in sums.items()}, "scaling_factor": self.latent_scale.factor, "count": count}

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """The VAE's reconstruction of ``images`` (from the posterior's mean unless ``sample``), in [-1, 1]."""
        posterior = self.backbone.vae.encode(images).latent_dist
        latents = posterior.sample() if sample else posterior.mean
        return self.backbone.vae.decode(latents).sample.clamp(-1, 1)

    # ------------------------------------------------------------------ merge, artifacts
    def native_modules(self, native: nn.Module) -> dict[str, str]:
        """The merged pipeline's VAE carries the scaling factor in its config (what diffusers' pipelines read)."""
        native.vae.register_to_config(scaling_factor=self.latent_scale.factor)
        return {"latent_scale": "vae"}

    def write_artifacts(self, metrics: dict[str, Any], output_dir: Path, split: str) -> list[str]:
        """``reconstructions.png``: validation images (top row) over their reconstructions (bottom row)."""
        if self._preview_written or self.params.preview == 0 or self._preview_images is None:
            return []
        from adaptkit.images import save_grid

        self._preview_written = True
        images = self._preview_images
        device = next(self.backbone.vae.parameters()).device
        was_training = self.training
        self.eval()
        try:
            decoded = self.reconstruct(images.to(device)).float().cpu()
        finally:
            self.train(was_training)
        save_grid(torch.cat([images.float().cpu(), decoded]), output_dir / "reconstructions.png", columns=len(images))
        return ["reconstructions.png"]

    _preview_images: torch.Tensor | None = None

    def remember_preview(self, batch: dict[str, Any]) -> None:
        if self._preview_images is None and self.params.preview:
            self._preview_images = batch["images"][: self.params.preview].detach().cpu()
