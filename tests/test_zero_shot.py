"""The zero_shot task: the text-classifier head, its metrics, and few-shot training through it."""

from __future__ import annotations

import json
import math

import pytest
import torch

import adaptkit
from adaptkit.backbone import Backbone
from adaptkit.builder import build
from adaptkit.errors import DataError
from adaptkit_plugins.clip._zero_shot_impl import ZeroShotModel


class VectorBackbone(Backbone):
    """Images are their own features (n, d, 1, 1); class i's text feature is the unit vector e_i."""

    capabilities = frozenset({"image_features", "text_features"})
    in_chans = 4

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        self.names = names

    def encode_image(self, images, normalize=False):
        x = images[:, :, 0, 0]
        return torch.nn.functional.normalize(x, dim=-1) if normalize else x

    def encode_text(self, texts, normalize=False):
        return torch.eye(4)[[self.names.index(t) for t in texts]]

    @property
    def logit_scale(self):
        return torch.tensor(10.0)


def test_metrics_of_the_text_classifier_are_computed_by_hand():
    names = ["a", "b", "c", "d"]
    model = ZeroShotModel(VectorBackbone(names), names, top_k=2).eval()
    features = torch.tensor([
        [1.0, 0.5, 0.0, 0.0],   # a: correct
        [0.9, 1.0, 0.0, 0.0],   # b: correct
        [0.0, 1.0, 0.8, 0.0],   # c: predicted b, c second
        [0.0, 0.0, 0.2, 1.0],   # d: correct
        [0.3, 0.0, 0.0, 1.0],   # a: predicted d, a second
        [0.0, 0.1, 0.0, 1.0],   # c: predicted d, b second: top-2 miss
    ])
    labels = torch.tensor([0, 1, 2, 3, 0, 2])
    images = features[:, :, None, None]
    metrics = model.evaluate([{"images": images[:3], "labels": labels[:3]}, {"images": images[3:], "labels": labels[3:]}])
    assert metrics["accuracy"] == pytest.approx(3 / 6)
    assert metrics["top2_accuracy"] == pytest.approx(5 / 6)
    assert metrics["per_class_accuracy"] == {"a": 0.5, "b": 1.0, "c": 0.0, "d": 1.0}
    assert metrics["confusion_matrix"][2] == [0, 1, 0, 1]
    unit = torch.nn.functional.normalize(features, dim=-1)
    expected_loss = torch.nn.functional.cross_entropy(10 * unit, labels).item()  # logits = scale * cosine
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-6)
    probabilities = model.probabilities(images[:1])
    assert probabilities.sum().item() == pytest.approx(1.0)
    ratio = math.exp(10 * (unit[0, 0] - unit[0, 1]).item())  # softmax ratio of the two best classes
    assert (probabilities[0, 0] / probabilities[0, 1]).item() == pytest.approx(ratio, rel=1e-5)


def test_class_names_override_must_match_the_data():
    spec = {"backbone": {"name": "clip"}, "task": {"name": "zero_shot", "class_names": ["zero", "one", "two"]},
            "data": {"name": "digits", "classes": [0, 1]}}
    with pytest.raises(DataError, match="3 names given, but the data has 2 classes"):
        build(spec)
    with pytest.raises(adaptkit.SpecError, match="task.class_names"):
        adaptkit.load_spec({**spec, "task": {"name": "zero_shot", "class_names": ["only"]}})


def test_zero_shot_without_methods_only_evaluates(tmp_path):
    spec = {
        "name": "zs", "backbone": {"name": "clip"},
        "methods": [{"name": "system_prompt", "templates": "digits"}],
        "task": {"name": "zero_shot", "class_names": ["zero", "one", "two"]},
        "data": {"name": "digits", "classes": [0, 1, 2]},
        "train": {"progress": False}, "output": {"dir": str(tmp_path / "zs")},
    }
    lines = []
    result = adaptkit.run(spec, log=lines.append)
    assert any("nothing to train" in line for line in lines)
    assert result.metrics["trainable_params"] == 0
    assert set(result.metrics["test"]["per_class_accuracy"]) == {"zero", "one", "two"}
    assert (tmp_path / "zs" / "confusion_matrix_test.csv").read_text().startswith("true\\predicted,zero,one,two")


def test_few_shot_lora_trains_through_the_zero_shot_head(tmp_path):
    spec = {
        "name": "fs", "backbone": {"name": "clip"},
        "methods": [{"name": "lora", "rank": 2, "tower": "vision"}],
        "task": {"name": "zero_shot"},
        "data": {"name": "digits", "classes": [0, 1, 2, 3], "shots": 4},
        "train": {"max_steps": 12, "batch_size": 16, "eval_every": 12, "lr": 1e-2, "progress": False},
        "output": {"dir": str(tmp_path / "fs")},
    }
    model = build(spec, keep_data=True)
    assert len(model.adaptkit.data.train) == 16  # 4 shots x 4 classes
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora." in n and "visual" in n for n in trainable)
    batch = model.adaptkit.data.train.batch(range(16))
    before = model.training_step(batch).loss.item()
    result = adaptkit.run(spec, log=lambda *_: None)
    after = result.model.training_step(batch).loss.item()
    assert after < before
    history = [json.loads(line) for line in (tmp_path / "fs" / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == 12 and "val_accuracy" in history[-1]
