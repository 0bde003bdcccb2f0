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


def test_fsdp_with_a_bf16_base_matches_one_within_bf16_precision(tmp_path, single):
    """Frozen bf16 base weights and fp32 trained tensors share FSDP units; the bf16 matmuls are
    reduced in another order over 2 processes, so the adapters agree to bf16 precision: the gap
    between the two bf16 runs is of the size of bf16's own effect (one bf16 run against the
    fp32 run), not larger."""
    spec = fsdp_spec(tmp_path, "single_bf16")
    spec["backbone"]["dtype"] = "bf16"
    adaptkit.run(spec, log=lambda line: None)
    sharded = fsdp_spec(tmp_path, "fsdp_bf16")
    sharded["backbone"]["dtype"] = "bf16"
    done = torchrun(tmp_path, sharded)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    a, b = adapter(tmp_path / "single_bf16"), adapter(tmp_path / "fsdp_bf16")
    assert sorted(a) == sorted(b) and all(t.dtype == torch.float32 for t in b.values())
    fp32 = adapter(single)
    for key, value in a.items():  # (AdamW's normalised steps turn bf16 noise in a tiny gradient into a visible one)
        bf16_effect = (value - fp32[key]).norm()
        assert (b[key] - value).norm() <= 3 * bf16_effect + 0.01 * value.norm(), (key, bf16_effect)


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


# what each process holds once sharded, and (gathered, whole) the trained tensors before the first step
RECORDING_CLI = """
import json, os, sys
import torch
from safetensors.torch import save_file
from adaptkit.cli import main
from adaptkit.deferred import is_deferred
from adaptkit.distributed import full_tensor
from adaptkit.train import Trainer

original = Trainer._prepare_model

def recording(self):
    deferred = is_deferred(self.model)
    model = original(self)
    frozen = [p for p in model.backbone.parameters() if not p.requires_grad]
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in frozen)
    record = {"deferred": deferred, "local": local, "total": sum(p.numel() for p in frozen)}
    folder = os.environ["RECORD_DIR"]
    with open(os.path.join(folder, f"rank{self.dist.rank}.json"), "w") as handle:
        json.dump(record, handle)
    initial = {name: full_tensor(p.detach()).clone() for name, p in self.trainable}
    if self.dist.main:
        save_file(initial, os.path.join(folder, "initial.safetensors"))
    return model

Trainer._prepare_model = recording
sys.exit(main(sys.argv[1:]))
"""


def base_file(tmp_path: Path) -> str:
    """The tiny ViT's base weights in a safetensors file, as a downloaded checkpoint holds them."""
    from safetensors.torch import save_file

    spec = fsdp_spec(tmp_path, "base")
    spec["methods"] = []
    net = adaptkit.build(spec).backbone.net
    path = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return str(path)


def val_losses(run_dir: Path) -> list[float]:
    """The validation loss of every evaluation (each process evaluates the whole split; the train
    loss logged is process 0's share of the batches)."""
    return [json.loads(line)["val_loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_fsdp_reads_only_its_shard_of_a_weights_file_and_matches_one_process(tmp_path, monkeypatch):
    """With the base in a safetensors file, each process builds the model on the meta device and
    reads only its rows of each base weight: about half the frozen base per process, the same
    initial trained tensors (heads and LoRA factors do not depend on the base's initialisation),
    the same losses and the same adapter as one process."""
    from safetensors.torch import load_file

    spec = fsdp_spec(tmp_path, "single_file")
    spec["backbone"]["pretrained"] = base_file(tmp_path)
    reference = adaptkit.build(spec)
    initial = {name: p.detach() for name, p in reference.named_parameters() if p.requires_grad}
    adaptkit.run(spec, log=lambda line: None)

    sharded = {**spec, "output": {"dir": str(tmp_path / "fsdp_file")}}
    cli = tmp_path / "record.py"
    cli.write_text(RECORDING_CLI)
    monkeypatch.setenv("RECORD_DIR", str(tmp_path))
    done = torchrun(tmp_path, sharded, cli=[str(cli)])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "base weights left on the meta device; each process reads its shard of base.safetensors" in done.stdout
    for rank in (0, 1):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record["deferred"], record
        assert 0.4 * record["total"] <= record["local"] <= 0.6 * record["total"], record
    gathered = load_file(str(tmp_path / "initial.safetensors"))
    assert sorted(gathered) == sorted(initial)
    for name, value in initial.items():
        torch.testing.assert_close(gathered[name], value, rtol=0, atol=0)
    torch.testing.assert_close(torch.tensor(val_losses(tmp_path / "fsdp_file")), torch.tensor(val_losses(tmp_path / "single_file")),
                               rtol=1e-4, atol=1e-5)
    assert_same_adapter(tmp_path / "single_file", tmp_path / "fsdp_file")
    a = json.loads((tmp_path / "single_file" / "metrics.json").read_text())
    b = json.loads((tmp_path / "fsdp_file" / "metrics.json").read_text())
    assert a["test"]["accuracy"] == b["test"]["accuracy"]


def test_strategy_is_validated_and_not_part_of_the_fingerprint(tmp_path):
    plain = load_spec(tiny_vit_spec(tmp_path))
    assert plain.train.strategy == "auto"
    sharded = load_spec(tiny_vit_spec(tmp_path), ["train.strategy=fsdp", "train.gradient_checkpointing=true", "train.compile=true"])
    assert sharded.train.strategy == "fsdp" and sharded.fingerprint() == plain.fingerprint()
    with pytest.raises(SpecError, match="strategy"):
        load_spec(tiny_vit_spec(tmp_path), ["train.strategy=zero3"])
