"""The trainer: determinism, resume after a crash, accumulation, bf16, DDP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import adaptkit
from adaptkit.checkpoint import load_tensors
from adaptkit.errors import RunError
from adaptkit.train import lr_factor
from tests.conftest import crash_run_after, tiny_vit_spec
from tests.cli_helpers import torchrun

quiet = dict(log=lambda *_: None)


def spec_for(tmp_path, name, **train):
    spec = tiny_vit_spec(tmp_path)
    spec["methods"] = [{"name": "lora", "rank": 2, "dropout": 0.1}]
    spec["data"] = {"name": "digits", "shift": 1}
    spec["train"].update({"max_steps": 12, "eval_every": 4, **train})
    spec["output"] = {"dir": str(tmp_path / name)}
    return spec


def adapter(run_dir: Path) -> dict:
    return load_tensors(run_dir / "adapter.safetensors")[0]


def test_same_seed_same_result(tmp_path):
    a = adaptkit.run(spec_for(tmp_path, "a"), **quiet)
    b = adaptkit.run(spec_for(tmp_path, "b"), **quiet)
    for key, value in adapter(a.output_dir).items():
        assert torch.equal(value, adapter(b.output_dir)[key])
    c = adaptkit.run({**spec_for(tmp_path, "c"), "seed": 1}, **quiet)
    assert any(not torch.equal(v, adapter(c.output_dir)[k]) for k, v in adapter(a.output_dir).items())


def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    whole = adaptkit.run(spec_for(tmp_path, "whole"), **quiet)

    crash_run_after(8, lambda: adaptkit.run(spec_for(tmp_path, "crashed"), **quiet))
    crashed = tmp_path / "crashed"
    assert [json.loads(l)["step"] for l in (crashed / "metrics.jsonl").read_text().splitlines()] == [4, 8]
    with pytest.raises(RunError, match="already holds a run"):
        adaptkit.run(spec_for(tmp_path, "crashed"), **quiet)

    reads = []
    monkeypatch.setattr("adaptkit.train.load_tensors", lambda path, *args: reads.append(path) or load_tensors(path, *args))
    resumed = adaptkit.run(spec_for(tmp_path, "crashed", resume=True), **quiet)
    assert [path.name for path in reads] == ["state.safetensors"]  # checked, then restored from, in one read
    assert json.loads((crashed / "metrics.json").read_text())["resumed_from_step"] == 8
    for key, value in adapter(whole.output_dir).items():
        assert torch.equal(value, adapter(crashed)[key]), key
    strip = lambda path: [{k: v for k, v in json.loads(l).items()} for l in path.read_text().splitlines()]
    assert strip(crashed / "metrics.jsonl") == strip(whole.output_dir / "metrics.jsonl")
    assert resumed.metrics["test"]["accuracy"] == whole.metrics["test"]["accuracy"]


def test_resume_refuses_another_spec(tmp_path):
    adaptkit.run(spec_for(tmp_path, "r"), **quiet)
    other = spec_for(tmp_path, "r", resume=True, lr=0.5)
    with pytest.raises(RunError, match="different spec"):
        adaptkit.run(other, **quiet)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    one = spec_for(tmp_path, "one", max_steps=3, grad_clip=None)
    two = spec_for(tmp_path, "two", max_steps=3, grad_clip=None, grad_accum=4)
    for spec in (one, two):
        spec["methods"][0]["dropout"] = 0.0
    a, b = adaptkit.run(one, **quiet), adaptkit.run(two, **quiet)
    for key, value in adapter(a.output_dir).items():
        torch.testing.assert_close(adapter(b.output_dir)[key], value, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_trains(tmp_path):
    result = adaptkit.run(spec_for(tmp_path, "bf16", precision="bf16", max_steps=4), **quiet)
    assert 0 <= result.metrics["val"]["accuracy"] <= 1
    # it really ran in bf16 (its weights differ from a float32 run's) and trained as well as that run,
    # to bf16's precision (the same training loss within a few percent)
    fp32 = adaptkit.run(spec_for(tmp_path, "fp32", max_steps=4), **quiet)
    ours, theirs = adapter(result.output_dir), adapter(fp32.output_dir)
    assert ours.keys() == theirs.keys() and any(not torch.equal(ours[k], theirs[k]) for k in theirs)
    losses = [json.loads((run.output_dir / "metrics.jsonl").read_text().splitlines()[-1])["train_loss"] for run in (result, fp32)]
    assert losses[0] == pytest.approx(losses[1], rel=0.05)


def test_schedule_warms_up_and_decays():
    factors = [lr_factor(s, 100, 10, "cosine", 0.0) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[-1] < 0.01
    assert lr_factor(50, 100, 0, "constant", 0.0) == 1.0


def test_linear_probe_trains_only_the_head(tmp_path):
    spec = spec_for(tmp_path, "probe")
    spec["methods"] = []
    result = adaptkit.run(spec, **quiet)
    assert result.metrics["trainable_params"] == 64 * 10 + 10


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path):
    """torchrun --nproc_per_node=2 (gloo, CPU) reaches the single-process result. (This test starts
    the processes with torchrun itself; the other 2-process tests fork theirs with its environment.)"""
    single = spec_for(tmp_path, "single", max_steps=6, grad_clip=None)
    single["methods"][0]["dropout"] = 0.0
    adaptkit.run(single, **quiet)
    ddp = json.loads(json.dumps(single))
    ddp["output"]["dir"] = str(tmp_path / "ddp")
    done = torchrun(tmp_path, ddp, launcher="torchrun")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "x2" in done.stdout  # the header names the world size
    for key, value in adapter(tmp_path / "single").items():
        torch.testing.assert_close(adapter(tmp_path / "ddp")[key], value, rtol=1e-4, atol=1e-5)
    a = json.loads((tmp_path / "single" / "metrics.json").read_text())
    b = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert a["test"]["accuracy"] == b["test"]["accuracy"]
