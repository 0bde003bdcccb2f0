"""A run killed with SIGKILL keeps its last checkpoint intact, and resume ends where an
uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch
import yaml

import adaptkit
from adaptkit.checkpoint import load_tensors
from tests.cli_helpers import fork_cli
from tests.conftest import tiny_vit_spec


def spec_at(tmp_path, name):
    spec = tiny_vit_spec(tmp_path)
    spec["train"].update({"max_steps": 120, "eval_every": 60, "checkpoint_every": 5, "batch_size": 16})
    spec["output"] = {"dir": str(tmp_path / name)}
    return spec


@pytest.mark.slow
def test_sigkill_then_resume(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_at(tmp_path, "killed")))
    state = tmp_path / "killed" / "checkpoint" / "state.safetensors"
    process = fork_cli(["run", str(path)], tmp_path / "killed_cli")  # the CLI in a process of its own, as a user's
    deadline = time.time() + 240
    step = 0
    while time.time() < deadline and process.poll() is None:
        if state.exists():
            try:
                step = int(load_tensors(state)[1]["step"])
            except Exception:
                step = 0  # caught between writes of the metadata is impossible: the write is atomic
            if step >= 10:
                break
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL

    tensors, meta = load_tensors(state)  # intact after the kill: verified by its content hash
    killed_at = int(meta["step"])
    assert 10 <= killed_at < 120

    resumed = adaptkit.run(adaptkit.load_spec(path, ["train.resume=true"]), log=lambda *_: None)
    whole = adaptkit.run(spec_at(tmp_path, "whole"), log=lambda *_: None)
    assert json.loads((tmp_path / "killed" / "metrics.json").read_text())["resumed_from_step"] == killed_at
    assert resumed.metrics["test"]["accuracy"] == whole.metrics["test"]["accuracy"]
    a = load_tensors(tmp_path / "killed" / "adapter.safetensors")[0]
    b = load_tensors(tmp_path / "whole" / "adapter.safetensors")[0]
    for key in b:
        assert torch.equal(a[key], b[key]), key
