"""ddpm_unet + text_to_image: the DDPM loss, guidance dropout, EMA, samplers, saving, generate."""

from __future__ import annotations

import copy

import pytest
import torch

import adaptkit
from adaptkit.cli import main as cli
from adaptkit.errors import CheckpointError, CompatibilityError, DataError, SpecError

CLASS = {"name": "ddpm_unet", "model": "ddpm_unet_tiny", "conditioning": "class", "num_classes": 10}
UNCOND = {"name": "ddpm_unet", "model": "ddpm_unet_tiny"}


def diffusion_spec(tmp_path, backbone=None, methods=None, task=None, **train):
    return {
        "name": "tiny_ddpm",
        "backbone": copy.deepcopy(backbone or CLASS),
        "methods": methods if methods is not None else [{"name": "full"}],
        "task": {"name": "text_to_image", "preview": 0, "steps": 3, **(task or {})},
        "data": {"name": "digits"},
        "train": {"max_steps": 2, "batch_size": 16, "progress": False, **train},
        "output": {"dir": str(tmp_path / "run")},
    }


def built(tmp_path, **kwargs):
    return adaptkit.build(diffusion_spec(tmp_path, **kwargs))


def digits_batch(n=6):
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy(data.images[:n].astype("float32") / 8 - 1).unsqueeze(1)
    return {"images": images, "labels": torch.from_numpy(data.target[:n]).long()}


# ------------------------------------------------------------------------- the loss
def test_loss_is_the_noise_mse_computed_by_hand(tmp_path):
    model = built(tmp_path, task={"condition_dropout": 0.0})
    batch = digits_batch()
    t = torch.tensor([0, 10, 250, 500, 900, 999])
    noise = torch.randn(batch["images"].shape, generator=torch.Generator().manual_seed(5))
    loss = model.training_step({**batch, "timesteps": t, "noise": noise}).loss

    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)  # the default linear schedule
    abar = torch.cumprod(1 - betas, 0)[t].float().reshape(-1, 1, 1, 1)
    x_t = abar.sqrt() * batch["images"] + (1 - abar).sqrt() * noise
    eps = model.backbone.unet(x_t, t, class_labels=batch["labels"]).sample
    assert torch.allclose(loss, ((eps - noise) ** 2).mean(), atol=1e-6)


def test_condition_dropout_swaps_in_the_null_class(tmp_path):
    model = built(tmp_path)
    labels = torch.arange(8)
    cond = {"labels": labels}
    assert torch.equal(model.drop_condition(cond, torch.zeros(8, dtype=torch.bool))["labels"], labels)
    assert torch.equal(model.drop_condition(cond, torch.ones(8, dtype=torch.bool))["labels"], torch.full((8,), 10))
    mask = torch.tensor([True, False] * 4)
    assert model.drop_condition(cond, mask)["labels"].tolist() == [10, 1, 10, 3, 10, 5, 10, 7]

    # with dropout 1 every sample trains the unconditional prediction: the loss equals the null-label loss
    always = built(tmp_path, task={"condition_dropout": 1.0})
    batch = digits_batch()
    t, noise = torch.full((6,), 300), torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    dropped = always.training_step({**batch, "timesteps": t, "noise": noise}).loss
    null = always.diffusion_loss(batch["images"], {"labels": torch.full((6,), 10)}, t, noise)
    kept = always.diffusion_loss(batch["images"], {"labels": batch["labels"]}, t, noise)
    assert torch.allclose(dropped, null) and not torch.allclose(dropped, kept)


def test_every_process_computes_the_null_condition_when_any_drops_one(tmp_path, monkeypatch):
    """Under fsdp the null condition runs the (sharded) text encoder, whose gathers are collectives:
    every process must compute it at the same steps, though each drops its own samples."""
    from adaptkit_plugins.diffusion import _text_to_image_impl as impl

    model = built(tmp_path, task={"condition_dropout": 0.1})
    original = model.backbone.denoiser.null_condition
    steps = {0: [], 1: []}
    for rank in (0, 1):
        monkeypatch.setattr(impl, "_world", lambda rank=rank: (2, rank))
        model.backbone.denoiser.null_condition = lambda n, rank=rank: steps[rank].append(step) or original(n)
        torch.manual_seed(0)
        for step in range(12):
            model.training_step(digits_batch(4))
    assert steps[0] == steps[1] and steps[0]


def test_dropout_rate_is_the_configured_share(tmp_path):
    model = built(tmp_path, task={"condition_dropout": 0.25})
    seen = []
    model.drop_condition = lambda cond, drop, any_process=False: seen.append(drop) or cond
    torch.manual_seed(0)
    for _ in range(40):
        model.training_step(digits_batch(16))
    share = torch.cat(seen).float().mean().item()
    assert 0.2 < share < 0.3


# ------------------------------------------------------------------------- EMA
def test_ema_follows_the_warmed_up_recurrence_and_is_what_gets_saved(tmp_path):
    model = built(tmp_path, task={"ema_decay": 0.9})
    model.training_step(digits_batch())  # starts the EMA from the initial weights
    name, param = next((n, p) for n, p in model.named_parameters() if p.requires_grad)
    expected = param.detach().clone()
    for step in (1, 2, 3, 50):
        with torch.no_grad():
            param.add_(0.1)
        decay = min(0.9, (1 + step) / (10 + step))
        expected = decay * expected + (1 - decay) * param.detach()
        model.after_optimizer_step(step)
        assert torch.allclose(model.ema[name], expected, atol=1e-6)

    raw = param.detach().clone()
    with model.ema_weights():
        assert torch.allclose(param, expected, atol=1e-6)
    assert torch.equal(param, raw)  # restored after evaluation

    model.finish_training()
    assert torch.allclose(param, expected, atol=1e-6) and model.ema is None


def test_ema_state_is_saved_and_restored_with_the_checkpoint(tmp_path):
    from adaptkit.distributed import DistInfo
    from adaptkit.spec import TrainSpec
    from adaptkit.train import Trainer

    model = built(tmp_path)
    model.training_step(digits_batch())
    for tensor in model.ema.values():
        tensor.add_(torch.rand_like(tensor))
    data = adaptkit.build(diffusion_spec(tmp_path), keep_data=True).adaptkit.data
    trainer = Trainer(model, data, TrainSpec(max_steps=2, batch_size=8, progress=False), seed=0, lr=1e-3, weight_decay=0.0,
                      output_dir=tmp_path, device=torch.device("cpu"), dist=DistInfo())
    optimizer = trainer._optimizer()
    trainer._save_state(optimizer, 1, [], 0.0, 0, 0.0)
    saved = {k: v.clone() for k, v in model.ema.items()}
    model.ema = None
    trainer._restore(optimizer)
    assert model.ema.keys() == saved.keys()
    assert all(torch.equal(model.ema[k], saved[k]) for k in saved)


# ------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampling_is_deterministic_for_a_seed(tmp_path, sampler):
    model = built(tmp_path).eval()
    first, rows = model.generate(classes=["3", "7"], num=2, seed=4, steps=4, sampler=sampler)
    again, _ = model.generate(classes=["3", "7"], num=2, seed=4, steps=4, sampler=sampler)
    other, _ = model.generate(classes=["3", "7"], num=2, seed=5, steps=4, sampler=sampler)
    assert rows == ["3", "7"] and first.shape == (4, 1, 8, 8)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_batched_sampling_keeps_order_and_its_first_batch_equals_a_run_of_that_size(tmp_path):
    model = built(tmp_path).eval()
    batched, rows = model.generate(classes=["3", "7"], num=3, seed=4, steps=3, batch_size=4)
    again, _ = model.generate(classes=["3", "7"], num=3, seed=4, steps=3, batch_size=4)
    whole, _ = model.generate(classes=["3", "7"], num=3, seed=4, steps=3)
    assert batched.shape == whole.shape == (6, 1, 8, 8) and rows == ["3", "7"]
    assert torch.equal(batched, again)
    # batches of 2 over (3, 3, 7, 7): the first is drawn first from the seeded generator, as a run of the 3s alone
    pairs, _ = model.generate(classes=["3", "7"], num=2, seed=4, steps=3, batch_size=2)
    threes, _ = model.generate(classes=["3"], num=2, seed=4, steps=3)
    assert torch.equal(pairs[:2], threes)
    counts = []
    denoise = model.backbone.generate
    model.backbone.generate = lambda count, *a, **k: counts.append(count) or denoise(count, *a, **k)
    model.generate(classes=["3", "7"], num=3, seed=4, steps=1, batch_size=4)
    assert counts == [4, 2]  # never more than batch_size at once
    with pytest.raises(CompatibilityError, match="batch_size must be at least 1"):
        model.generate(classes=["3"], num=2, batch_size=0)


def test_our_ddim_loop_equals_diffusers_ddim_pipeline(tmp_path):
    from diffusers import DDIMPipeline

    from adaptkit_plugins.diffusion.common import SamplerSettings, make_scheduler

    model = built(tmp_path, backbone=UNCOND).eval()
    with torch.no_grad():  # give the random UNet a non-trivial output layer
        model.backbone.unet.conv_out.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    ours, rows = model.generate(num=3, seed=7, steps=6, guidance=1.0, sampler="ddim")
    settings = SamplerSettings(sampler="ddim", steps=6)
    pipeline = DDIMPipeline(unet=model.backbone.unet, scheduler=make_scheduler(model.backbone.schedule, settings))
    pipeline.set_progress_bar_config(disable=True)
    theirs = pipeline(batch_size=3, generator=torch.Generator().manual_seed(7), num_inference_steps=6, output_type="pt").images
    assert rows == ["unconditional"]
    assert theirs.shape == (3, 8, 8, 1) or theirs.shape == (3, 1, 8, 8)
    theirs = theirs if theirs.shape[1] == 1 else theirs.permute(0, 3, 1, 2)
    assert torch.allclose((ours / 2 + 0.5).clamp(0, 1), theirs, atol=1e-6)


def test_guidance_contrasts_the_condition_with_the_null_condition(tmp_path):
    from adaptkit_plugins.diffusion.common import SamplerSettings, sample

    model = built(tmp_path).eval()
    backbone = model.backbone
    calls = []
    original = backbone.predict_noise
    backbone.predict_noise = lambda x, t, cond: calls.append(cond["labels"].tolist()) or original(x, t, cond)
    cond = {"labels": torch.tensor([2, 4])}
    guided = sample(backbone, cond, 2, SamplerSettings(steps=2, guidance=3.0), torch.Generator().manual_seed(0), torch.device("cpu"))
    assert calls == [[2, 4, 10, 10]] * 2
    calls.clear()
    plain = sample(backbone, cond, 2, SamplerSettings(steps=2, guidance=1.0), torch.Generator().manual_seed(0), torch.device("cpu"))
    assert calls == [[2, 4]] * 2 and not torch.allclose(guided, plain)


# ------------------------------------------------------------------------- runs, saving, CLI
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 2-step LoRA run (attention and conv layers) on the tiny class-conditional UNet."""
    tmp = tmp_path_factory.mktemp("ddpm")
    spec = diffusion_spec(tmp, methods=[{"name": "lora", "rank": 2, "targets": ["attn.q", "attn.v", "conv"]}])
    return adaptkit.run(spec, log=lambda *_: None)


def test_a_run_saves_only_the_adapter_and_loads_back_identically(trained_run):
    from adaptkit.runner import load_run

    state = adaptkit.trainable_state(trained_run.model)
    assert state and all(".lora." in name for name in state)
    assert any("resnets" in name and "conv1" in name for name in state)  # LoRA reached the conv layers
    trained = trained_run.model.eval()
    loaded = load_run(trained_run.output_dir)
    a, _ = trained.generate(classes=["1", "5"], num=2, seed=3, steps=3)
    b, _ = loaded.generate(classes=["1", "5"], num=2, seed=3, steps=3)
    assert torch.equal(a, b)
    base = adaptkit.build(diffusion_spec(trained_run.output_dir.parent, methods=[])).eval()
    c, _ = base.generate(classes=["1", "5"], num=2, seed=3, steps=3)
    assert not torch.allclose(a, c)  # the adapter changed the samples


def test_generate_cli_writes_the_grid_and_the_single_images(trained_run, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "grid.png"
    code = cli(["generate", str(trained_run.output_dir), "--class", "3", "--class", "8", "--num", "3", "--steps", "2",
                "--scale", "2", "--out", str(out)])
    assert code == 0
    with Image.open(out) as grid:
        assert grid.size == (3 * (16 + 2) + 2, 2 * (16 + 2) + 2)
    singles = sorted((tmp_path / "grid").glob("*.png"))
    assert [p.name for p in singles] == [f"{i:03d}.png" for i in range(6)]
    with Image.open(singles[0]) as single:
        assert single.size == (16, 16)
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--class", "12"], "unknown class '12'"),
        (["--prompt", "a cat"], "unknown class 'a cat'"),
        (["--class", "3", "--num", "0"], "--num must be at least 1"),
        (["--class", "3", "--steps", "0"], "--steps must be at least 1"),
        (["--class", "3", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["--class", "3", "--out", "grid.jpg"], "PNG"),
        (["--class", "3", "--image", "missing.png"], "file not found"),
    ],
)
def test_generate_cli_rejects_bad_input(trained_run, tmp_path, capsys, args, message):
    assert cli(["generate", str(trained_run.output_dir), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_generate_cli_samples_from_a_yaml_spec_too(tmp_path):
    import yaml

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(diffusion_spec(tmp_path, backbone=UNCOND)))
    assert cli(["generate", str(spec_file), "--num", "2", "--steps", "1", "--out", str(tmp_path / "g.png"), "task.preview=0"]) == 0
    assert len(list((tmp_path / "g").glob("*.png"))) == 2


def test_generate_cli_rejects_a_missing_or_unfinished_run(tmp_path, capsys):
    assert cli(["generate", str(tmp_path / "nowhere")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "spec.yaml").write_text("name: x\n")
    assert cli(["generate", str(tmp_path / "half")]) == 2
    assert "no adapter.safetensors" in capsys.readouterr().err


def test_unconditional_models_refuse_conditions(tmp_path):
    model = built(tmp_path, backbone=UNCOND).eval()
    with pytest.raises(adaptkit.CompatibilityError, match="unconditional"):
        model.generate(classes=["3"], num=1, steps=1)


# ------------------------------------------------------------------------- specs and weights
@pytest.mark.parametrize(
    "backbone, message",
    [
        ({"name": "ddpm_unet", "conditioning": "class"}, "num_classes is required"),
        ({"name": "ddpm_unet", "num_classes": 3}, "num_classes only applies"),
        ({"name": "ddpm_unet", "conditioning": "text"}, "needs text_encoder"),
        ({"name": "ddpm_unet", "noise_schedule": {"beta_start": 0.1, "beta_end": 0.01}}, "beta_end"),
        ({"name": "ddpm_unet", "noise_schedul": {}}, "did you mean 'noise_schedule'"),
    ],
)
def test_bad_backbone_specs_fail_validation(tmp_path, backbone, message):
    with pytest.raises(SpecError, match=message):
        adaptkit.load_spec(diffusion_spec(tmp_path, backbone=backbone))


@pytest.mark.parametrize("template", ["a digit {}", "a digit {name}", "a digit"])
def test_a_caption_template_needs_its_label(tmp_path, template):
    with pytest.raises(SpecError, match=r"task.caption_template: .*\{label\}"):
        adaptkit.load_spec(diffusion_spec(tmp_path, task={"caption_template": template}))


def test_bad_builds_say_what_is_wrong(tmp_path):
    with pytest.raises(DataError, match="num_classes 5"):
        built(tmp_path, backbone={**CLASS, "num_classes": 5})
    with pytest.raises(DataError, match="class_ids"):
        built(tmp_path, task={"class_ids": [1, 2]})
    with pytest.raises(adaptkit.PluginError, match="did you mean 'ddpm_unet_8'"):
        built(tmp_path, backbone={**CLASS, "model": "ddpm_unet_88"})
    with pytest.raises(CheckpointError, match="file not found"):
        built(tmp_path, backbone={**CLASS, "pretrained": str(tmp_path / "missing.safetensors")})


def test_pretrained_from_a_diffusers_directory_and_from_a_weights_file(tmp_path):
    from safetensors.torch import save_file

    source = built(tmp_path, backbone=UNCOND).backbone.unet
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.01)
    source.save_pretrained(tmp_path / "unet_dir")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "unet.safetensors")
    for pretrained in (tmp_path / "unet_dir", tmp_path / "unet.safetensors"):
        loaded = built(tmp_path, backbone={**UNCOND, "pretrained": str(pretrained)}).backbone.unet
        assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values()))
    # a saved unconditional UNet cannot serve a class-conditional spec
    with pytest.raises(adaptkit.CompatibilityError, match="0 class embeddings"):
        built(tmp_path, backbone={**CLASS, "pretrained": str(tmp_path / "unet_dir")})


def test_a_hub_repo_id_is_fetched_and_a_failed_fetch_names_both_readings(tmp_path, monkeypatch):
    import diffusers

    from adaptkit_plugins.diffusion.weights import is_hub_repo

    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()
    monkeypatch.chdir(tmp_path)
    assert is_hub_repo("google/ddpm-cifar10-32") and is_hub_repo("hf-hub:google/ddpm-cifar10-32")
    assert not is_hub_repo("org/name")  # exists here: a local directory
    assert not is_hub_repo("runs/x/adapter.safetensors") and not is_hub_repo("/abs/dir") and not is_hub_repo("unet.pt")
    asked = []

    def offline(repo, **kwargs):  # what from_pretrained does without a network
        asked.append(repo)
        raise OSError(f"{repo} does not appear to have a file named config.json.")

    monkeypatch.setattr(diffusers.UNet2DModel, "from_pretrained", offline)
    with pytest.raises(CheckpointError, match="no local path 'google/ddpm-cifar10-32' exists, and 'google/ddpm-cifar10-32' "
                       "could not be fetched from the hub"):
        built(tmp_path, backbone={**UNCOND, "pretrained": "google/ddpm-cifar10-32"})
    assert asked and set(asked) == {"google/ddpm-cifar10-32"}


def test_an_adapter_file_is_not_a_base_model(trained_run, tmp_path):
    adapter = str(trained_run.output_dir / "adapter.safetensors")
    with pytest.raises(CheckpointError, match="adapter file"):
        built(tmp_path, backbone={**CLASS, "pretrained": adapter})


def test_a_full_run_is_the_base_of_the_next(tmp_path):
    first = adaptkit.run(diffusion_spec(tmp_path), log=lambda *_: None)
    weights = str(first.output_dir / "adapter.safetensors")
    second = built(tmp_path, backbone={**CLASS, "pretrained": weights}, methods=[{"name": "lora", "rank": 2}])
    trained = first.model.backbone.unet.state_dict()
    assert all(torch.equal(v, second.backbone.unet.state_dict()[k]) for k, v in trained.items())


def test_generation_runs_in_eval_mode_whatever_mode_the_model_is_in(tmp_path):
    # write_artifacts (samples.png) runs right after training, with the model still in train mode:
    # a method's dropout must not reach the samples, and the mode must come back as it was
    lora = [{"name": "lora", "rank": 2, "targets": ["attn.q", "attn.v", "conv"], "dropout": 0.5}]
    model = built(tmp_path, methods=lora)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.3)  # a LoRA update that dropout would visibly change
    expected, _ = model.eval().generate(classes=["3"], num=2, seed=1, steps=2)
    model.train()
    got, _ = model.generate(classes=["3"], num=2, seed=1, steps=2)
    assert model.training
    torch.testing.assert_close(got, expected)
