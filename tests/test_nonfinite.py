"""Training that goes wrong says so: non-finite settings are spec errors, and trained tensors that
become NaN or infinite are never saved (exit 2 naming the step; the last good checkpoint stays)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from adaptkit.checkpoint import load_tensors
from adaptkit.task import TaskModel
from tests.cli_helpers import user_error
from tests.conftest import tiny_vit_spec


def spec_file(tmp_path, **train):
    spec = tiny_vit_spec(tmp_path)
    spec["train"].update(train)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("override, where", [
    ("train.lr=inf", "train.lr"), ("train.lr=1e400", "train.lr"), ("train.lr=nan", "train.lr"), ("train.lr=1e39", "train.lr"),
    ("train.weight_decay=inf", "train.weight_decay"), ("train.warmup=inf", "train.warmup"),
    ("train.betas=[2,3]", "train.betas"), ("train.betas=[.nan,0.9]", "train.betas"), ("train.betas=[0.9,1.0]", "train.betas"),
    ("train.grad_clip=inf", "train.grad_clip"), ("train.min_lr_ratio=nan", "train.min_lr_ratio"),
    ("train.device=foo", "train.device"), ("seed=18446744073709551616", "seed"), ("seed=-1", "seed"), ("data.split_seed=4294967296", "data.split_seed"),
    ("data.shift=100000", "data.shift"), ("methods.0.alpha=inf", "methods[0].alpha"),
])
def test_train_settings_that_cannot_train_are_spec_errors(tmp_path, capsys, override, where):
    path = spec_file(tmp_path)
    user_error(capsys, ["validate", path, override], where)
    user_error(capsys, ["run", path, override], where)
    assert not (tmp_path / "run").exists()


def break_weights_at(monkeypatch, at):
    """Make the task's first trained tensor NaN right after optimizer step ``at`` (a diverging step)."""
    original = TaskModel.after_optimizer_step

    def breaking(self, step):
        original(self, step)
        if step == at:
            with torch.no_grad():
                next(p for p in self.parameters() if p.requires_grad).fill_(float("nan"))

    monkeypatch.setattr(TaskModel, "after_optimizer_step", breaking)


def test_a_step_that_breaks_the_weights_fails_and_saves_no_adapter(tmp_path, capsys, monkeypatch):
    break_weights_at(monkeypatch, 1)
    user_error(capsys, ["run", spec_file(tmp_path), "train.max_steps=1"], "step 1", "NaN or infinite")
    run = tmp_path / "run"
    assert not (run / "adapter.safetensors").exists() and not (run / "checkpoint" / "state.safetensors").exists()
    assert json.loads((run / "run.json").read_text())["status"] == "failed"


def test_the_last_good_checkpoint_is_kept(tmp_path, capsys, monkeypatch):
    break_weights_at(monkeypatch, 6)
    path = spec_file(tmp_path, max_steps=6, checkpoint_every=2, eval_every=2)
    user_error(capsys, ["run", path], "at step 6", "last good checkpoint")
    tensors, metadata = load_tensors(tmp_path / "run" / "checkpoint" / "state.safetensors")
    assert metadata["step"] == "4" and all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    assert not (tmp_path / "run" / "adapter.safetensors").exists()


def test_the_fast_finite_check_is_exact():
    """One sum decides; a sum that overflows (huge finite values) falls back to the elementwise check."""
    from adaptkit.checkpoint import all_finite

    assert all_finite(torch.full((10,), 3e38)) and all_finite(torch.full((100_000,), 60_000.0, dtype=torch.float16))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            tensor = torch.zeros(5, dtype=dtype)
            tensor[2] = bad
            assert not all_finite(tensor), (bad, dtype)
