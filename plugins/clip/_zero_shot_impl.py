"""The zero-shot / few-shot classification model (imports torch)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from adaptkit.errors import DataError
from adaptkit.task import StepOutput, TaskModel


class ZeroShotModel(TaskModel):
    """Logits ``logit_scale * normalize(image) @ normalize(text(class)).T``; no new weights.

    The class texts go through the backbone's text site, so ``system_prompt``
    templates (and ensembles) and learned context (CoOp) shape the classifier.
    """

    primary_metric = "accuracy"

    def __init__(self, backbone: Any, class_names: list[str], top_k: int) -> None:
        super().__init__(backbone)
        self.class_names = class_names
        self.top_k = top_k
        self._cached: torch.Tensor | None = None

    @classmethod
    def create(cls, params: Any, backbone: Any, info: Any) -> "ZeroShotModel":
        names = list(params.class_names) if params.class_names is not None else list(info.class_names)
        if params.class_names is not None and info.num_classes and len(names) != info.num_classes:
            raise DataError(f"task.class_names: {len(names)} names given, but the data has {info.num_classes} classes ({', '.join(info.class_names)})")
        if len(names) < 2:
            raise DataError("zero_shot needs at least two class names (the data has none: set task.class_names)")
        if info.channels is not None and info.channels != backbone.in_chans:
            raise DataError(
                f"data: images have {info.channels} channels but backbone '{backbone.registered_name}' expects "
                f"{backbone.in_chans}; set data.channels={backbone.in_chans}"
            )
        return cls(backbone, names, params.top_k)

    def class_features(self) -> torch.Tensor:
        """Normalised text features of every class (classes, dim)."""
        return self.backbone.encode_text(self.class_names, normalize=True)

    def _training_features(self) -> torch.Tensor:
        # when nothing trainable reaches the text tower, its features are constant: compute them once
        if self._cached is not None:
            return self._cached
        features = self.class_features()
        if not features.requires_grad:
            self._cached = features.detach()
        return features

    def logits(self, images: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        image_features = self.backbone.encode_image(images, normalize=True)
        return self.backbone.logit_scale * image_features @ text_features.to(image_features.dtype).T

    def training_step(self, batch: dict[str, Any]) -> StepOutput:
        logits = self.logits(batch["images"], self._training_features()).float()
        labels = batch["labels"]
        return StepOutput(F.cross_entropy(logits, labels), len(labels))

    def train(self, mode: bool = True) -> "ZeroShotModel":
        self._cached = None
        return super().train(mode)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax over the classes for each image (n, classes)."""
        return self.logits(images, self.class_features()).float().softmax(dim=-1)

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, Any]]) -> dict[str, Any]:
        from adaptkit_plugins.tasks.classification_model import classification_metrics

        def scored() -> Any:
            text_features = None
            for batch in batches:
                if "labels" not in batch:
                    raise DataError("zero_shot evaluation needs labelled images; this data has no labels")
                if text_features is None:  # once per evaluation, only when there is something to score
                    text_features = self.class_features()
                yield self.logits(batch["images"], text_features).float(), batch["labels"]

        return classification_metrics(scored(), self.class_names, self.top_k)

    def write_artifacts(self, metrics: dict[str, Any], output_dir: Path, split: str) -> list[str]:
        from adaptkit_plugins.tasks.classification_model import ClassificationModel

        return ClassificationModel.write_artifacts(self, metrics, output_dir, split)  # same files, same layout
