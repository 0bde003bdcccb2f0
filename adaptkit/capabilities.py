"""What a task model or backbone can do beyond its base class, declared as Protocols.

The core asks ``isinstance(model, Generates)``, never ``getattr(model, "generate")``: a
task that implements the members of a Protocol has that capability, and the core needs
no name of any plugin to find out. The Protocols are ``runtime_checkable``, so
``isinstance`` checks that the members exist (their signatures are documented here and
checked by type checkers).

Example::

    from adaptkit.capabilities import Generates

    if not isinstance(model, Generates):
        raise CompatibilityError("this task does not generate images")
    images, rows = model.generate(num=4, seed=0)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Generates(Protocol):
    """A task model that samples images (``adaptkit generate``).

    ``generate(num=, seed=, batch_size=, **conditions)`` returns the images,
    (rows * num, C, H, W) in [-1, 1] grouped by row, and one caption per row. The
    conditions are the task's own (prompts, classes, source images, sampler settings).
    """

    def generate(self, *, num: int = 16, seed: int | None = None, batch_size: int | None = None,
                 **conditions: Any) -> tuple[torch.Tensor, list[str]]: ...


@runtime_checkable
class Edits(Protocol):
    """A task model that edits images towards a target (from seeds, latents or pictures).

    ``edit(seeds=, w=, images=, alphas=)`` takes one kind of source and returns the
    task's result object (before / after images and measurements).
    """

    def edit(self, seeds: Sequence[int] | None = None, w: torch.Tensor | None = None,
             images: torch.Tensor | None = None, alphas: Sequence[float] | None = None) -> Any: ...


@runtime_checkable
class HasClassNames(Protocol):
    """A task model that knows the names of its classes, in label order (``adaptkit classify``
    ranks them when no labels are given)."""

    class_names: list[str]


@runtime_checkable
class KeepsTrainingState(Protocol):
    """A task model that keeps tensors besides its trained parameters (an EMA of them).

    ``extra_state()`` returns them for every checkpoint, ``load_extra_state(tensors)``
    restores them when a run resumes, and ``finish_training()`` runs once after the last
    optimizer step: it puts into the trained parameters what the run reports, so that the
    final metrics, the adapter file and a merge all describe one model. Under fsdp the copies
    are made from the sharded trained tensors (sharded alike; a checkpoint's, restored whole, are
    placed so by :class:`adaptkit.ema.WeightAverage`), and gathered whole for checkpoints.
    """

    def extra_state(self) -> dict[str, torch.Tensor]: ...

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None: ...

    def finish_training(self) -> None: ...
