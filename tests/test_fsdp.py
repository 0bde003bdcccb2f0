"""train.strategy fsdp: torchrun with 2 gloo processes on CPU, parameters sharded per block (FSDP2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import adaptkit
from adaptkit.errors import SpecError
from adaptkit.runner import load_run
from adaptkit.checkpoint import load_tensors
from adaptkit.distributed import fsdp_available
from adaptkit.spec import load_spec
from tests.cli_helpers import torchrun
from tests.conftest import tiny_vit_spec

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not fsdp_available(), reason="this torch has no FSDP2 (fully_shard)")]

# simulate a crash right after the checkpoint of step 3 (on every process)
CRASHING_CLI = """
import sys
from adaptkit.cli import main
from adaptkit.train import Trainer

original = Trainer._save_state

def crash_after_step_3(self, optimizer, step, *args):
    original(self, optimizer, step, *args)
    if step == 3:
        raise SystemExit(3)

Trainer._save_state = crash_after_step_3
sys.exit(main(sys.argv[1:]))
"""


def fsdp_spec(tmp_path: Path, name: str) -> dict:
    spec = tiny_vit_spec(tmp_path)
    spec["methods"] = [{"name": "lora", "rank": 2, "dropout": 0.0}]
    spec["data"] = {"name": "digits", "shift": 1}
    # grad_accum 2 exercises skipping the gradient reduce-scatter on the first micro-batch; clipping stays on
    spec["train"].update({"max_steps": 6, "eval_every": 3, "grad_accum": 2, "strategy": "fsdp"})
    spec["output"] = {"dir": str(tmp_path / name)}
    return spec


def adapter(run_dir: Path) -> dict:
    return load_tensors(run_dir / "adapter.safetensors")[0]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """The reference: the same spec in one process (strategy fsdp falls back to the plain loop, saying so)."""
    tmp_path = tmp_path_factory.mktemp("single")
    lines: list[str] = []
    adaptkit.run(fsdp_spec(tmp_path, "single"), log=lines.append)
    assert any("not launched with torchrun" in line and "plain loop" in line for line in lines), lines
    return tmp_path / "single"


def assert_same_adapter(reference: Path, other: Path) -> None:
    a, b = adapter(reference), adapter(other)
    assert sorted(a) == sorted(b) and a
    for key, value in a.items():
        assert b[key].shape == value.shape, key
        torch.testing.assert_close(b[key], value, rtol=1e-4, atol=1e-5)


def test_fsdp_two_processes_match_one(tmp_path, single):
    done = torchrun(tmp_path, fsdp_spec(tmp_path, "fsdp"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "x2" in done.stdout and "fsdp: 4 blocks and the root sharded over 2 processes" in done.stdout
    assert_same_adapter(single, tmp_path / "fsdp")
    a = json.loads((single / "metrics.json").read_text())
    b = json.loads((tmp_path / "fsdp" / "metrics.json").read_text())
    assert a["test"]["accuracy"] == b["test"]["accuracy"]
    # the adapter file loads into a plain single-process model
    model = load_run(tmp_path / "fsdp")
    assert not any(type(p).__name__ == "DTensor" for p in model.parameters())


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_gradient_checkpointing_under_torchrun_matches_one(tmp_path, single, strategy):
    """Recomputing every block in backward (inside FSDP's units, or under DDP) trains the same adapter."""
    spec = fsdp_spec(tmp_path, f"{strategy}_checkpointed")
    spec["train"].update({"strategy": strategy, "gradient_checkpointing": True})
    done = torchrun(tmp_path, spec)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert_same_adapter(single, tmp_path / f"{strategy}_checkpointed")


def test_fsdp_with_a_bf16_base_matches_one_within_bf16_precision(tmp_path):
    """Frozen bf16 base weights and fp32 trained tensors share FSDP units; the bf16 matmuls are
    reduced in another order over 2 processes, so the adapters agree to bf16 precision."""
    spec = fsdp_spec(tmp_path, "single_bf16")
    spec["backbone"]["dtype"] = "bf16"
    adaptkit.run(spec, log=lambda line: None)
    sharded = fsdp_spec(tmp_path, "fsdp_bf16")
    sharded["backbone"]["dtype"] = "bf16"
    done = torchrun(tmp_path, sharded)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    a, b = adapter(tmp_path / "single_bf16"), adapter(tmp_path / "fsdp_bf16")
    assert sorted(a) == sorted(b) and all(t.dtype == torch.float32 for t in b.values())
    for key, value in a.items():  # (AdamW's normalised steps turn bf16 noise in a tiny gradient into a visible one)
        assert (b[key] - value).norm() <= 0.05 * value.norm(), key


def test_fsdp_resume_after_a_crash_matches_one(tmp_path, single):
    spec = fsdp_spec(tmp_path, "fsdp_resumed")
    crash = tmp_path / "crash.py"
    crash.write_text(CRASHING_CLI)
    crashed = torchrun(tmp_path, spec, cli=[str(crash)])
    assert crashed.returncode != 0
    state, meta = load_tensors(tmp_path / "fsdp_resumed" / "checkpoint" / "state.safetensors")
    assert int(meta["step"]) == 3
    # whole (gathered) tensors in the checkpoint, not one process's shards
    reference = adapter(single)
    for key, value in reference.items():
        assert state[f"param.{key}"].shape == value.shape
    resumed = torchrun(tmp_path, spec, "train.resume=true")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]
    assert "resuming at step 3 of 6" in resumed.stdout
    assert_same_adapter(single, tmp_path / "fsdp_resumed")


def test_strategy_is_validated_and_not_part_of_the_fingerprint(tmp_path):
    plain = load_spec(tiny_vit_spec(tmp_path))
    assert plain.train.strategy == "auto"
    sharded = load_spec(tiny_vit_spec(tmp_path), ["train.strategy=fsdp", "train.gradient_checkpointing=true", "train.compile=true"])
    assert sharded.train.strategy == "fsdp" and sharded.fingerprint() == plain.fingerprint()
    with pytest.raises(SpecError, match="strategy"):
        load_spec(tiny_vit_spec(tmp_path), ["train.strategy=zero3"])
