"""Task ``stylegan2``: train a StyleGAN2 generator adversarially (non-saturating loss + R1, EMA)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from adaptkit.hookspecs import hookimpl
from adaptkit.params import ComponentParams
from adaptkit.records import TaskRecord


class StyleGan2TaskParams(ComponentParams):
    """GAN training of a ``style_generator`` backbone against a discriminator the task owns.

    Set the optimizer like StyleGAN2 in ``train``: ``lr: 2.0e-3``, ``betas: [0.0, 0.99]``,
    ``weight_decay: 0``, ``grad_clip: null``, ``schedule: constant``, ``warmup: 0``.
    """

    name: Literal["stylegan2"] = "stylegan2"
    r1_gamma: float = Field(1.0, ge=0, description="weight of the R1 penalty on real images (gamma/2 * |grad D(x)|^2)")
    r1_every: int = Field(4, gt=0, description="lazy regularisation: apply R1 every N steps, scaled by N (StyleGAN2 uses 16)")
    mixing: float = Field(0.9, ge=0, le=1, description="style-mixing probability (two z's, random crossover layer)")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="decay of the generator's exponential moving average (ramped up at the start)")
    augment: Literal["none", "translation"] = Field(
        "none", description="differentiable augmentation of real and fake images before D (DiffAugment translation); "
        "on the digits it let the generator drift off-centre, so it is off by default")
    augment_shift: float = Field(0.125, ge=0, le=0.5, description="translation: largest shift, as a fraction of the image size")
    d_channels: dict[int, int] | None = Field(None, description="discriminator channels per resolution; default: the generator's")
    samples: int = Field(64, gt=0, description="images in the samples.png grid written after training")
    eval_samples: int = Field(256, gt=0, description="generated images compared with the real ones at each evaluation")


def build_stylegan2_task(params: StyleGan2TaskParams, backbone: Any, data_info: Any, ctx: Any) -> Any:
    from adaptkit_plugins.stylegan._gan_impl import StyleGan2TaskModel

    return StyleGan2TaskModel.create(params, backbone, data_info)


@hookimpl
def adaptkit_tasks() -> list[TaskRecord]:
    return [
        TaskRecord(
            name="stylegan2",
            params=StyleGan2TaskParams,
            factory=build_stylegan2_task,
            summary="StyleGAN2 training: non-saturating GAN loss + lazy R1, style mixing, EMA generator; "
            "writes samples.png and generator.safetensors (rosinality layout)",
            needs=frozenset({"style_generator"}),
            data_kinds=frozenset({"labelled_images"}),
            example={"r1_every": 2},
        )
    ]
