"""A first end-to-end run of the tiny ViT with LoRA on the digits."""

from __future__ import annotations

import json

import pytest

import adaptkit
from tests.conftest import tiny_vit_spec


def test_tiny_run_writes_its_files(tmp_path):
    result = adaptkit.run(tiny_vit_spec(tmp_path), log=lambda *_: None)
    out = result.output_dir
    for name in ("spec.yaml", "run.json", "metrics.jsonl", "metrics.json", "adapter.safetensors", "curves.png"):
        assert (out / name).exists(), name
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [3, 6]
    assert 0.0 <= result.metrics["test"]["accuracy"] <= 1.0
    test = result.metrics["test"]  # a fraction of the test images, and the one metrics.json reports
    assert test["count"] > 0 and test["accuracy"] * test["count"] == pytest.approx(round(test["accuracy"] * test["count"]))
    assert json.loads((out / "metrics.json").read_text())["test"]["accuracy"] == test["accuracy"]
    assert result.metrics["trainable_params"] < result.metrics["total_params"]
