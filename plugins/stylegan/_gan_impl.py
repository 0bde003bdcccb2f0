"""The ``stylegan2`` GAN training task (imports torch).

One training step computes the discriminator's and the generator's losses together
and returns their sum, so the ordinary trainer (one optimizer, one backward, DDP,
gradient accumulation, resume) trains both:

- discriminator: ``softplus(D(G(z).detach())) + softplus(-D(x))`` (+ lazy R1 on real
  images); the detached fakes keep this term's gradients out of the generator;
- generator: ``softplus(-D(G(z)))`` through a *functional* call of D with detached
  parameters, so this term's gradients reach the generator and not D.

Both players therefore update simultaneously from the same batch. The generator's
exponential moving average (EMA) is what evaluation, ``samples.png`` and
``generator.safetensors`` use.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adaptkit.ema import WeightAverage
from adaptkit.errors import DataError
from adaptkit.task import StepOutput, TaskModel
from adaptkit_plugins.stylegan.networks import Discriminator
from adaptkit_plugins.stylegan.images import save_grid


class StyleGan2TaskModel(TaskModel):
    primary_metric = "mmd"

    def __init__(self, backbone: Any, params: Any, d_channels: dict[int, int]) -> None:
        super().__init__(backbone)
        g = backbone.generator
        self.params = params
        self.discriminator = Discriminator(g.size, d_channels, g.img_channels)
        # started at the first step, once the methods have chosen what trains; StyleGAN's warm-up s / (s + 10)
        self.ema = WeightAverage(params.ema_decay, ramp_start=0.0)
        #: optimizer steps done (the trainer's count, so R1's interval survives a resume); not model state
        self.register_buffer("steps", torch.zeros((), dtype=torch.long), persistent=False)
        self._written = False

    @classmethod
    def create(cls, params: Any, backbone: Any, info: Any) -> "StyleGan2TaskModel":
        g = backbone.generator
        if info.channels is not None and info.channels != g.img_channels:
            raise DataError(
                f"data: images have {info.channels} channels but the generator makes {g.img_channels}; "
                f"set data.channels={g.img_channels}"
            )
        if info.image_size is not None and tuple(info.image_size) != (g.size, g.size):
            raise DataError(f"data: images are {info.image_size}, the generator makes {g.size}x{g.size}; set data.image_size={g.size}")
        channels = {int(k): int(v) for k, v in (params.d_channels or g.channels).items()}
        missing = [2**i for i in range(2, g.size.bit_length()) if 2**i not in channels]
        if missing:
            raise DataError(f"task.d_channels: no channel count for resolutions {missing} (generator size {g.size})")
        return cls(backbone, params, channels)

    # -- latents ---------------------------------------------------------------
    def _latents(self, batch: int, device: torch.device) -> torch.Tensor:
        """W+ latents for a batch, with style mixing (two z's, one random crossover per batch)."""
        bb = self.backbone
        w = bb.generator.broadcast(bb.mapping(shard_randn(batch, bb.style_dim, device=device)))
        if self.params.mixing > 0 and bb.n_latent > 1 and torch.rand(()) < self.params.mixing:
            w2 = bb.generator.broadcast(bb.mapping(shard_randn(batch, bb.style_dim, device=device)))
            cut = int(torch.randint(1, bb.n_latent, ()))
            w = torch.cat([w[:, :cut], w2[:, cut:]], dim=1)
        return w

    def _noise(self, batch: int, device: torch.device) -> list[torch.Tensor]:
        return [shard_randn(batch, *n.shape[1:], device=device) for n in self.backbone.generator.noise_buffers()]

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        """Differentiable augmentation of what the discriminator sees, real and fake alike (DiffAugment)."""
        if self.params.augment == "translation" and self.training:
            return translate(images, self.params.augment_shift)
        return images

    def _frozen_discriminator(self, images: torch.Tensor) -> torch.Tensor:
        detached = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        return torch.func.functional_call(self.discriminator, detached, (images,))

    # -- training ------------------------------------------------------------
    def losses(self, real: torch.Tensor, regularise: bool) -> dict[str, torch.Tensor]:
        """The discriminator's loss (``d_loss``, and ``r1`` when regularising) and the generator's (``g_loss``).

        ``d_loss`` and ``r1`` have no gradient path to the generator, ``g_loss`` none to the discriminator.
        """
        batch = real.shape[0]
        fake = self.augment(self.backbone.synthesis(self._latents(batch, real.device), noise=self._noise(batch, real.device)))
        real = self.augment(real.detach())
        if regularise:
            real = real.requires_grad_(True)
        real_logits = self.discriminator(real)
        out = {
            "d_loss": F.softplus(self.discriminator(fake.detach())).mean() + F.softplus(-real_logits).mean(),
            "g_loss": F.softplus(-self._frozen_discriminator(fake)).mean(),
        }
        if regularise:
            (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
            out["r1"] = grad.float().pow(2).flatten(1).sum(1).mean()
        return out

    def training_step(self, batch: dict[str, Any]) -> StepOutput:
        if self.training and not self.ema.started:
            self._start_ema()  # from the weights training starts with (restored ones when resuming)
        real = batch["images"]
        p = self.params
        # R1 is a training-time regulariser (it needs input gradients): off in eval mode and under no_grad
        regularise = self.training and torch.is_grad_enabled() and p.r1_gamma > 0 and int(self.steps) % p.r1_every == 0
        parts = self.losses(real, regularise)
        loss = parts["d_loss"] + parts["g_loss"]
        if "r1" in parts:
            loss = loss + p.r1_gamma / 2 * parts["r1"] * p.r1_every  # lazy: scaled by the interval
        return StepOutput(loss, real.shape[0], {k: float(v.detach()) for k, v in parts.items()})

    # -- EMA -------------------------------------------------------------------
    def _generator_parameters(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.backbone.named_parameters() if p.requires_grad}

    def _start_ema(self, values: dict[str, torch.Tensor] | None = None) -> None:
        """Start the EMA from the trained generator weights, or from ``values`` (a resume)."""
        self.ema.start(values if values is not None else self._generator_parameters())

    def after_optimizer_step(self, step: int) -> None:
        """Once per optimizer step (not per micro-batch): R1's interval and the EMA follow the optimizer."""
        self.steps.fill_(step)
        self.ema.update(self._generator_parameters(), step)

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {"steps": self.steps, **self.ema.state()}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if "steps" in tensors:
            self.steps.fill_(int(tensors["steps"]))
        ema = WeightAverage.from_state(tensors)
        if not ema:
            return
        wanted = set(self._generator_parameters())
        if set(ema) != wanted:
            from adaptkit.errors import CheckpointError

            raise CheckpointError(f"the checkpoint's EMA generator holds {len(ema)} tensors, this run trains {len(wanted)}")
        self._start_ema(ema)

    def finish_training(self) -> None:
        """Put the EMA generator into the trained weights: the adapter file, a merge and the final
        metrics then describe the generator that samples.png and generator.safetensors show."""
        if self.ema.started:
            self.ema.copy_to(self._generator_parameters())
            self.ema.start({})

    def ema_weights(self) -> contextlib.AbstractContextManager[None]:
        """Temporarily load the EMA generator weights (no-op before the first training step)."""
        return self.ema.swapped_in(self._generator_parameters())

    # -- evaluation ------------------------------------------------------------
    @torch.no_grad()
    def sample(self, count: int, seed: int = 0, truncation: float = 1.0) -> torch.Tensor:
        """``count`` images from seeds ``seed .. seed+count-1`` (fixed noise)."""
        bb = self.backbone
        z = bb.z_from_seeds(range(seed, seed + count))
        return torch.cat([bb.generate(chunk, truncation) for chunk in z.split(128)])

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, Any]]) -> dict[str, Any]:
        reals = [b["images"] for b in batches]
        if not reals:
            return {}
        real = torch.cat(reals)
        with self.ema_weights():
            fake = self.sample(min(self.params.eval_samples, max(len(real), 2)))
            real_logits = self.discriminator(real)
            fake_logits = self.discriminator(fake)
        d_loss = F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()
        return {
            "mmd": mmd(fake.float().flatten(1), real.float().flatten(1)),
            "d_loss": float(d_loss),
            "g_loss": float(F.softplus(-fake_logits).mean()),
            "fake_mean": float(fake.mean()),
            "fake_std": float(fake.std()),
            "count": len(real),
        }

    def write_artifacts(self, metrics: dict[str, Any], output_dir: Path, split: str) -> list[str]:
        if self._written:
            return []
        self._written = True
        from adaptkit.native import temporarily_merged
        from adaptkit_plugins.stylegan.generator import latent_avg_file, save_generator

        files = []
        was_training = self.training
        self.eval()  # called right after training: no method's dropout in the samples or latent_avg
        try:
            with self.ema_weights():
                images = self.sample(self.params.samples).cpu()
                save_grid(images, output_dir / "samples.png", ncol=int(math.ceil(math.sqrt(len(images)))))
                files.append("samples.png")
                if all(m.mergeable for m in self.adaptkit.methods):
                    with temporarily_merged(self):
                        save_generator(self.backbone.generator, output_dir / "generator.safetensors",
                                       latent_avg=self.backbone.mean_latent(), metadata={"format": "rosinality-stylegan2/g_ema"})
                    files += ["generator.safetensors", latent_avg_file("generator.safetensors").name]
        finally:
            self.train(was_training)
        return files


def shard_randn(batch: int, *shape: int, device: torch.device) -> torch.Tensor:
    """Standard normal samples for this process's share of a global batch.

    Every process seeds its random stream alike, so each draws the whole global
    batch and keeps its own slice: the processes see different latents, and the
    union is what a single process would draw.
    """
    import torch.distributed as dist

    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_available() and dist.is_initialized() else (1, 0)
    full = torch.randn(batch * world, *shape, device=device)
    return full[rank * batch : (rank + 1) * batch]


def translate(images: torch.Tensor, fraction: float) -> torch.Tensor:
    """Shift each image by a random whole number of pixels, up to ``fraction`` of its size on each
    axis, repeating the border (differentiable in the images: nearest-pixel resampling)."""
    batch, _, height, width = images.shape
    reach_y, reach_x = round(fraction * height), round(fraction * width)
    if reach_x == 0 and reach_y == 0:
        return images
    shift = torch.stack([
        torch.randint(-reach_x, reach_x + 1, (batch,), device=images.device) * 2.0 / width,
        torch.randint(-reach_y, reach_y + 1, (batch,), device=images.device) * 2.0 / height,
    ], 1)
    theta = torch.zeros(batch, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = shift.to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="border", align_corners=False)


def mmd(x: torch.Tensor, y: torch.Tensor) -> float:
    """Squared maximum mean discrepancy with a Gaussian kernel (bandwidth: the median
    distance within ``y``); 0 when the two samples come from the same distribution."""
    yy = torch.cdist(y, y).pow(2)
    bandwidth = yy[yy > 0].median().clamp(min=1e-6)

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.exp(-torch.cdist(a, b).pow(2) / bandwidth)

    def mean_off_diagonal(k: torch.Tensor) -> torch.Tensor:
        n = k.shape[0]
        return (k.sum() - k.diagonal().sum()) / max(1, n * (n - 1))

    value = mean_off_diagonal(kernel(x, x)) + mean_off_diagonal(torch.exp(-yy / bandwidth)) - 2 * kernel(x, y).mean()
    return float(value)
