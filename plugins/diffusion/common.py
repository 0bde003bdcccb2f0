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
    """How to sample: a diffusers scheduler (:data:`SAMPLERS`), steps, guidance scale, negative prompt."""

    sampler: str = "ddim"
    steps: int = 50
    guidance: float = 3.0
    eta: float = 0.0
    #: diffusers' default clips x0 to [-1, 1] each step; with guidance >= 2 that ruins samples
    clip_sample: bool = False
    #: what guidance steers away from instead of the empty condition (text-conditioned models)
    negative_prompt: str | None = None


#: sampler names and the diffusers scheduler classes they pick
SAMPLERS = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "euler": "EulerDiscreteScheduler",
            "dpmsolver++": "DPMSolverMultistepScheduler"}


def make_scheduler(schedule: dict[str, Any], settings: SamplerSettings, config: dict[str, Any] | None = None) -> Any:
    """A fresh diffusers scheduler for ``schedule`` (a denoiser's training schedule).

    ``config`` is a pipeline folder's scheduler config: sampler ``pipeline`` makes its own
    class, another sampler that class ``from_config`` (as diffusers users switch schedulers).
    """
    import diffusers

    if settings.sampler == "pipeline":
        if config is None:
            raise CompatibilityError("sampler 'pipeline' needs a pipeline folder's scheduler; use " + ", ".join(SAMPLERS))
        return getattr(diffusers, config["_class_name"]).from_config(config)
    if settings.sampler not in SAMPLERS:
        raise CompatibilityError(f"unknown sampler '{settings.sampler}'; use {', '.join(SAMPLERS)}")
    cls = getattr(diffusers, SAMPLERS[settings.sampler])
    extra: dict[str, Any] = {"algorithm_type": "dpmsolver++"} if settings.sampler == "dpmsolver++" else {}
    if config is not None:
        return cls.from_config(config, **extra)
    if settings.sampler in ("ddim", "ddpm"):
        extra["clip_sample"] = settings.clip_sample
    if settings.sampler == "ddpm":
        extra["variance_type"] = "fixed_small"
    return cls(**schedule, **extra)


def step_kwargs(scheduler: Any, settings: SamplerSettings, generator: torch.Generator) -> dict[str, Any]:
    """The keyword arguments ``scheduler.step`` takes of eta and generator (as diffusers' pipelines pass them)."""
    import inspect

    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "eta" in accepted:
        kwargs["eta"] = settings.eta
    if "generator" in accepted:
        kwargs["generator"] = generator
    return kwargs


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
    scheduler: Any = None,
    null: Condition | None = None,
) -> torch.Tensor:
    """Draw ``count`` samples by running the reverse process with a diffusers scheduler.

    With a condition and ``guidance != 1`` each step evaluates the conditional and the
    null condition (``null``, default the denoiser's: a negative prompt replaces it) in
    one batch and extrapolates: eps_u + g (eps_c - eps_u). The initial noise comes from
    ``generator`` on the CPU, as in diffusers' pipelines, so a seed gives the same
    images on every device. ``scheduler`` defaults to :func:`make_scheduler`'s.
    """
    if scheduler is None:
        scheduler = make_scheduler(denoiser.schedule, settings)
    scheduler.set_timesteps(settings.steps, device=device)
    x = torch.randn((count, *denoiser.sample_shape), generator=generator, dtype=dtype).to(device)
    x = x * scheduler.init_noise_sigma
    guided = bool(cond) and settings.guidance != 1.0
    if guided:
        both = concat_conditions(cond, null if null is not None else denoiser.null_condition(count))
    extra = step_kwargs(scheduler, settings, generator)
    for t in scheduler.timesteps:
        if guided:
            scaled = scheduler.scale_model_input(torch.cat([x, x]), t)
            eps_cond, eps_null = denoiser.predict_noise(scaled, t, both).chunk(2)
            eps = eps_null + settings.guidance * (eps_cond - eps_null)
        else:
            eps = denoiser.predict_noise(scheduler.scale_model_input(x, t), t, cond)
        x = scheduler.step(eps, t, x, **extra).prev_sample
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
    #: the samplers :meth:`scheduler` can make, the first the default
    samplers: tuple[str, ...] = tuple(SAMPLERS)

    def scheduler(self, settings: SamplerSettings) -> Any:
        """A fresh diffusers scheduler for ``settings`` (default: from the trained stage's noise schedule)."""
        return make_scheduler(self.denoiser.schedule, settings)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from what the trained stage generates (a latent model decodes; default: as is)."""
        return x

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
        null = None
        if settings.negative_prompt is not None:
            if self.conditioning != "text":
                raise CompatibilityError("a negative prompt needs a text-conditioned model")
            null = self.condition(prompts=[settings.negative_prompt] * count)
        x = sample(self.denoiser, cond, count, settings, generator, device, scheduler=self.scheduler(settings), null=null)
        return self.decode(x)
