"""DreamBooth inside the text_to_image task: instance captions, class images, prior loss (imports torch).

See :mod:`adaptkit_plugins.diffusion.dreambooth` for the options. The class images are
sampled once, before the first training step, with the task's own sampling settings and
the spec's seed, and kept in the run directory (``class_images.safetensors``, at most
``num_class_images`` images), so a resumed run reads them back instead of sampling from a
model that has trained since.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from adaptkit.errors import CompatibilityError, DataError

#: the file in the run directory that holds the sampled class images
CLASS_IMAGES_FILE = "class_images.safetensors"
#: the batch key that marks a batch of class images (its captions are the class prompt)
CLASS_BATCH = "dreambooth_class"


class DreamBooth:
    """The DreamBooth part of one text_to_image model."""

    def __init__(self, params: Any) -> None:
        self.params = params
        self.class_images: torch.Tensor | None = None

    @classmethod
    def create(cls, params: Any, backbone: Any) -> "DreamBooth | None":
        """None when the task has no ``instance_prompt``; an error if the model is not conditioned on text."""
        if params.instance_prompt is None:
            return None
        if backbone.conditioning != "text":
            raise CompatibilityError(
                f"task.instance_prompt: DreamBooth captions every image, but this model is conditioned on "
                f"'{backbone.conditioning}', not text; use a text-conditioned backbone (conditioning: text)"
            )
        return cls(params)

    def prompts(self) -> list[str]:
        """What ``samples.png`` shows: the instance prompt, and the class prompt with prior preservation."""
        return [self.params.instance_prompt] + ([self.params.class_prompt] if self.params.prior_preservation else [])

    def captions(self, batch: dict[str, Any], count: int) -> list[str]:
        """The captions of a batch: the class prompt for class images, else the instance prompt."""
        prompt = self.params.class_prompt if batch.get(CLASS_BATCH) else self.params.instance_prompt
        return [prompt] * count

    def prior_loss(self, model: Any, batch: dict[str, Any]) -> torch.Tensor | float:
        """For an instance batch: ``prior_loss_weight`` times the denoising loss of as many class
        images drawn at random (0 without prior preservation, or for a class batch).

        The draw uses the global random stream, as the task's noise does, so every process of
        a distributed run draws the same indices for all and keeps its own row.
        """
        images = self.ensure_class_images(model)
        if images is None or batch.get(CLASS_BATCH):
            return 0.0
        count = len(batch["images"])
        world, rank = _world()
        pick = torch.randint(0, images.shape[0], (world, count))[rank]
        device = next(model.parameters()).device
        batch = {"images": images[pick].to(device), CLASS_BATCH: True}
        return self.params.prior_loss_weight * model.training_step(batch).loss

    def ensure_class_images(self, model: Any) -> torch.Tensor | None:
        """The class images (None without prior preservation): from the run directory when there,
        else sampled now and saved there. The task calls this before a training step's forward
        pass: sampling swaps weights in place, which must not happen under a recorded graph."""
        if not self.params.prior_preservation:
            return None
        if self.class_images is None:
            path = class_images_path(model)
            self.class_images = read_class_images(path, self._recipe(model)) if path.is_file() else None
            if self.class_images is None:
                # every process samples the same images (same seed); the first one keeps them
                self.class_images = sample_class_images(model, self.params.class_prompt, self.params.num_class_images, self._seed(model))
                if _world()[1] == 0:
                    write_class_images(path, self.class_images, self._recipe(model))
        return self.class_images

    def _seed(self, model: Any) -> int:
        return int(model.adaptkit.spec.seed)

    def _recipe(self, model: Any) -> dict[str, str]:
        """What decides the class images; a file made by another recipe is not reused."""
        return {"class_prompt": self.params.class_prompt, "num_class_images": str(self.params.num_class_images),
                "seed": str(self._seed(model))}


def _world() -> tuple[int, int]:
    from adaptkit_plugins.diffusion._text_to_image_impl import _world as world  # (imports this module)

    return world()


def class_images_path(model: Any) -> Path:
    """Where a built model's run keeps its class images."""
    from adaptkit.runner import output_dir_for

    return output_dir_for(model.adaptkit.spec) / CLASS_IMAGES_FILE


def sample_class_images(model: Any, prompt: str, count: int, seed: int) -> torch.Tensor:
    """``count`` images of ``prompt`` from the model as built, with its methods switched off where they
    can be; clamped to [-1, 1], the range of training images (diffusers saves them as PNG files)."""
    switched = [m for m in model.adaptkit.methods if m.switchable]
    for method in switched:
        method.set_enabled(False)
    try:
        batch_size = int(model.adaptkit.spec.train.batch_size)
        images, _ = model.generate(prompts=[prompt], num=count, seed=seed, batch_size=batch_size)
    finally:
        for method in switched:
            method.set_enabled(True)
    return images.clamp(-1.0, 1.0)


def write_class_images(path: Path, images: torch.Tensor, recipe: dict[str, str]) -> None:
    from adaptkit.checkpoint import save_tensors

    save_tensors(path, {"images": images}, metadata=recipe)


def read_class_images(path: Path, recipe: dict[str, str]) -> torch.Tensor:
    """The images of ``path``; an error if they were sampled for another prompt, count or seed."""
    from adaptkit.checkpoint import load_tensors

    tensors, metadata = load_tensors(path)
    other = {k: metadata.get(k) for k in recipe if metadata.get(k) != recipe[k]}
    if other or "images" not in tensors:
        raise DataError(
            f"{path}: these class images were sampled with {other or 'another layout'}, not this spec's "
            f"{ {k: recipe[k] for k in other} }; delete the file to sample new ones, or start a new run"
        )
    return tensors["images"]
