"""The classification task model (imports torch)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adaptkit.errors import DataError
from adaptkit.surface import LayerSite, Surface
from adaptkit.task import StepOutput, TaskModel


class ClassificationModel(TaskModel):
    primary_metric = "accuracy"

    def __init__(self, backbone: Any, num_classes: int, class_names: list[str], label_smoothing: float, top_k: int) -> None:
        super().__init__(backbone)
        self.class_names = class_names
        self.label_smoothing = label_smoothing
        self.top_k = top_k
        self.head = nn.Linear(backbone.feature_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def create(cls, params: Any, backbone: Any, info: Any) -> "ClassificationModel":
        num_classes = params.num_classes or info.num_classes
        if num_classes < 2:
            raise DataError(f"classification needs at least 2 classes; the data has {info.num_classes}")
        if info.channels is not None and info.channels != backbone.in_chans:
            raise DataError(
                f"data: images have {info.channels} channels but backbone '{backbone.registered_name}' expects "
                f"{backbone.in_chans}; set data.channels={backbone.in_chans}"
            )
        names = list(info.class_names) or [str(i) for i in range(num_classes)]
        return cls(backbone, num_classes, names, params.label_smoothing, params.top_k)

    def extend_surface(self, surface: Surface) -> None:
        tower = surface.towers.get("vision") or next(iter(surface.towers.values()))
        tower.layers.append(LayerSite("head", "head", self.head))

    def native_modules(self, native: nn.Module) -> dict[str, str]:
        name = self.backbone.native_classifier(native, self.head)
        return {"head": name} if name is not None else {}

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.encode_image(images))

    def training_step(self, batch: dict[str, Any]) -> StepOutput:
        logits = self.logits(batch["images"]).float()
        labels = batch["labels"]
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        return StepOutput(loss, len(labels))

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, Any]]) -> dict[str, Any]:
        scored = ((self.logits(batch["images"]).float(), batch["labels"]) for batch in batches)
        return classification_metrics(scored, self.class_names, self.top_k, self.head.out_features)

    def write_artifacts(self, metrics: dict[str, Any], output_dir: Path, split: str) -> list[str]:
        if "confusion_matrix" not in metrics:
            return []
        matrix = metrics["confusion_matrix"]
        csv = output_dir / f"confusion_matrix_{split}.csv"
        lines = ["true\\predicted," + ",".join(self.class_names)]
        lines += [f"{name}," + ",".join(str(v) for v in row) for name, row in zip(self.class_names, matrix)]
        csv.write_text("\n".join(lines) + "\n")
        png = output_dir / f"confusion_matrix_{split}.png"
        _plot_confusion(matrix, self.class_names, png, f"{split}: accuracy {metrics['accuracy']:.3f}")
        return [csv.name, png.name]


@torch.no_grad()
def classification_metrics(
    scored: Iterable[tuple[torch.Tensor, torch.Tensor]], class_names: list[str], top_k: int, num_classes: int | None = None
) -> dict[str, Any]:
    """Accuracy, loss, per-class accuracy, confusion matrix and top-k accuracy of (logits, labels) batches."""
    n = num_classes or len(class_names)
    confusion = torch.zeros(n, n, dtype=torch.long)
    loss_sum, count, topk_hits = 0.0, 0, 0
    k = min(top_k, n)
    for logits, labels in scored:
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        count += len(labels)
        predicted = logits.argmax(dim=1)
        confusion += torch.bincount(labels.cpu() * n + predicted.cpu(), minlength=n * n).reshape(n, n)
        topk_hits += (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum().item()
    if count == 0:
        return {}
    per_class = confusion.diag().float() / confusion.sum(dim=1).clamp(min=1).float()
    metrics: dict[str, Any] = {
        "accuracy": confusion.diag().sum().item() / count,
        "loss": loss_sum / count,
        "per_class_accuracy": {name: round(float(a), 4) for name, a in zip(class_names, per_class)},
        "confusion_matrix": confusion.tolist(),
        "count": count,
    }
    if n > top_k:
        metrics[f"top{top_k}_accuracy"] = topk_hits / count
    return metrics


def _plot_confusion(matrix: list[list[int]], names: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(3.5, 0.45 * len(names) + 1.5)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=90 if len(names) > 12 else 0)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if len(names) <= 20:
        peak = max(max(row) for row in matrix) or 1
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                ax.text(j, i, str(value), ha="center", va="center", fontsize=7, color="white" if value > peak / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
