"""The contrastive image-text model (imports torch)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from adaptkit.errors import DataError
from adaptkit.task import StepOutput, TaskModel


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """The symmetric cross-entropy of CLIP's pseudocode for n aligned pairs.

    ``logits = logit_scale * normalize(I) @ normalize(T).T``; labels = arange(n);
    loss = (CE(logits, labels) + CE(logits.T, labels)) / 2.
    """
    image_features = F.normalize(image_features, dim=-1)
    text_features = F.normalize(text_features, dim=-1)
    logits = logit_scale * image_features @ text_features.T
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def gather_batch(features: torch.Tensor) -> torch.Tensor:
    """Under torch.distributed, every process's features (differentiable, in rank order); else ``features``.

    CLIP's negatives are the whole global batch, not one process's share: each process
    computes the loss over the gathered batch, and the gather's backward sends every
    process the gradient of its own features (so DDP's average is the global gradient).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features
    from torch.distributed.nn.functional import all_gather

    sizes = [torch.zeros(1, dtype=torch.long, device=features.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(features)], device=features.device))
    counts = [int(size.item()) for size in sizes]
    longest = max(counts)
    if len(features) < longest:  # all_gather needs equal shapes: pad, gather, cut
        features = torch.cat([features, features.new_zeros(longest - len(features), *features.shape[1:])])
    return torch.cat([part[:count] for part, count in zip(all_gather(features), counts)])


class ContrastiveModel(TaskModel):
    def __init__(self, backbone: Any, class_names: list[str], templates: list[str]) -> None:
        super().__init__(backbone)
        self.class_names = class_names
        self.templates = templates
        # with class labels, zero-shot accuracy is what a CLIP is for; otherwise image -> caption retrieval
        self.primary_metric = "zero_shot_accuracy" if class_names else "i2t_accuracy"

    @classmethod
    def create(cls, params: Any, backbone: Any, info: Any) -> "ContrastiveModel":
        if info.channels is not None and info.channels != backbone.in_chans:
            raise DataError(
                f"data: images have {info.channels} channels but backbone '{backbone.registered_name}' expects "
                f"{backbone.in_chans}; set data.channels={backbone.in_chans}"
            )
        return cls(backbone, list(info.class_names), list(params.zero_shot_templates))

    def training_step(self, batch: dict[str, Any]) -> StepOutput:
        captions = batch["captions"]
        images = gather_batch(self.backbone.encode_image(batch["images"]).float())
        texts = gather_batch(self.backbone.encode_text(captions).float())
        return StepOutput(clip_loss(images, texts, self.backbone.logit_scale.float()), len(captions))

    def class_features(self) -> torch.Tensor:
        """Normalised features of each class name in the templates (an ensemble mean when several)."""
        from adaptkit.templates import fill

        texts = [fill(t, name) for name in self.class_names for t in self.templates]
        features = self.backbone.encode_text(texts, normalize=True).reshape(len(self.class_names), len(self.templates), -1)
        return F.normalize(features.mean(dim=1), dim=-1)

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, Any]]) -> dict[str, Any]:
        from adaptkit_plugins.clip.captions_data import unique_texts

        image_features, captions, labels = [], [], []
        loss_sum, count = 0.0, 0
        scale = self.backbone.logit_scale.float()
        for batch in batches:
            images = F.normalize(self.backbone.encode_image(batch["images"]).float(), dim=-1)
            texts = self.backbone.encode_text(batch["captions"]).float()
            if len(images) > 1:
                loss_sum += clip_loss(images, texts, scale).item() * len(images)
                count += len(images)
            image_features.append(images)
            captions += list(batch["captions"])
            if "labels" in batch:
                labels.append(batch["labels"])
        if not image_features:
            return {}
        images = torch.cat(image_features)
        distinct, index = unique_texts(captions)
        text_features = torch.cat([
            self.backbone.encode_text(distinct[i : i + 256], normalize=True).float() for i in range(0, len(distinct), 256)
        ])
        target = torch.as_tensor(index, device=images.device)
        metrics: dict[str, Any] = {
            "i2t_accuracy": ((images @ text_features.T).argmax(dim=1) == target).float().mean().item(),
            "distinct_captions": len(distinct),
            "count": len(images),
        }
        if count:
            metrics["loss"] = loss_sum / count
        if self.class_names and labels:
            y = torch.cat(labels).to(images.device)
            predicted = (images @ self.class_features().float().T).argmax(dim=1)
            metrics["zero_shot_accuracy"] = (predicted == y).float().mean().item()
        return metrics
