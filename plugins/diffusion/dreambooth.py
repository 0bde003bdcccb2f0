"""DreamBooth options of the ``text_to_image`` task (Ruiz et al., 2023; no torch here).

Every training image is captioned ``instance_prompt`` ("a photo of sks digit"). With
``prior_preservation``, ``num_class_images`` images of ``class_prompt`` ("a photo of a
digit") are first sampled from the model as built (the base model: methods that can
be switched off are, and identity-at-init ones such as LoRA change nothing yet), and
every step adds their denoising loss, weighted by ``prior_loss_weight``, to the
instance loss, as diffusers' ``train_dreambooth.py`` does:
``loss = instance loss + prior_loss_weight * class loss``.
"""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator

#: the options that only mean something with prior preservation
PRIOR_OPTIONS = ("class_prompt", "num_class_images", "prior_loss_weight")


class DreamBoothOptions(BaseModel):
    """The DreamBooth fields of :class:`~adaptkit_plugins.diffusion.text_to_image.TextToImageParams`."""

    instance_prompt: str | None = Field(
        None, min_length=1, description="DreamBooth: the caption of every training image, e.g. 'a photo of sks digit' (text models)"
    )
    prior_preservation: bool = Field(
        False, description="DreamBooth: also train on images of class_prompt sampled from the base model before training"
    )
    class_prompt: str | None = Field(None, min_length=1, description="DreamBooth: the prompt of the class images, e.g. 'a photo of a digit'")
    num_class_images: int = Field(100, gt=0, description="DreamBooth: how many class images to sample (kept in the run directory)")
    prior_loss_weight: float = Field(1.0, ge=0, allow_inf_nan=False, description="DreamBooth: weight of the class images' loss")

    @model_validator(mode="after")
    def _dreambooth(self) -> "DreamBoothOptions":
        if self.prior_preservation and (self.instance_prompt is None or self.class_prompt is None):
            missing = " and ".join(f for f in ("instance_prompt", "class_prompt") if getattr(self, f) is None)
            raise ValueError(f"prior_preservation needs {missing} (e.g. instance_prompt: 'a photo of sks digit', class_prompt: 'a photo of a digit')")
        # by value, not by model_fields_set: a run's saved spec writes every field out
        given = [o for o in PRIOR_OPTIONS if getattr(self, o) != type(self).model_fields[o].default]
        if given and not self.prior_preservation:
            verb = "applies" if len(given) == 1 else "apply"
            raise ValueError(f"{', '.join(given)} only {verb} with prior_preservation: true")
        return self
