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


def assert_same_adapter(reference: Path, other: Path, relative_gap: float | None = None) -> None:
    """The two runs' adapters agree value by value, or (``relative_gap``) tensor by tensor."""
    a, b = adapter(reference), adapter(other)
    assert sorted(a) == sorted(b) and a
    for key, value in a.items():
        assert b[key].shape == value.shape, key
        if relative_gap is None:
            torch.testing.assert_close(b[key], value, rtol=1e-4, atol=1e-5)
        else:
            assert (b[key] - value).norm() <= relative_gap * value.norm(), (key, (b[key] - value).norm(), value.norm())


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


# what each process holds once sharded, (gathered, whole) the trained tensors before the first step, and
# how many times any frozen base weight was gathered whole (DTensor.full_tensor) up to the end of the run
RECORDING_CLI = """
import json, os, sys
import torch
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor
from adaptkit.cli import main
from adaptkit.deferred import is_deferred
from adaptkit.distributed import full_tensor
from adaptkit.train import Trainer

original, original_full_tensor = Trainer._prepare_model, DTensor.full_tensor
frozen_storage, record = set(), {"frozen_gathered": []}

def recording(self):
    deferred = is_deferred(self.model)
    model = original(self)
    frozen = [(name, p) for name, p in model.named_parameters() if not p.requires_grad]
    in_backbone = [p for name, p in frozen if name.startswith("backbone.")]
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in in_backbone)
    record.update({"deferred": deferred, "local": local, "total": sum(p.numel() for p in in_backbone)})
    frozen_storage.update(p.to_local().data_ptr() for _, p in frozen if isinstance(p, DTensor) and p.to_local().numel())
    initial = {name: full_tensor(p.detach()).clone() for name, p in self.trainable}
    if self.dist.main:
        save_file(initial, os.path.join(os.environ["RECORD_DIR"], "initial.safetensors"))
    return model

def full_tensor_recorded(self, *args, **kwargs):
    local = self.to_local()
    if local.numel() and local.data_ptr() in frozen_storage:
        record["frozen_gathered"].append(list(self.shape))
    return original_full_tensor(self, *args, **kwargs)

Trainer._prepare_model = recording
DTensor.full_tensor = full_tensor_recorded
code = main(sys.argv[1:])
with open(os.path.join(os.environ["RECORD_DIR"], f"rank{os.environ['RANK']}.json"), "w") as handle:
    json.dump(record, handle)
sys.exit(code)
"""


def base_file(spec: dict, tmp_path: Path) -> str:
    """``spec``'s backbone base weights (random) in a safetensors file under the library's own
    names, as a downloaded checkpoint holds them."""
    from safetensors.torch import save_file

    backbone = adaptkit.build({**spec, "methods": []}).backbone
    path = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.native_state_dict(backbone.state_dict()).items()}, str(path))
    return str(path)


def val_losses(run_dir: Path) -> list[float]:
    """The validation loss of every evaluation (each process evaluates the whole split; the train
    loss logged is process 0's share of the batches)."""
    return [json.loads(line)["val_loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def clip_spec(tmp_path: Path, name: str) -> dict:
    """The tiny CLIP (both towers sharded) trained zero-shot on two digits."""
    spec = fsdp_spec(tmp_path, name)
    spec.update(backbone={"name": "clip", "model": "clip_tiny_digits"}, task={"name": "zero_shot"},
                data={"name": "digits", "classes": [0, 1], "channels": 3})
    return spec


def ddpm_spec(tmp_path: Path, name: str) -> dict:
    """The tiny class-conditioned UNet2DModel (diffusers), with its EMA, and a preview sampled in 2 steps."""
    spec = fsdp_spec(tmp_path, name)
    spec.update(backbone={"name": "ddpm_unet", "model": "ddpm_unet_tiny", "conditioning": "class", "num_classes": 10},
                task={"name": "text_to_image", "preview": 1, "steps": 2})
    return spec


def sd_spec(tmp_path: Path, name: str) -> dict:
    """A tiny Stable Diffusion-style pipeline folder (its own three safetensors files), LoRA on the
    UNet and the text encoder, captions dropped for guidance (the null condition runs the sharded
    text encoder: a collective every process joins)."""
    from adaptkit_plugins.diffusion.tiny_pipeline import write_tiny_pipeline

    spec = fsdp_spec(tmp_path, name)
    folder = tmp_path / "pipe"
    if not folder.is_dir():
        write_tiny_pipeline(folder, seed=0)
    spec.update(backbone={"name": "sd_pipeline", "pretrained": str(folder)},
                methods=[{"name": "lora", "rank": 2, "dropout": 0.0, "tower": "all", "targets": ["attn.q", "attn.v"]}],
                task={"name": "text_to_image", "preview": 0, "steps": 2, "condition_dropout": 0.3}, data={"name": "digits_captions"})
    return spec


#: backbone -> (its spec, the metric both runs report on the test split, the adapters' relative gap,
#: the reference run). At CLIP's lr (0.01) AdamW's normalised first steps move a value whose gradient
#: is near zero by about lr, in the direction reduce-order noise gives it: CLIP's adapters agree tensor
#: by tensor. The diffusion task's noise and timesteps on 2 processes are not one process's (DDP's
#: are not either): its reference is DDP on the same 2 processes.
FILE_BACKED = {"vit": (fsdp_spec, "accuracy", None, "one process"), "clip": (clip_spec, "accuracy", 0.01, "one process"),
               "ddpm_unet": (ddpm_spec, "loss", None, "ddp"), "sd_pipeline": (sd_spec, "loss", None, "ddp")}
#: the files the meta build reads, as its line names them
READS = {"sd_pipeline": "unet/diffusion_pytorch_model.safetensors, vae/diffusion_pytorch_model.safetensors, text_encoder/model.safetensors"}


@pytest.mark.parametrize("backbone", sorted(FILE_BACKED))
def test_fsdp_reads_only_its_shard_of_a_weights_file_and_matches_one_process(tmp_path, monkeypatch, backbone):
    """With the base in a safetensors file, each process builds the model on the meta device and
    reads only its rows of each base weight: about half the frozen base per process, the same
    initial trained tensors (heads and LoRA factors do not depend on the base's initialisation),
    the same losses, adapter and files as one process, or DDP (the UNet's task keeps an EMA, sharded
    like what it averages, and samples its preview on every process together); no frozen base weight
    is gathered whole for the checkpoints, the final evaluation or the adapter file."""
    from safetensors.torch import load_file

    make_spec, metric, relative_gap, reference_run = FILE_BACKED[backbone]
    spec = make_spec(tmp_path, "single_file")
    if not spec["backbone"].get("pretrained"):
        spec["backbone"]["pretrained"] = base_file(spec, tmp_path)
    reference = adaptkit.build(spec)
    initial = {name: p.detach() for name, p in reference.named_parameters() if p.requires_grad}
    if reference_run == "ddp":
        ddp = torchrun(tmp_path, spec, "train.strategy=ddp")
        assert ddp.returncode == 0, ddp.stdout[-2000:] + ddp.stderr[-4000:]
    else:
        adaptkit.run(spec, log=lambda line: None)

    sharded = {**spec, "output": {"dir": str(tmp_path / "fsdp_file")}}
    cli = tmp_path / "record.py"
    cli.write_text(RECORDING_CLI)
    monkeypatch.setenv("RECORD_DIR", str(tmp_path))
    done = torchrun(tmp_path, sharded, cli=[str(cli)])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert f"base weights left on the meta device; each process reads its shard of {READS.get(backbone, 'base.safetensors')};" in done.stdout
    for rank in (0, 1):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record["deferred"], record
        assert 0.4 * record["total"] <= record["local"] <= 0.6 * record["total"], record
        # saving and the final evaluation gather what trained, never a frozen base weight
        assert record["frozen_gathered"] == [], record
    gathered = load_file(str(tmp_path / "initial.safetensors"))
    assert sorted(gathered) == sorted(initial)
    for name, value in initial.items():
        torch.testing.assert_close(gathered[name], value, rtol=0, atol=0)
    torch.testing.assert_close(torch.tensor(val_losses(tmp_path / "fsdp_file")), torch.tensor(val_losses(tmp_path / "single_file")),
                               rtol=1e-4, atol=1e-5)
    assert_same_adapter(tmp_path / "single_file", tmp_path / "fsdp_file", relative_gap)
    a = json.loads((tmp_path / "single_file" / "metrics.json").read_text())
    b = json.loads((tmp_path / "fsdp_file" / "metrics.json").read_text())
    torch.testing.assert_close(b["test"][metric], a["test"][metric], rtol=1e-4, atol=1e-6)
    assert sorted(path.name for path in (tmp_path / "fsdp_file").iterdir()) == sorted(path.name for path in (tmp_path / "single_file").iterdir())


def test_strategy_is_validated_and_not_part_of_the_fingerprint(tmp_path):
    plain = load_spec(tiny_vit_spec(tmp_path))
    assert plain.train.strategy == "auto"
    sharded = load_spec(tiny_vit_spec(tmp_path), ["train.strategy=fsdp", "train.gradient_checkpointing=true", "train.compile=true"])
    assert sharded.train.strategy == "fsdp" and sharded.fingerprint() == plain.fingerprint()
    with pytest.raises(SpecError, match="strategy"):
        load_spec(tiny_vit_spec(tmp_path), ["train.strategy=zero3"])


# builds the spec whole and with its base deferred, shards the deferred one and compares it, gathered, with the whole
SHARDING_CLI = """
import json, os, sys
import torch
import yaml
from adaptkit.builder import build
from adaptkit.deferred import is_deferred
from adaptkit.distributed import init_distributed, shard_model

info = init_distributed(torch.device("cpu"))
spec = yaml.safe_load(open(sys.argv[2]))
whole = dict(build(spec).named_parameters())
model = build(spec, defer_base=True)
deferred = is_deferred(model)
shard_model(model, torch.device("cpu"), info)
frozen = [p for p in model.parameters() if not p.requires_grad]
record = {"deferred": deferred, "build": model.adaptkit.base_build, "mismatched": [],
          "local": sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in frozen), "total": sum(p.numel() for p in frozen)}
for name, p in model.named_parameters():
    gathered = p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()
    if not torch.equal(gathered, whole[name].detach()):
        record["mismatched"].append(name)
with open(os.path.join(os.environ["RECORD_DIR"], f"rank{info.rank}.json"), "w") as handle:
    json.dump(record, handle)
"""


def test_a_diffusers_model_folder_is_sharded_from_its_file_on_two_processes(tmp_path, monkeypatch):
    """A UNet from a diffusers model folder (``from_config`` + the folder's safetensors file): built
    on the meta device, each process reads about half the frozen base, and the shards gathered are
    the whole build's (``from_pretrained``'s) weights. (A weights file trains in the test above.)"""
    spec = ddpm_spec(tmp_path, "ddpm")
    adaptkit.build({**spec, "methods": []}).backbone.unet.save_pretrained(str(tmp_path / "unet"))
    spec["backbone"]["pretrained"] = str(tmp_path / "unet")
    cli = tmp_path / "shard.py"
    cli.write_text(SHARDING_CLI)
    monkeypatch.setenv("RECORD_DIR", str(tmp_path))
    done = torchrun(tmp_path, spec, cli=[str(cli)])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    for rank in (0, 1):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record["deferred"] and "left on the meta device" in record["build"], record
        assert record["mismatched"] == [], record
        assert 0.4 * record["total"] <= record["local"] <= 0.6 * record["total"], record


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of one process (FSDP2 shards over it: DTensors holding the whole tensor)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_trained_scalar_is_refused_under_fsdp_a_frozen_one_stays_whole(tmp_path, one_process_group):
    """FSDP2 shards no 0-d parameter: a frozen one (CLIP's logit_scale) is left whole, a trained one is refused."""
    from adaptkit.distributed import DistInfo, shard_model
    from adaptkit.errors import RunError

    model = adaptkit.build(fsdp_spec(tmp_path, "scalar"))
    model.backbone.register_parameter("temperature", torch.nn.Parameter(torch.tensor(2.0), requires_grad=False))
    shard_model(model, torch.device("cpu"), DistInfo())
    assert type(model.backbone.temperature).__name__ != "DTensor" and float(model.backbone.temperature) == 2.0
    trained = adaptkit.build(fsdp_spec(tmp_path, "scalar"))
    trained.backbone.register_parameter("temperature", torch.nn.Parameter(torch.tensor(2.0)))
    with pytest.raises(RunError, match="backbone.temperature is a trained scalar, which FSDP cannot shard; use train.strategy=ddp"):
        shard_model(trained, torch.device("cpu"), DistInfo())


def test_an_ema_restored_whole_is_placed_as_its_sharded_parameters(tmp_path, one_process_group):
    """A resumed run's EMA comes back from the checkpoint whole; under fsdp it is sharded like the
    parameters it averages at its first use, with the same values."""
    from torch.distributed.tensor import DTensor

    from adaptkit.distributed import DistInfo, full_tensor, shard_model
    from adaptkit.ema import WeightAverage

    model = adaptkit.build(fsdp_spec(tmp_path, "ema"))
    shard_model(model, torch.device("cpu"), DistInfo())
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    whole = {name: full_tensor(p.detach()) + 1.0 for name, p in params.items()}
    average = WeightAverage(0.5, ramp_start=100.0)  # decay 0.5 from the first step
    average.start(whole)
    average.update(params, step=1)
    for name, param in params.items():
        assert isinstance(average[name], DTensor) and average[name].placements == param.placements
        torch.testing.assert_close(full_tensor(average[name]), whole[name] - 0.5)
