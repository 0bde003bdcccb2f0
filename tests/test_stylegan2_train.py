"""The ``stylegan2`` GAN training task on the bundled digits."""

from __future__ import annotations

import math

import pytest
import torch

import adaptkit
from adaptkit.errors import DataError
from adaptkit_plugins.stylegan.generator import read_generator_file


def gan_spec(tmp_path, **task) -> dict:
    return {
        "name": "gan",
        "seed": 0,
        "backbone": {"name": "stylegan2", "model": "stylegan2_tiny_8", "style_dim": 16, "channels": {4: 16, 8: 16}},
        "methods": [{"name": "full"}],
        "task": {"name": "stylegan2", "r1_every": 2, "samples": 4, "eval_samples": 32, **task},
        "data": {"name": "digits", "split": [0.9, 0.05, 0.05]},
        "train": {"max_steps": 3, "batch_size": 8, "lr": 2e-3, "betas": [0.0, 0.99], "weight_decay": 0.0,
                  "grad_clip": None, "schedule": "constant", "warmup": 0, "progress": False},
        "output": {"dir": str(tmp_path / "run")},
    }


def test_losses_keep_the_players_apart(tmp_path):
    model = adaptkit.build(gan_spec(tmp_path))
    real = torch.rand(4, 1, 8, 8) * 2 - 1
    g_params = [p for p in model.backbone.parameters() if p.requires_grad]
    d_params = list(model.discriminator.parameters())
    assert g_params and d_params
    torch.manual_seed(0)
    parts = model.losses(real, regularise=True)
    assert set(parts) == {"d_loss", "g_loss", "r1"} and all(torch.isfinite(v) for v in parts.values())
    for name, owners, others in (("d_loss", d_params, g_params), ("r1", d_params, g_params), ("g_loss", g_params, d_params)):
        grads = torch.autograd.grad(parts[name], owners + others, retain_graph=True, allow_unused=True)
        mine, theirs = grads[: len(owners)], grads[len(owners):]
        assert any(g is not None and g.abs().sum() > 0 for g in mine), name
        assert all(g is None or g.abs().sum() == 0 for g in theirs), name


def test_training_step_updates_generator_and_discriminator_and_ema(tmp_path):
    model = adaptkit.build(gan_spec(tmp_path))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = {"images": torch.rand(8, 1, 8, 8) * 2 - 1, "labels": torch.zeros(8, dtype=torch.long)}
    g_before = model.backbone.generator.conv1.conv.weight.detach().clone()
    d_before = model.discriminator.final_conv[0].weight.detach().clone()
    for _ in range(3):
        out = model.training_step(batch)
        assert torch.isfinite(out.loss) and out.count == 8 and "d_loss" in out.logs
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    weight = model.backbone.generator.conv1.conv.weight
    assert not torch.equal(weight, g_before) and not torch.equal(model.discriminator.final_conv[0].weight, d_before)
    ema = model.ema.get_buffer("generator__conv1__conv__weight")
    assert not torch.equal(ema, weight.detach())  # the average lags behind
    live = weight.detach().clone()
    with model.ema_weights():
        torch.testing.assert_close(weight.detach(), ema)
    torch.testing.assert_close(weight.detach(), live)  # restored


def test_short_run_writes_samples_and_a_loadable_generator(tmp_path):
    result = adaptkit.run(gan_spec(tmp_path), log=lambda *_: None)
    out = result.output_dir
    for name in ("samples.png", "generator.safetensors", "generator.latent_avg.safetensors", "metrics.json", "adapter.safetensors"):
        assert (out / name).exists(), name
    assert math.isfinite(result.metrics["test"]["mmd"])  # a number: not NaN, not inf (approx to itself passed for inf)
    state = read_generator_file(out / "generator.safetensors")
    assert state["conv1.conv.weight"].ndim == 5
    # the written generator is the EMA one, and loads as a backbone
    model = result.model
    spec = gan_spec(tmp_path)
    spec["backbone"]["pretrained"] = str(out / "generator.safetensors")
    reloaded = adaptkit.build(spec)
    z = torch.randn(2, 16)
    with model.ema_weights():
        expected = model.backbone.generate(z.to(next(model.parameters()).device)).cpu()
    torch.testing.assert_close(reloaded.backbone.generate(z), expected)


def test_lora_gan_finetuning_exports_merged_weights(tmp_path):
    spec = gan_spec(tmp_path)
    spec["methods"] = [{"name": "lora", "rank": 2, "targets": ["conv"]}]
    result = adaptkit.run(spec, log=lambda *_: None)
    trainable = [n for n, p in result.model.backbone.named_parameters() if p.requires_grad]
    assert trainable and all(".lora." in n for n in trainable)
    state = read_generator_file(result.output_dir / "generator.safetensors")
    assert not any("lora" in k for k in state)


def test_bad_data_is_refused(tmp_path):
    spec = gan_spec(tmp_path)
    spec["data"]["channels"] = 3
    with pytest.raises(DataError, match="3 channels but the generator makes 1"):
        adaptkit.build(spec)
    spec = gan_spec(tmp_path, d_channels={8: 16})
    with pytest.raises(DataError, match="d_channels: no channel count for resolutions \\[4\\]"):
        adaptkit.build(spec)


def test_samples_and_exported_generator_come_from_eval_mode(tmp_path):
    # write_artifacts runs after training with the model in train mode: a method's dropout must not reach
    # samples.png or the exported generator's latent_avg, and the mode must come back as it was
    from PIL import Image

    from adaptkit.checkpoint import load_tensors
    from adaptkit_plugins.stylegan.generator import build_generator, latent_avg_file, read_latent_avg

    spec = gan_spec(tmp_path)
    spec["methods"] = [{"name": "lora", "rank": 2, "targets": ["conv", "mlp.in", "mlp.out"], "dropout": 0.5}]
    model = adaptkit.build(spec)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.3)  # a LoRA update that dropout would visibly change
    for mode in ("eval", "train"):
        model.train(mode == "train")
        model._written = False
        (tmp_path / mode).mkdir()
        model.write_artifacts({}, tmp_path / mode, "test")
        assert model.training == (mode == "train")
    samples = [Image.open(tmp_path / mode / "samples.png").tobytes() for mode in ("eval", "train")]
    assert samples[0] == samples[1]
    latent = [read_latent_avg(tmp_path / mode / "generator.safetensors") for mode in ("eval", "train")]
    torch.testing.assert_close(latent[1], latent[0])
    # generator.safetensors is g_ema's tensors exactly (rosinality's strict load_state_dict takes it); latent_avg is beside it
    written = tmp_path / "eval" / "generator.safetensors"
    plain = build_generator(model.backbone.config)
    plain.load_state_dict(load_tensors(written)[0], strict=True)
    assert set(load_tensors(latent_avg_file(written))[0]) == {"latent_avg"}
    assert latent[0].shape == (model.backbone.style_dim,)


def test_ema_moves_once_per_optimizer_step_and_resumes(tmp_path):
    # the trainer calls training_step once per micro-batch (train.grad_accum) and after_optimizer_step once per
    # step: the average must follow the optimizer steps, and a resumed run must get it back from the checkpoint
    model = adaptkit.build(gan_spec(tmp_path, ema_decay=0.9))
    model.train()
    batch = {"images": torch.rand(4, 1, 8, 8) * 2 - 1, "labels": torch.zeros(4, dtype=torch.long)}
    weight = model.backbone.generator.conv1.conv.weight
    expected = weight.detach().clone()
    for step in (1, 2, 3):
        for _ in range(2):  # two micro-batches
            model.training_step(batch)
        with torch.no_grad():
            weight.add_(0.1)  # what the optimizer step does
        model.after_optimizer_step(step)
        decay = min(0.9, step / (step + 10.0))
        expected = decay * expected + (1 - decay) * weight.detach()
    with model.ema_weights():
        torch.testing.assert_close(weight.detach(), expected)

    state = model.extra_state()
    assert state, "the EMA generator must be part of the checkpoint"
    resumed = adaptkit.build(gan_spec(tmp_path, ema_decay=0.9)).train()
    resumed.load_extra_state({k: v.clone() for k, v in state.items()})
    assert int(resumed.steps) == 3  # R1's lazy interval goes on where it stopped
    resumed.training_step(batch)  # must not restart the average from the current weights
    with resumed.ema_weights():
        torch.testing.assert_close(resumed.backbone.generator.conv1.conv.weight.detach(), expected)


def test_the_adapter_the_merge_and_the_reported_metrics_describe_one_generator(tmp_path):
    # samples.png, generator.safetensors and the reported metrics come from the EMA generator; the adapter
    # file (load_trained) and `adaptkit merge` must hold that same generator, not the last step's raw weights
    from adaptkit.cli import main

    spec = gan_spec(tmp_path, ema_decay=0.9)
    result = adaptkit.run(spec, log=lambda *_: None)
    out = result.output_dir
    z = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    reported_spec = gan_spec(tmp_path)
    reported_spec["backbone"]["pretrained"] = str(out / "generator.safetensors")
    reported = adaptkit.build(reported_spec).backbone.generate(z)

    loaded = adaptkit.load_trained(out)
    torch.testing.assert_close(loaded.backbone.generate(z), reported)

    assert main(["merge", str(out), str(tmp_path / "merged")]) == 0
    merged_spec = gan_spec(tmp_path)
    merged_spec["backbone"]["pretrained"] = str(tmp_path / "merged" / "generator.safetensors")
    torch.testing.assert_close(adaptkit.build(merged_spec).backbone.generate(z), reported)

    from adaptkit.distributed import DistInfo
    from adaptkit.spec import TrainSpec
    from adaptkit.train import Trainer

    data = adaptkit.build(spec, keep_data=True).adaptkit.data
    trainer = Trainer(loaded, data, TrainSpec(max_steps=1, batch_size=8, progress=False), seed=0, lr=1e-3, weight_decay=0.0,
                      output_dir=tmp_path, device=torch.device("cpu"), dist=DistInfo())
    assert trainer.evaluate("test")["mmd"] == pytest.approx(result.metrics["test"]["mmd"], rel=1e-5)


def test_fsdp_under_torchrun_is_refused_with_a_clear_error(tmp_path, monkeypatch):
    """The generator reads every block's style weights outside the block, where FSDP would not gather them."""
    import torch.distributed as dist

    from adaptkit.errors import CompatibilityError

    spec = gan_spec(tmp_path)
    spec["train"]["strategy"] = "fsdp"
    adaptkit.build(spec)  # one process: fsdp trains as a plain loop
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *args: 2)
    with pytest.raises(CompatibilityError, match="backbone 'stylegan2': train.strategy fsdp is not supported .* use train.strategy=ddp"):
        adaptkit.build(spec)
