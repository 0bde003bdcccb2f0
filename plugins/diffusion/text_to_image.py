"""Task ``text_to_image``: DDPM training of a denoiser, classifier-free guidance, EMA, sampling.

Trains whatever stage a diffusion backbone exposes (``ddpm_unet``; the prior or the
decoder of ``unclip``) with L_simple = ||eps - eps_theta(x_t, t)||^2, drops the
condition with probability ``condition_dropout`` so that one model learns both the
conditional and the unconditional prediction, and keeps an exponential moving
average (EMA) of the trained weights, which evaluation, the saved adapter file and
generation use.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from adaptkit.hookspecs import hookimpl
from adaptkit.params import ComponentParams
from adaptkit.records import TaskRecord
from adaptkit_plugins.diffusion.dreambooth import DreamBoothOptions


class TextToImageParams(DreamBoothOptions, ComponentParams):
    """DDPM training and sampling settings (the sampling ones are defaults for ``adaptkit generate``)."""

    name: Literal["text_to_image"] = "text_to_image"
    condition_dropout: float = Field(0.1, ge=0, le=1, description="probability of training a sample with the null condition (classifier-free guidance)")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="EMA decay of the trained weights (warmed up as (1+s)/(10+s)); 0 disables EMA")
    class_ids: list[int] | None = Field(
        None, description="the model's class id of each data class, in the data's order (default 0, 1, ...); "
        "e.g. [5, 6, 7, 8, 9] to adapt a model of all ten digits on digits 5-9"
    )
    caption_template: str = Field("{label}", description="caption of a labelled image for text conditioning, e.g. 'a handwritten digit {label}'")
    sampler: Literal["ddim", "ddpm", "euler", "dpmsolver++", "pipeline"] | None = Field(
        None, description="diffusers scheduler for sampling (default: the backbone's, ddim; sd_pipeline: the folder's own, "
        "'pipeline'); ddim, ddpm, euler, dpmsolver++ (a pipeline's scheduler config switched to that class)"
    )
    negative_prompt: str | None = Field(None, description="what guidance steers away from instead of the empty prompt (text models)")
    steps: int = Field(50, gt=0, description="sampling steps")
    guidance_scale: float = Field(3.0, ge=0, allow_inf_nan=False, description="classifier-free guidance scale (1 = plain conditional sampling)")
    eta: float = Field(0.0, ge=0, le=1, description="DDIM noise (0 = deterministic DDIM, 1 = DDPM-like)")
    clip_sample: bool = Field(False, description="clip x0 to [-1, 1] each step (diffusers' default; ruins guidance >= 2)")
    preview: int = Field(4, ge=0, description="samples per class in samples.png after training (0: none)")
    seed: int = Field(0, description="seed of the preview samples")

    @field_validator("caption_template")
    @classmethod
    def _template(cls, value: str) -> str:
        try:
            filled = value.format(label="\0")
        except (KeyError, IndexError, ValueError):
            raise ValueError("write the class name as {label} and no other braces, e.g. 'a handwritten digit {label}'") from None
        if "\0" not in filled:
            raise ValueError("the template must contain {label}, e.g. 'a handwritten digit {label}'")
        return value


class TextToImageFlags:
    """The flags of ``adaptkit generate`` for a text_to_image run: what to sample and how."""

    def add_arguments(self, group: Any) -> None:
        group.add_argument("--prompt", dest="prompts", metavar="TEXT", action="append", default=[], help="a text prompt (repeatable; one grid row each)")
        group.add_argument("--class", dest="classes", metavar="NAME", action="append", default=[], help="a class name (repeatable)")
        group.add_argument("--image", dest="images", metavar="PATH", action="append", default=[],
                           help="a source image for variations (backbones conditioned on images; repeatable)")
        group.add_argument("--steps", metavar="N", type=int, default=None, help="sampling steps (default: the task's, 50)")
        group.add_argument("--sampler", choices=["ddim", "ddpm", "euler", "dpmsolver++", "pipeline"], default=None,
                           help="scheduler (default: the task's; a pipeline folder's own: pipeline)")
        group.add_argument("--negative-prompt", metavar="TEXT", default=None, help="what guidance steers away from (text models)")
        group.add_argument("--guidance", metavar="SCALE", type=float, default=None, help="classifier-free guidance scale (default: the task's)")
        group.add_argument("--eta", metavar="ETA", type=float, default=None, help="DDIM eta (0: deterministic)")

    def read(self, args: Any, model: Any) -> tuple[dict[str, Any], list[str]]:
        from pathlib import Path

        from adaptkit.commands.outputs import check_finite, check_image_file
        from adaptkit.errors import RunError

        if args.steps is not None and args.steps < 1:
            raise RunError(f"--steps must be at least 1, got {args.steps}")
        check_finite(args.guidance, "--guidance", low=0)
        check_finite(args.eta, "--eta", low=0, high=1)
        backbone = model.backbone
        size = backbone.image_size
        size = (size, size) if isinstance(size, int) else (tuple(size) if size else None)
        for image in args.images:
            if not Path(image).is_file():
                raise RunError(f"--image {image}: file not found" if not Path(image).exists() else f"--image {image}: not a file")
            note = check_image_file(image, "--image", backbone.in_chans, size)
            if note:
                print(f"note: {note}")
        conditions = {"prompts": args.prompts or None, "classes": args.classes or None, "images": args.images or None,
                      "steps": args.steps, "sampler": args.sampler, "guidance": args.guidance, "eta": args.eta,
                      "negative_prompt": args.negative_prompt}
        return conditions, list(args.images)


def build_text_to_image(params: TextToImageParams, backbone: Any, data_info: Any, ctx: Any) -> Any:
    from adaptkit_plugins.diffusion._text_to_image_impl import TextToImageModel

    return TextToImageModel.create(params, backbone, data_info)


@hookimpl
def adaptkit_tasks() -> list[TaskRecord]:
    return [
        TaskRecord(
            name="text_to_image",
            params=TextToImageParams,
            factory=build_text_to_image,
            summary="DDPM training (eps MSE), classifier-free guidance dropout, EMA; DDPM/DDIM sampling, `adaptkit generate`",
            needs=frozenset({"denoise"}),
            data_kinds=frozenset({"labelled_images", "captioned_images"}),
            generate_options=TextToImageFlags(),
        )
    ]
