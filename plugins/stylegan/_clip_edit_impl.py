"""The ``clip_stylegan_edit`` task model (imports torch).

The guiding CLIP is a frozen module of the task (methods never see it: they adapt
the generator's towers only). What receives gradients depends on the mode:

- ``latent``: only the latents being optimised (inside :meth:`edit`);
- ``global``: nothing (an analytic direction in StyleSpace);
- ``generator``: only the spec's methods' parameters (trained by ``adaptkit run``),
  against a frozen, method-free copy of the generator that gives the "before" images.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adaptkit.errors import DataError, RunError, SpecError
from adaptkit.task import StepOutput, TaskModel
from adaptkit_plugins.stylegan.generator import clone_generator
from adaptkit_plugins.stylegan import clip_edit_core as core
from adaptkit_plugins.stylegan.images import save_strips

#: seeds of the random latents used to measure StyleSpace statistics (global mode)
STATS_SEED = 1_000_000


@dataclass
class EditResult:
    """One edit of B sources: images before/after, a strip over alpha, and measurements.

    ``strip`` is (B, len(alphas), C, H, W). ``metrics`` maps a name to one value per
    source: ``clip_before`` / ``clip_after`` (cosine similarity of the image to the
    prompt), ``neutral_before`` / ``neutral_after`` (to the neutral text),
    ``latent_distance`` (|w_edit - w_source|, latent mode), ``style_distance``
    (global mode), ``pixel_distance`` (RMS difference of the images).
    """

    mode: str
    before: torch.Tensor
    after: torch.Tensor
    strip: torch.Tensor
    alphas: list[float]
    metrics: dict[str, list[float]] = field(default_factory=dict)
    w_source: torch.Tensor | None = None
    w_edit: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        """The mean of each measurement over the sources (plus counts in ``info``)."""
        out = {k: sum(v) / len(v) for k, v in self.metrics.items() if v}
        if "clip_before" in out:
            out["clip_gain"] = out["clip_after"] - out["clip_before"]
        return {**out, **{k: v for k, v in self.info.items() if isinstance(v, (int, float))}}


class ClipStyleGanEditModel(TaskModel):
    primary_metric = "clip_gain"

    def __init__(self, backbone: Any, guide: core.ClipGuide, params: Any) -> None:
        super().__init__(backbone)
        self.params = params
        self.guide = guide.requires_grad_(False).eval()
        self.source_generator = clone_generator(backbone.generator, backbone.config) if params.mode == "generator" else None
        self._mean_latent: torch.Tensor | None = None
        self._channels: core.ChannelDirections | None = None
        self._initial: dict[str, torch.Tensor] | None = None

    @classmethod
    def create(cls, params: Any, backbone: Any, info: Any, ctx: Any) -> "ClipStyleGanEditModel":
        if info.kind != "latent_seeds":
            raise DataError(f"task 'clip_stylegan_edit' edits generated images from seeds; use data: {{name: latent_seeds}}, not '{info.kind}' data")
        clip = build_clip(params.clip, ctx)
        return cls(backbone, core.ClipGuide(clip, params.templates), params)

    def train(self, mode: bool = True) -> "ClipStyleGanEditModel":
        super().train(mode)
        self.guide.eval()  # the CLIP is a fixed judge: no dropout, ever
        if self.source_generator is not None:
            self.source_generator.eval()
        return self

    # -- texts and latents ---------------------------------------------------
    def text_target(self, prompt: str | None = None) -> torch.Tensor:
        return self.guide.text_features([prompt or self.params.prompt])[0]

    def text_direction(self, prompt: str | None = None, neutral: str | None = None) -> torch.Tensor:
        neutral = neutral or self.params.neutral
        if not neutral:
            raise SpecError(f"task.neutral: mode '{self.params.mode}' needs the neutral (source) text")
        return self.guide.text_direction(prompt or self.params.prompt, neutral)

    def _source_generator(self) -> Any:
        """The method-free generator: the frozen copy in generator mode, else the backbone's own."""
        return self.source_generator if self.source_generator is not None else self.backbone.generator

    def mean_latent(self) -> torch.Tensor:
        if self._mean_latent is None or self._mean_latent.device != self.backbone.generator.input.input.device:
            self._mean_latent = self._source_generator().mean_latent(4096)
        return self._mean_latent

    @torch.no_grad()
    def latents_from_seeds(self, seeds: Sequence[int] | torch.Tensor, space: str | None = None) -> torch.Tensor:
        """Truncated W (B, D) or W+ (B, n_latent, D) latents of the given seeds."""
        z = self.backbone.z_from_seeds(seeds)
        w = self._source_generator().mapping(z)
        t = self.params.truncation
        if t < 1:
            mean = self.mean_latent()
            w = mean + t * (w - mean)
        space = space or self.params.space
        return self.backbone.generator.broadcast(w).clone() if space == "w+" else w

    def render(self, w: torch.Tensor) -> torch.Tensor:
        return self.backbone.synthesis(w, noise="const")

    def render_source(self, w: torch.Tensor) -> torch.Tensor:
        return self._source_generator().synthesis(w, noise="const")

    def invert(self, images: torch.Tensor) -> tuple[torch.Tensor, float]:
        """W+ latents reproducing ``images`` (B, C, S, S) in [-1, 1] (pixel MSE); and the final MSE."""
        g = self.backbone.generator
        if tuple(images.shape[1:]) != (g.img_channels, g.size, g.size):
            raise DataError(f"an image to invert must be {g.img_channels}x{g.size}x{g.size}, got {tuple(images.shape[1:])}")
        start = g.broadcast(self.mean_latent().expand(images.shape[0], -1)).clone()
        with torch.enable_grad():
            return core.invert(self.render_source, images.to(start), start, self.params.invert_steps)

    # -- global directions -----------------------------------------------------
    def channel_directions(self) -> core.ChannelDirections:
        """Every StyleSpace channel's CLIP direction (measured once, then kept)."""
        if self._channels is None:
            g = self.backbone.generator
            n = self.params.relevance_images
            ws = self.latents_from_seeds(range(STATS_SEED, STATS_SEED + n), space="w+")
            std_ws = self.latents_from_seeds(range(STATS_SEED + n, STATS_SEED + n + 1024), space="w+")
            layers = [i for i, layer in enumerate(g.style_layers()) if self.params.include_to_rgb or layer.demodulate]
            self._channels = core.channel_directions(
                g.styles, lambda s: self.backbone.synthesis_from_styles(s), self.guide.image_features,
                ws, std_ws, layers, self.params.relevance_magnitude,
            )
        return self._channels

    # -- editing -------------------------------------------------------------
    def remember_initial(self) -> None:
        """Keep the methods' parameters as they are now (their initial values), for the generator-mode strip."""
        self._initial = {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    def source_latents(self, seeds: Sequence[int] | None = None, w: torch.Tensor | None = None,
                       images: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """The source latents of an edit: from seeds, given latents, or inverted images."""
        given = [x is not None for x in (seeds, w, images)]
        if sum(given) != 1:
            raise SpecError("an edit needs exactly one source: seeds, a saved w, or an image to invert")
        g = self.backbone.generator
        device = g.input.input.device
        if seeds is not None:
            space = "w+" if self.params.mode == "global" else self.params.space
            return self.latents_from_seeds(seeds, space), {}
        if w is not None:
            w = w.to(device=device, dtype=torch.float32)
            if w.ndim == 1:
                w = w[None]
            if w.shape[-1] != g.style_dim or w.ndim not in (2, 3) or (w.ndim == 3 and w.shape[1] != g.n_latent):
                raise DataError(f"a saved w must be (style_dim={g.style_dim},), (B, {g.style_dim}) or (B, {g.n_latent}, {g.style_dim}); got {tuple(w.shape)}")
            if self.params.mode == "global" or (self.params.space == "w+" and w.ndim == 2):
                w = g.broadcast(w).clone()
            elif self.params.space == "w" and w.ndim == 3:
                raise DataError("task.space is 'w' but the saved latent is W+; set task.space=w+")
            return w, {}
        if self.params.space == "w" and self.params.mode == "latent":
            raise DataError("an inverted image is a W+ latent; set task.space=w+ to edit it")
        latents, mse = self.invert(images)
        return latents, {"inversion_mse": mse}

    def edit(self, seeds: Sequence[int] | None = None, w: torch.Tensor | None = None, images: torch.Tensor | None = None,
             prompt: str | None = None, neutral: str | None = None, alphas: Sequence[float] | None = None) -> EditResult:
        """Edit the sources (exactly one of seeds / w / images) towards ``prompt`` as the mode says."""
        mode = self.params.mode
        alphas = list(alphas) if alphas is not None else self.params.default_alphas()
        was_training = self.training
        self.eval()
        try:
            w_source, info = self.source_latents(seeds, w, images)
            target = self.text_target(prompt).detach()
            if mode == "latent":
                result = self._edit_latent(w_source, target, alphas)
            elif mode == "global":
                result = self._edit_global(w_source, self.text_direction(prompt, neutral).detach(), alphas)
            else:
                result = self._edit_generator(w_source, alphas)
        finally:
            self.train(was_training)
        result.info.update(info)
        self._measure(result, target, neutral or self.params.neutral)
        return result

    def _edit_latent(self, w_source: torch.Tensor, target: torch.Tensor, alphas: list[float]) -> EditResult:
        p = self.params
        with torch.enable_grad():
            edited = core.optimise_latent(
                self.render, self.guide.image_features, w_source, target, steps=p.steps, lr=p.lr,
                l2_lambda=p.l2_lambda, image_lambda=p.image_lambda, max_distance=p.max_distance,
            )
        with torch.no_grad():
            before, after = self.render(w_source), self.render(edited.w)
            strip = torch.stack([self.render(w_source + a * (edited.w - w_source)) for a in alphas], 1)
        distance = (edited.w - w_source).flatten(1).norm(dim=1)
        result = EditResult("latent", before, after, strip, alphas, w_source=w_source, w_edit=edited.w)
        result.metrics["latent_distance"] = distance.tolist()
        return result

    @torch.no_grad()
    def _edit_global(self, w_source: torch.Tensor, direction: torch.Tensor, alphas: list[float]) -> EditResult:
        channels = self.channel_directions()
        delta, moved = core.global_direction(channels, direction, self.params.beta)
        styles = self.backbone.styles(w_source)
        draw = self.backbone.synthesis_from_styles
        before = draw(styles)
        after = draw(core.apply_style_delta(styles, channels, delta, self.params.alpha))
        strip = torch.stack([draw(core.apply_style_delta(styles, channels, delta, a)) for a in alphas], 1)
        result = EditResult("global", before, after, strip, alphas, w_source=w_source,
                            info={"channels_moved": moved, "channels_total": int(delta.numel())})
        result.metrics["style_distance"] = [float(self.params.alpha * delta.norm())] * len(before)
        return result

    @torch.no_grad()
    def _edit_generator(self, w_source: torch.Tensor, alphas: list[float]) -> EditResult:
        before, after = self.render_source(w_source), self.render(w_source)
        frames = []
        trained = {n: p for n, p in self.named_parameters() if p.requires_grad}
        initial = self._initial or {}
        saved = {n: p.detach().clone() for n, p in trained.items()}
        try:
            for a in alphas:
                for name, p in trained.items():
                    start = initial.get(name, saved[name])
                    p.copy_(start + a * (saved[name] - start))
                frames.append(self.render(w_source))
        finally:
            for name, p in trained.items():
                p.copy_(saved[name])
        return EditResult("generator", before, after, torch.stack(frames, 1), alphas, w_source=w_source)

    @torch.no_grad()
    def _measure(self, result: EditResult, target: torch.Tensor, neutral: str | None) -> None:
        before, after = self.guide.image_features(result.before), self.guide.image_features(result.after)
        result.metrics["clip_before"] = (before @ target).tolist()
        result.metrics["clip_after"] = (after @ target).tolist()
        if neutral:
            text = self.guide.text_features([neutral])[0]
            result.metrics["neutral_before"] = (before @ text).tolist()
            result.metrics["neutral_after"] = (after @ text).tolist()
            result.metrics["closer_to_prompt"] = ((after @ target) > (after @ text)).float().tolist()
        result.metrics["pixel_distance"] = (result.after - result.before).float().flatten(1).pow(2).mean(1).sqrt().tolist()

    # -- training (generator mode) -------------------------------------------
    def training_step(self, batch: dict[str, Any]) -> StepOutput:
        if self.params.mode != "generator":
            raise RunError(
                f"task.mode '{self.params.mode}' edits latents and trains no parameters, but the spec's methods add some; "
                "drop the methods, or use mode: generator to adapt the generator (StyleGAN-NADA)"
            )
        if self._initial is None:
            self.remember_initial()
        seeds = batch["seeds"]
        w = self.latents_from_seeds(seeds.tolist(), space="w+")
        with torch.no_grad():
            source = self.guide.image_features(self.render_source(w))
        edited_images = self.render(w)
        edited = self.guide.image_features(edited_images)
        direction = self.text_direction().detach()
        loss = core.directional_loss(source, edited, direction).mean()
        logs = {"directional": float(loss.detach())}
        if self.params.clip_lambda > 0:
            global_loss = (1 - edited @ self.text_target().detach()).mean()
            loss = loss + self.params.clip_lambda * global_loss
            logs["global"] = float(global_loss.detach())
        return StepOutput(loss, len(seeds), logs)

    # -- evaluation ------------------------------------------------------------
    def evaluate(self, batches: Iterable[dict[str, Any]]) -> dict[str, Any]:
        seeds = [int(s) for b in batches for s in b["seeds"].tolist()]
        if not seeds:
            return {}
        per_source: dict[str, list[float]] = {}
        shown: EditResult | None = None
        info: dict[str, Any] = {}
        for start in range(0, len(seeds), 64):
            result = self.edit(seeds=seeds[start : start + 64])
            for key, values in result.metrics.items():
                per_source.setdefault(key, []).extend(values)
            info.update({k: v for k, v in result.info.items() if isinstance(v, (int, float))})
            if shown is None:
                shown = result
        summary = EditResult(self.params.mode, torch.empty(0), torch.empty(0), torch.empty(0), [], per_source, info=info).summary()
        # the first sources' images travel with the metrics to write_artifacts (not a number: not logged)
        return {**summary, "count": len(seeds), "shown": shown}

    def write_artifacts(self, metrics: dict[str, Any], output_dir: Path, split: str) -> list[str]:
        shown = metrics.get("shown")
        if not isinstance(shown, EditResult):
            return []
        k = min(self.params.strip_sources, len(shown.before))
        prompt = self.params.prompt
        before_after = save_strips(
            [torch.stack([shown.before[i], shown.after[i]]) for i in range(k)], output_dir / f"edit_{split}.png",
            column_titles=["before", "after"], title=f"{self.params.mode}: '{prompt}'",
        )
        alpha = save_strips(
            [shown.strip[i] for i in range(min(k, 3))], output_dir / f"edit_alpha_{split}.png",
            column_titles=[f"alpha {a:g}" for a in shown.alphas], title=f"{self.params.mode}: '{prompt}'",
        )
        per_source = output_dir / f"edit_{split}.json"
        per_source.write_text(json.dumps({"prompt": prompt, "neutral": self.params.neutral, "mode": self.params.mode,
                                          "metrics": shown.metrics, "info": shown.info}, indent=2) + "\n")
        return [before_after.name, alpha.name, per_source.name]


def build_clip(clip_spec: dict[str, Any], ctx: Any) -> Any:
    """Build the guiding CLIP backbone from its spec fragment, frozen and in eval mode."""
    from adaptkit.builder import build_nested_backbone

    clip = build_nested_backbone(clip_spec, ctx, "task.clip", needs=("image_features", "text_features"))
    return clip.requires_grad_(False).eval()
