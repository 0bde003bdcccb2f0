"""What the diffusion backbones share (imports torch and diffusers): the denoiser
interface the ``text_to_image`` task trains, diffusers' DDPM/DDIM schedulers, and the
sampling loop with classifier-free guidance.

A *denoiser* predicts the noise in ``x_t``. It offers ``sample_shape`` (one sample),
``schedule`` (diffusers scheduler keyword arguments), ``predict_noise(x, t, cond)``
and ``null_condition(n)`` (the condition-free input that classifier-free guidance
contrasts with). Conditions are dicts of batched tensors, so they can be
concatenated, masked and repeated without knowing what they hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from adaptkit.backbone import Backbone
from adaptkit.errors import CompatibilityError

Condition = dict[str, torch.Tensor]


class Denoiser(Protocol):
    sample_shape: tuple[int, ...]
    schedule: dict[str, Any]

    def predict_noise(self, x: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor: ...

    def null_condition(self, n: int) -> Condition: ...


@dataclass(frozen=True)
class SamplerSettings:
    """How to sample: diffusers' ``ddim`` or ``ddpm`` scheduler, steps, guidance scale."""

    sampler: str = "ddim"
    steps: int = 50
    guidance: float = 3.0
    eta: float = 0.0
    #: diffusers' default clips x0 to [-1, 1] each step; with guidance >= 2 that ruins samples
    clip_sample: bool = False


def make_scheduler(schedule: dict[str, Any], settings: SamplerSettings) -> Any:
    """A fresh diffusers scheduler for ``schedule`` (a denoiser's training schedule)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    if settings.sampler == "ddim":
        return DDIMScheduler(**schedule, clip_sample=settings.clip_sample)
    if settings.sampler == "ddpm":
        return DDPMScheduler(**schedule, clip_sample=settings.clip_sample, variance_type="fixed_small")
    raise CompatibilityError(f"unknown sampler '{settings.sampler}'; use ddim or ddpm")


def concat_conditions(a: Condition, b: Condition) -> Condition:
    return {key: torch.cat([a[key], b[key]]) for key in a}


def repeat_condition(cond: Condition, n: int) -> Condition:
    """A one-row condition as ``n`` rows (views, no copies): the null caption is encoded once."""
    return {key: value.expand(n, *value.shape[1:]) for key, value in cond.items()}


def drop_conditions(cond: Condition, null: Condition, drop: torch.Tensor) -> Condition:
    """``cond`` with the rows where ``drop`` is true replaced by the null condition's."""
    out = {}
    for key, value in cond.items():
        mask = drop.reshape(-1, *([1] * (value.ndim - 1))).to(value.device)
        out[key] = torch.where(mask, null[key].to(value.dtype), value)
    return out


def add_noise(schedule_alphas: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (the DDPM forward process)."""
    abar = schedule_alphas.to(x0.device)[t].reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def too_many_steps(steps: int, schedule: dict[str, Any], field: str) -> str | None:
    """Why ``steps`` sampling steps cannot run on a stage trained with ``schedule`` (more than its timesteps), or None."""
    limit = schedule.get("num_train_timesteps")
    if limit is not None and steps > int(limit):
        return f"{field} {steps}: more sampling steps than the {limit} timesteps the model was trained with"
    return None


def alphas_cumprod(schedule: dict[str, Any]) -> torch.Tensor:
    """abar_t of a schedule, as diffusers computes it."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**schedule).alphas_cumprod.clone()


@torch.inference_mode()
def sample(
    denoiser: Denoiser,
    cond: Condition,
    count: int,
    settings: SamplerSettings,
    generator: torch.Generator,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Draw ``count`` samples by running the reverse process (DDIM or DDPM).

    With a condition and ``guidance != 1`` each step evaluates the conditional and the
    null condition in one batch and extrapolates: eps_u + g (eps_c - eps_u). The
    initial noise comes from ``generator`` on the CPU, as in diffusers' pipelines, so
    a seed gives the same images on every device.
    """
    scheduler = make_scheduler(denoiser.schedule, settings)
    scheduler.set_timesteps(settings.steps, device=device)
    x = torch.randn((count, *denoiser.sample_shape), generator=generator, dtype=dtype).to(device)
    x = x * scheduler.init_noise_sigma
    guided = bool(cond) and settings.guidance != 1.0
    both = concat_conditions(cond, denoiser.null_condition(count)) if guided else cond
    step_kwargs: dict[str, Any] = {"generator": generator}
    if settings.sampler == "ddim":
        step_kwargs["eta"] = settings.eta
    for t in scheduler.timesteps:
        if guided:
            eps_cond, eps_null = denoiser.predict_noise(torch.cat([x, x]), t, both).chunk(2)
            eps = eps_null + settings.guidance * (eps_cond - eps_null)
        else:
            eps = denoiser.predict_noise(x, t, cond)
        x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
    return x


class DiffusionBackbone(Backbone):
    """A backbone the ``text_to_image`` task can train: one denoiser stage at a time.

    ``conditioning`` says what the trained stage is conditioned on: ``none``, ``class``
    (integer labels), ``text`` (captions) or ``image`` (an image's CLIP embedding).
    """

    capabilities = frozenset({"denoise"})
    conditioning: str = "none"
    num_classes: int = 0

    # the trained stage -------------------------------------------------------------
    @property
    def denoiser(self) -> Denoiser:
        """The stage training updates (it implements :class:`Denoiser`)."""
        raise NotImplementedError

    def target(self, batch: dict[str, Any]) -> torch.Tensor:
        """What the trained stage learns to generate from a data batch (x0)."""
        return batch["images"]

    def condition(self, labels: torch.Tensor | None = None, prompts: list[str] | None = None,
                  images: torch.Tensor | None = None) -> Condition:
        """The trained stage's condition for a batch (labels are model class ids)."""
        raise NotImplementedError

    # generation -------------------------------------------------------------------
    def steps_problem(self, steps: int) -> str | None:
        """Why sampling with ``steps`` steps cannot work (a stage trained with fewer timesteps), or None."""
        return too_many_steps(steps, self.denoiser.schedule, "steps")

    def generation_problem(self, prompts: bool) -> str | None:
        """Why this model cannot generate now (e.g. an untrained stage), or None."""
        return None

    def generate(self, count: int, settings: SamplerSettings, generator: torch.Generator,
                 labels: torch.Tensor | None = None, prompts: list[str] | None = None,
                 images: torch.Tensor | None = None) -> torch.Tensor:
        """``count`` images in [-1, 1] for per-sample labels / prompts / images."""
        device = next(self.parameters()).device
        cond = self.condition(labels=labels, prompts=prompts, images=images)
        return sample(self.denoiser, cond, count, settings, generator, device)
