"""Base class of task models (imports torch)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaptkit.backbone import Backbone
from adaptkit.surface import Surface


@dataclass
class StepOutput:
    """One training micro-step: the mean ``loss`` over ``count`` samples, plus logs."""

    loss: torch.Tensor
    count: int
    logs: dict[str, float] = field(default_factory=dict)


class TaskModel(nn.Module):
    """A backbone plus what a task adds (a head, a loss, metrics).

    The build freezes every backbone weight; modules the task adds (a fresh head)
    stay trainable; methods decide the rest. Subclasses implement
    :meth:`training_step` and :meth:`evaluate`, and may add sites of their own in
    :meth:`extend_surface` (the classification head is a ``head`` layer site).
    """

    #: the metric the progress bar and curves follow (higher is better unless it ends in "loss")
    primary_metric: str = "loss"
    #: under DDP, tolerate trainable parameters that a step leaves without gradient (a
    #: method may unfreeze a whole tower whose model holds parameters its forward never uses)
    ddp_find_unused_parameters: bool = False

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone
        self._surface: Surface | None = None

    @property
    def surface(self) -> Surface:
        if self._surface is None:
            base = self.backbone.surface
            towers = {name: tower.prefixed("backbone.") for name, tower in base.towers.items()}
            self._surface = Surface(base.backbone, towers, root=self)
            self.extend_surface(self._surface)
        return self._surface

    def extend_surface(self, surface: Surface) -> None:
        """Add the task's own sites (e.g. the head) to the surface."""

    def forward(self, batch: dict[str, Any]) -> StepOutput:
        """One training micro-step (``forward`` so that DDP synchronises gradients)."""
        return self.training_step(batch)

    def training_step(self, batch: dict[str, Any]) -> StepOutput:  # pragma: no cover - interface
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, Any]]) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError

    # -- training-loop hooks (all optional; the defaults do nothing) -------------
    # A task that keeps tensors besides its trained ones (an EMA) also implements
    # adaptkit.capabilities.KeepsTrainingState: extra_state, load_extra_state, finish_training.
    def after_optimizer_step(self, step: int) -> None:
        """Called by the trainer after every optimizer step; ``step`` counts from 1.

        A task that keeps running averages of its weights (EMA) updates them here.
        """

    def native_modules(self, native: nn.Module) -> dict[str, str]:
        """Put the task's own trained modules into ``native`` (the backbone's plain library model)
        where the library has a place for them; return {our module name: native module name}.

        The classification task puts its head where the library keeps a classifier.
        """
        return {}

    def write_artifacts(self, metrics: dict[str, Any], output_dir: Path, split: str) -> list[str]:
        """Write task-specific files (confusion matrix, samples); return their names. Under
        fsdp every process calls it (in the same order; the others into a scratch directory),
        so that it may run the sharded model."""
        return []

    @staticmethod
    def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
        """The plain-number entries of ``metrics`` (what goes in metrics.jsonl and curves)."""
        return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
