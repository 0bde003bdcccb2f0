"""The text_to_image task model (imports torch and diffusers)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from adaptkit.ema import WeightAverage
from adaptkit.errors import CompatibilityError, DataError
from adaptkit.task import StepOutput, TaskModel
from adaptkit_plugins.diffusion.common import (
    Condition,
    SamplerSettings,
    add_noise,
    alphas_cumprod,
    drop_conditions,
)
from adaptkit_plugins.diffusion._dreambooth_impl import DreamBooth

#: seed of the fixed noise and timesteps that make validation losses comparable across evaluations
EVAL_SEED = 1234


class TextToImageModel(TaskModel):
    """Trains a diffusion backbone's denoiser; generates with its EMA weights."""

    primary_metric = "loss"
    # diffusers' PriorTransformer holds clip_mean / clip_std, and a CLIP text tower its logit scale:
    # parameters a `full` method unfreezes that no denoising step uses
    ddp_find_unused_parameters = True

    def __init__(self, backbone: Any, params: Any, class_names: list[str], class_ids: list[int]) -> None:
        super().__init__(backbone)
        self.params = params
        self.class_names = class_names
        self.register_buffer("class_ids", torch.tensor(class_ids, dtype=torch.long), persistent=False)
        self.register_buffer("alphas_cumprod", alphas_cumprod(backbone.denoiser.schedule), persistent=False)
        self.num_timesteps = int(self.alphas_cumprod.shape[0])
        self.ema: dict[str, torch.Tensor] | None = None
        self._preview_written = False
        self.dreambooth = DreamBooth.create(params, backbone)

    @classmethod
    def create(cls, params: Any, backbone: Any, info: Any) -> "TextToImageModel":
        names = list(info.class_names) or [str(i) for i in range(info.num_classes)]
        ids = list(params.class_ids) if params.class_ids is not None else list(range(len(names)))
        if backbone.conditioning == "class":
            if len(ids) != len(names):
                raise DataError(f"task.class_ids: gives {len(ids)} ids for the data's {len(names)} classes ({', '.join(names)})")
            bad = [i for i in ids if not 0 <= i < backbone.num_classes]
            if bad:
                raise DataError(
                    f"task.class_ids: {bad} outside the model's classes 0..{backbone.num_classes - 1}"
                    if params.class_ids is not None else
                    f"data: {len(names)} classes, but backbone '{backbone.registered_name}' has num_classes "
                    f"{backbone.num_classes}; raise backbone.num_classes or map the classes with task.class_ids"
                )
        if info.channels is not None and getattr(backbone, "in_chans", None) and info.channels != backbone.in_chans:
            raise DataError(f"data: images have {info.channels} channels but the denoiser generates {backbone.in_chans}; set data.channels={backbone.in_chans}")
        model = cls(backbone, params, names, ids)
        try:  # the spec's sampling defaults must work before hours of training, not after
            model.sampler_settings()
        except CompatibilityError as exc:
            raise CompatibilityError(f"task: {exc}") from None
        return model

    # ------------------------------------------------------------------ conditions
    def _batch_condition(self, batch: dict[str, Any]) -> Condition:
        kind = self.backbone.conditioning
        if kind == "class":
            return self.backbone.condition(labels=self.class_ids[batch["labels"]])
        if kind == "text":
            captions = batch.get("captions")
            if self.dreambooth is not None:
                captions = self.dreambooth.captions(batch, len(batch["images"]))
            if captions is None:
                captions = [self.params.caption_template.format(label=self.class_names[i]) for i in batch["labels"].tolist()]
            return self.backbone.condition(prompts=list(captions))
        if kind == "image":
            return self.backbone.condition(images=batch["images"])
        return {}

    def drop_condition(self, cond: Condition, drop: torch.Tensor, any_process: bool = False) -> Condition:
        """Replace the condition of the samples where ``drop`` is true by the null condition.
        ``any_process``: some process drops one, so this one computes the null condition too (under
        fsdp the text encoder's gathers are collectives every process must join)."""
        if not cond or not (any_process or bool(drop.any())):
            return cond
        return drop_conditions(cond, self.backbone.denoiser.null_condition(int(drop.shape[0])), drop)

    # ------------------------------------------------------------------ training
    def diffusion_loss(self, x0: torch.Tensor, cond: Condition, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """L_simple: the mean squared error between the noise and the denoiser's prediction of it."""
        x_t = add_noise(self.alphas_cumprod, x0, noise, t)
        predicted = self.backbone.denoiser.predict_noise(x_t, t, cond)
        return F.mse_loss(predicted.float(), noise.float())

    def training_step(self, batch: dict[str, Any]) -> StepOutput:
        """One DDPM step: draw t ~ U{0..T-1} and eps ~ N(0, I), drop conditions, regress eps.

        A batch may carry ``timesteps`` and ``noise`` to fix them (tests, analysis).
        """
        if self.ema is None and self.params.ema_decay > 0 and self.training:
            self._start_ema()  # from the weights training starts with (or restored ones, when resuming)
        if self.dreambooth is not None:  # DreamBooth samples its class images once, before any graph is recorded
            self.dreambooth.ensure_class_images(self)
        x0 = self.backbone.target(batch)
        n = x0.shape[0]
        # every process draws for all of them and keeps its own row: the random stream stays the
        # same on every process (as the trainer assumes) while the noise differs between them
        world, rank = _world()
        t = batch.get("timesteps")
        if t is None:
            t = torch.randint(0, self.num_timesteps, (world, n))[rank].to(x0.device)
        noise = batch.get("noise")
        if noise is None:
            noise = torch.randn(world, *x0.shape)[rank].to(x0.device, x0.dtype)
        cond = self._batch_condition(batch)
        if cond and self.params.condition_dropout > 0:
            drops = torch.rand(world, n) < self.params.condition_dropout
            cond = self.drop_condition(cond, drops[rank], any_process=bool(drops.any()))
        loss = self.diffusion_loss(x0, cond, t, noise)
        if self.dreambooth is not None:  # prior preservation: + weight * the loss of as many class images
            loss = loss + self.dreambooth.prior_loss(self, batch)
        return StepOutput(loss, n)

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, Any]]) -> dict[str, Any]:
        """Validation L_simple of the EMA weights, on noise and timesteps fixed by a seed."""
        total, count = 0.0, 0
        with self.ema_weights():
            for index, batch in enumerate(batches):
                x0 = self.backbone.target(batch)
                generator = torch.Generator().manual_seed(EVAL_SEED + index)
                t = torch.randint(0, self.num_timesteps, (x0.shape[0],), generator=generator).to(x0.device)
                noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
                total += self.diffusion_loss(x0, self._batch_condition(batch), t, noise).item() * x0.shape[0]
                count += x0.shape[0]
        return {"loss": total / count, "count": count} if count else {}

    # ------------------------------------------------------------------ EMA
    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def _start_ema(self, values: dict[str, torch.Tensor] | None = None) -> None:
        # diffusers' EMAModel warm-up: decay (1 + s) / (10 + s) after step s
        self.ema = WeightAverage(self.params.ema_decay, ramp_start=1.0)
        self.ema.start(values if values is not None else self._trainable())

    def after_optimizer_step(self, step: int) -> None:
        if self.ema is not None:
            self.ema.update(self._trainable(), step)

    def extra_state(self) -> dict[str, torch.Tensor]:
        return self.ema.state() if self.ema is not None else {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        ema = WeightAverage.from_state(tensors)
        if ema:
            self._start_ema(ema)

    def finish_training(self) -> None:
        """Copy the EMA weights into the trained parameters (what gets evaluated and saved)."""
        if self.ema is None:
            return
        self.ema.copy_to(self._trainable())
        self.ema = None

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Temporarily put the EMA weights in place of the trained ones (no-op without EMA)."""
        if self.ema is None:
            yield
            return
        with self.ema.swapped_in(self._trainable()):
            yield

    # ------------------------------------------------------------------ generation
    def sampler_settings(self, **overrides: Any) -> SamplerSettings:
        p = self.params
        samplers = self.backbone.samplers
        settings = {"sampler": p.sampler or samplers[0], "steps": p.steps, "guidance": p.guidance_scale, "eta": p.eta,
                    "clip_sample": p.clip_sample, "negative_prompt": p.negative_prompt}
        settings.update({k: v for k, v in overrides.items() if v is not None})
        if settings["sampler"] not in samplers:
            raise CompatibilityError(f"sampler '{settings['sampler']}' does not work with this backbone; use {', '.join(samplers)}")
        if int(settings["steps"]) < 1:
            raise CompatibilityError(f"steps must be at least 1, got {settings['steps']}")
        if not math.isfinite(float(settings["guidance"])) or float(settings["guidance"]) < 0:
            raise CompatibilityError(f"the guidance scale must be a finite number >= 0, got {settings['guidance']}")
        if not 0 <= float(settings["eta"]) <= 1:
            raise CompatibilityError(f"eta must be between 0 and 1, got {settings['eta']}")
        problem = self.backbone.steps_problem(int(settings["steps"]))
        if problem:
            raise CompatibilityError(problem)
        return SamplerSettings(**settings)

    def _class_index(self, name: str) -> int:
        text = str(name)
        for index, class_name in enumerate(self.class_names):
            if text in (class_name, self.params.caption_template.format(label=class_name)):
                return index
        raise CompatibilityError(f"unknown class '{name}'; this model's classes: {', '.join(self.class_names)}")

    @torch.no_grad()
    def generate(
        self,
        *,
        prompts: list[str] | None = None,
        classes: list[str] | None = None,
        images: list[str | Path] | torch.Tensor | None = None,
        num: int = 16,
        seed: int | None = None,
        steps: int | None = None,
        sampler: str | None = None,
        guidance: float | None = None,
        eta: float | None = None,
        batch_size: int | None = None,
        negative_prompt: str | None = None,
    ) -> tuple[torch.Tensor, list[str]]:
        """Sample ``num`` images for each prompt / class / source image.

        Returns the images, (count * num, C, H, W) in [-1, 1] grouped by condition, and
        one caption per condition. Class-conditional models take class names (a prompt
        equal to a class name or its caption works too); text models take prompts;
        unCLIP also takes source images (variations). ``batch_size`` bounds how many
        images are denoised at once (memory); batches draw their noise one after another
        from the seeded generator, so the first batch equals a run of that size alone.
        """
        if num < 1:
            raise CompatibilityError(f"num must be at least 1, got {num}")
        if batch_size is not None and batch_size < 1:
            raise CompatibilityError(f"batch_size must be at least 1, got {batch_size}")
        settings = self.sampler_settings(steps=steps, sampler=sampler, guidance=guidance, eta=eta, negative_prompt=negative_prompt)
        device = next(self.parameters()).device
        rows, request = self._request(prompts, classes, images, num, device)
        generator = torch.Generator().manual_seed(self.params.seed if seed is None else seed)
        total = len(rows) * num
        size = total if batch_size is None else batch_size
        outs = []
        was_training = self.training
        self.eval()  # samples.png is drawn right after training: no method's dropout in the samples
        try:
            with self.ema_weights():
                for start in range(0, total, size):
                    part = {key: value[start:start + size] for key, value in request.items()}
                    outs.append(self.backbone.generate(min(size, total - start), settings, generator, **part).float().cpu())
        finally:
            self.train(was_training)
        return torch.cat(outs), rows

    def _request(self, prompts: list[str] | None, classes: list[str] | None, images: Any, num: int,
                 device: torch.device) -> tuple[list[str], dict[str, Any]]:
        """One caption per condition, and the backbone's per-sample inputs (each condition ``num`` times)."""
        kind = self.backbone.conditioning
        given = [name for name, value in (("prompts", prompts), ("classes", classes), ("images", images)) if value is not None and len(value)]
        if len(given) > 1:
            raise CompatibilityError(f"give one kind of condition, not {' and '.join(given)}")
        if kind == "none":
            if given:
                raise CompatibilityError(f"this model is unconditional; it takes no {given[0]}")
            return ["unconditional"], {}
        if given == ["images"]:
            if kind == "class":
                raise CompatibilityError("this model is class-conditional; it takes classes, not images")
            if not getattr(self.backbone, "accepts_images", False):
                raise CompatibilityError("this model is conditioned on text; image variations need an unclip backbone")
            rows = [f"image {k}" if isinstance(images, torch.Tensor) else Path(i).name for k, i in enumerate(images)]
            return rows, {"images": self._load_images(images).repeat_interleave(num, dim=0).to(device)}
        if kind == "class":
            names = list(classes or prompts or [])
            if not names:
                raise CompatibilityError(f"this model is class-conditional; give classes (one of {', '.join(self.class_names)})")
            indices = [self._class_index(name) for name in names]
            return [self.class_names[i] for i in indices], {"labels": self.class_ids[torch.tensor(indices)].repeat_interleave(num).to(device)}
        if classes:  # a text model asked for classes: their captions
            prompts = [self.params.caption_template.format(label=self.class_names[self._class_index(c)]) for c in classes]
        if not prompts:
            raise CompatibilityError("this model is conditioned on text; give prompts")
        return list(prompts), {"prompts": [p for p in prompts for _ in range(num)]}

    def _load_images(self, images: list[str | Path] | torch.Tensor) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            return images
        from adaptkit.images import image_tensor

        return torch.stack([image_tensor(path, self.backbone.in_chans, self.backbone.image_size, "image") for path in images])

    # ------------------------------------------------------------------ artifacts
    def write_artifacts(self, metrics: dict[str, Any], output_dir: Path, split: str) -> list[str]:
        """``samples.png``: ``preview`` samples of every class (or a square of unconditional ones)."""
        if self._preview_written or self.params.preview == 0:
            return []
        from adaptkit.images import save_grid

        self._preview_written = True
        kind, n = self.backbone.conditioning, self.params.preview
        if kind == "none":
            images, _ = self.generate(num=n * n)
        elif self.backbone.generation_problem(prompts=kind != "class") is not None:
            return []  # e.g. an unclip stage whose other stage is untrained
        elif kind == "class":
            images, _ = self.generate(classes=self.class_names, num=n)
        else:
            prompts = [self.params.caption_template.format(label=c) for c in self.class_names]
            images, _ = self.generate(prompts=self.dreambooth.prompts() if self.dreambooth is not None else prompts, num=n)
        save_grid(images, output_dir / "samples.png", columns=n)
        return ["samples.png"]


def _world() -> tuple[int, int]:
    """(processes, this process's rank) under torch.distributed; (1, 0) otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0
