"""Task ``clip_stylegan_edit``: CLIP-guided StyleGAN editing (StyleCLIP latent / global, StyleGAN-NADA)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from adaptkit.hookspecs import hookimpl
from adaptkit.params import ComponentParams
from adaptkit.records import TaskRecord

MODES = ("latent", "global", "generator")


class ClipStyleGanEditParams(ComponentParams):
    """Edit StyleGAN images towards a text prompt, guided by a (frozen) CLIP.

    ``latent``: StyleCLIP latent optimisation per source image (defaults from the
    paper: lr 0.1, 300 steps, l2_lambda 0.008, truncation 0.7, W+). ``global``:
    StyleCLIP global directions in StyleSpace (needs ``neutral``; ``alpha``, ``beta``).
    ``generator``: StyleGAN-NADA, the spec's methods (e.g. LoRA on the synthesis
    convs) adapt the generator with a CLIP directional loss (needs ``neutral``).
    """

    name: Literal["clip_stylegan_edit"] = "clip_stylegan_edit"
    mode: Literal["latent", "global", "generator"] = Field("latent", description="latent, global or generator (see above)")
    prompt: str = Field(..., min_length=1, description="the target text, e.g. 'a handwritten digit eight'")
    neutral: str | None = Field(None, description="the source text, e.g. 'a handwritten digit three' (global and generator modes)")
    templates: list[str] = Field(["{}"], min_length=1, description="text templates with {} (prompt features are averaged over them)")
    clip: dict[str, Any] = Field(
        default_factory=lambda: {"name": "clip", "model": "clip_tiny_digits"},
        description="the guiding CLIP backbone, as a backbone spec (name, model, pretrained, ...); it stays frozen",
    )
    truncation: float = Field(0.7, gt=0, le=1, description="truncation of source latents drawn from seeds")
    # latent mode
    space: Literal["w", "w+"] = Field("w+", description="latent mode: optimise one w per image (W) or one per layer (W+)")
    steps: int = Field(300, gt=0, description="latent mode: optimisation steps")
    lr: float = Field(0.1, gt=0, description="latent mode: peak Adam learning rate (StyleCLIP's ramp)")
    l2_lambda: float = Field(0.008, ge=0, description="latent mode: weight of |w - w_source|^2")
    image_lambda: float = Field(0.0, ge=0, description="latent mode: weight of a pixel MSE to the source image (an identity term)")
    max_distance: float | None = Field(None, gt=0, description="latent mode: keep |w - w_source| <= this (projected after each step)")
    # global mode
    alpha: float = Field(4.0, description="global mode: edit strength (in style standard deviations for the top channel)")
    beta: float = Field(0.1, ge=0, lt=1, description="global mode: relevance threshold; channels below it stay unchanged")
    relevance_images: int = Field(32, gt=0, description="global mode: images used to measure each channel's CLIP direction")
    relevance_magnitude: float = Field(5.0, gt=0, description="global mode: channel perturbation (+-, in standard deviations)")
    include_to_rgb: bool = Field(False, description="global mode: also move ToRGB style channels (StyleCLIP leaves them)")
    # generator mode
    clip_lambda: float = Field(0.0, ge=0, description="generator mode: weight of the global CLIP loss next to the directional loss")
    # inversion and outputs
    invert_steps: int = Field(300, gt=0, description="steps to invert a source image into W+")
    alphas: list[float] | None = Field(None, description="edit strengths of the strip over alpha; default per mode")
    strip_sources: int = Field(6, gt=0, description="sources shown in the before/after strips a run writes")

    @field_validator("templates")
    @classmethod
    def _templates(cls, value: list[str]) -> list[str]:
        bad = [t for t in value if "{}" not in t]
        if bad:
            raise ValueError(f"every template needs a {{}} for the prompt; got {bad[0]!r}")
        return value

    @field_validator("clip")
    @classmethod
    def _clip(cls, value: dict[str, Any]) -> dict[str, Any]:
        name = value.get("name")
        if not name:
            raise ValueError("give the CLIP backbone's name, e.g. {name: clip, model: clip_tiny_digits}")
        from adaptkit.errors import PluginError
        from adaptkit.registry import registry
        from adaptkit.spec import validation_problems

        reg = registry()
        try:
            record = reg.get("backbone", str(name))
        except PluginError as exc:
            raise ValueError(str(exc)) from None
        missing = {"image_features", "text_features"} - set(record.capabilities)
        if missing:
            raise ValueError(f"backbone '{name}' cannot guide edits: it lacks {', '.join(sorted(missing))} (use a clip backbone)")
        from pydantic import ValidationError

        try:
            record.params.model_validate(value)
        except ValidationError as exc:
            raise ValueError("; ".join(validation_problems(exc, record.params, ("clip",)))) from None
        return value

    @model_validator(mode="after")
    def _needs_neutral(self) -> "ClipStyleGanEditParams":
        if self.mode in ("global", "generator") and not self.neutral:
            raise ValueError(f"mode '{self.mode}' edits along the text direction neutral -> prompt: give neutral too")
        return self

    def default_alphas(self) -> list[float]:
        if self.alphas is not None:
            return list(self.alphas)
        if self.mode == "global":
            return [-self.alpha, -self.alpha / 2, 0.0, self.alpha / 2, self.alpha, 1.5 * self.alpha]
        return [0.0, 0.25, 0.5, 0.75, 1.0, 1.25]


def build_clip_stylegan_edit(params: ClipStyleGanEditParams, backbone: Any, data_info: Any, ctx: Any) -> Any:
    from adaptkit_plugins.stylegan._clip_edit_impl import ClipStyleGanEditModel

    return ClipStyleGanEditModel.create(params, backbone, data_info, ctx)


@hookimpl
def adaptkit_tasks() -> list[TaskRecord]:
    return [
        TaskRecord(
            name="clip_stylegan_edit",
            params=ClipStyleGanEditParams,
            factory=build_clip_stylegan_edit,
            summary="CLIP-guided StyleGAN editing: StyleCLIP latent optimisation / global directions, StyleGAN-NADA "
            "generator adaptation; before/after strips, CLIP similarity, distance",
            needs=frozenset({"style_generator"}),
            data_kinds=frozenset({"latent_seeds"}),
            example={"prompt": "a handwritten digit eight", "neutral": "a handwritten digit three", "steps": 5},
        )
    ]
