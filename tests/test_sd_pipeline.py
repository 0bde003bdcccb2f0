"""The ``sd_pipeline`` backbone against diffusers' own StableDiffusionPipeline, on a tiny pipeline
folder written here (tiny_pipeline): same images for the same seed, scheduler and steps; our LoRA
export loaded by ``load_lora_weights``; LoRA files made with diffusers/PEFT code imported; merged
folders loaded by ``from_pretrained``; and one clear message for broken inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import adaptkit
from adaptkit.builder import build
from adaptkit.cli import main as cli
from adaptkit.errors import CheckpointError, CompatibilityError
from adaptkit.native import save_run
from adaptkit.runner import load_run
from adaptkit.surface import PlaceholderSite
from adaptkit_plugins.diffusion.tiny_pipeline import write_tiny_pipeline
from tests.test_interop import randomised

PROMPT = "a handwritten digit 3"
NEGATIVE = "blurry"
LORA_BOTH = {"name": "lora", "rank": 4, "alpha": 6, "tower": "all", "targets": ["attn.q", "attn.k", "attn.v", "attn.out"]}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_pipeline(tmp_path_factory.mktemp("sd") / "pipe", seed=0)


def spec_of(folder, methods=(), **backbone):
    return {"name": "sd", "seed": 0, "backbone": {"name": "sd_pipeline", "pretrained": str(folder), **backbone},
            "methods": list(methods), "task": {"name": "text_to_image", "preview": 0, "steps": 3},
            "data": {"name": "digits_captions"}}


def diffusers_pipeline(path, sampler="pipeline"):
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    if sampler == "euler":
        pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    elif sampler == "dpmsolver++":
        pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    return pipe


def theirs(pipe, seed=5, guidance=2.5, negative=None, num=2, prompt=PROMPT):
    out = pipe(prompt, negative_prompt=negative, num_images_per_prompt=num, num_inference_steps=3, guidance_scale=guidance,
               generator=torch.Generator().manual_seed(seed), output_type="pt", height=16, width=16).images
    return out * 2 - 1  # [0, 1] -> adaptkit's [-1, 1]


def ours(model, sampler=None, seed=5, guidance=2.5, negative=None, num=2, prompt=PROMPT):
    images, _ = model.generate(prompts=[prompt], num=num, seed=seed, steps=3, guidance=guidance, sampler=sampler,
                               negative_prompt=negative)
    return images


def test_tiny_pipeline_tokenizer_and_text_states_are_clip_s(folder):
    import open_clip

    model = build(adaptkit.load_spec(spec_of(folder)))
    text = model.backbone.text
    ids = text.tokenize([PROMPT])[0]
    reference = open_clip.tokenize([PROMPT], context_length=len(ids))[0]
    assert torch.equal(ids[: int((reference != 0).sum())], reference[reference != 0])  # open_clip pads with 0, CLIP's with <eos>
    native = model.backbone.text_encoder(ids[None]).last_hidden_state
    torch.testing.assert_close(text.encode([PROMPT]), native, rtol=0, atol=1e-5)


@pytest.mark.parametrize("sampler", ["pipeline", "euler", "dpmsolver++"])
def test_generate_gives_diffusers_images(folder, sampler):
    model = build(adaptkit.load_spec(spec_of(folder))).eval()
    pipe = diffusers_pipeline(folder, sampler)
    torch.testing.assert_close(ours(model, sampler, negative=NEGATIVE), theirs(pipe, negative=NEGATIVE), rtol=0, atol=1e-4)
    assert not torch.allclose(ours(model, sampler), ours(model, sampler, negative=NEGATIVE), atol=1e-3)


def lora_run(folder, tmp_path, methods=(LORA_BOTH,)):
    model = randomised(build(adaptkit.load_spec(spec_of(folder, methods))))
    save_run(model, tmp_path / "run", "finished")
    return model


@pytest.mark.slow
def test_export_diffusers_loads_with_load_lora_weights(folder, tmp_path):
    model = lora_run(folder, tmp_path)
    assert cli(["export", str(tmp_path / "run"), str(tmp_path / "lora"), "--format", "diffusers"]) == 0
    pipe = diffusers_pipeline(folder)
    base = theirs(pipe)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    adapted = theirs(pipe)
    assert (adapted - base).abs().max() > 1e-2  # the LoRA of both towers changes the images
    torch.testing.assert_close(ours(model), adapted, rtol=0, atol=1e-4)
    # and the file comes back: import gives the same model
    assert cli(["import", str(tmp_path / "lora"), str(tmp_path / "back")]) == 0
    torch.testing.assert_close(ours(load_run(str(tmp_path / "back"), [])), adapted, rtol=0, atol=1e-4)


def peft_lora(folder, path, convert: bool, metadata: bool):
    """A LoRA made as diffusers' training scripts make one: PEFT on the UNet and the text encoder."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = diffusers_pipeline(folder)
    unet_config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    text_config = LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"])
    pipe.unet.add_adapter(unet_config)
    inject_adapter_in_model(text_config, pipe.text_encoder)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in [*pipe.unet.named_parameters(), *pipe.text_encoder.named_parameters()]:
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    unet, text = get_peft_model_state_dict(pipe.unet), get_peft_model_state_dict(pipe.text_encoder)
    if convert:  # diffusers' own keys: lora.down/up (UNet), lora_linear_layer.down/up (text encoder)
        unet, text = convert_state_dict_to_diffusers(unet), convert_state_dict_to_diffusers(text)
    extra = {"unet_lora_adapter_metadata": unet_config.to_dict(), "text_encoder_lora_adapter_metadata": text_config.to_dict()} if metadata else {}
    type(pipe).save_lora_weights(str(path), unet_lora_layers=unet, text_encoder_lora_layers=text, **extra)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("convert", [True, False], ids=["diffusers_keys", "peft_keys"])
def test_import_reads_lora_made_by_diffusers_and_peft(folder, tmp_path, convert):
    path = peft_lora(folder, tmp_path / "lora", convert=convert, metadata=True)
    base = tmp_path / "base.yaml"
    base.write_text(json.dumps(spec_of(folder)))
    assert cli(["import", str(path), str(tmp_path / "run"), "--spec", str(base)]) == 0
    pipe = diffusers_pipeline(folder)
    pipe.load_lora_weights(str(path))
    torch.testing.assert_close(ours(load_run(str(tmp_path / "run"), [])), theirs(pipe), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_import_reads_network_alphas_and_transformers_4_names(folder, tmp_path):
    """Older files: alpha stored as a tensor per module, text-encoder keys under text_model."""
    from safetensors.torch import load_file, save_file

    path = peft_lora(folder, tmp_path / "lora", convert=True, metadata=False)
    tensors = load_file(str(path / "pytorch_lora_weights.safetensors"))
    old = {}
    for key, value in tensors.items():
        key = key.replace("text_encoder.", "text_encoder.text_model.")
        old[key] = value
        if key.endswith("down.weight"):
            old[key.rsplit(".", 3)[0] + ".alpha"] = torch.tensor(float(value.shape[0]) * 2.0)
    save_file(old, str(tmp_path / "old.safetensors"))
    base = adaptkit.load_spec(spec_of(folder))
    from adaptkit_plugins.diffusion.diffusers_lora import read_diffusers

    model = read_diffusers(tmp_path / "old.safetensors", base)
    scales = {u.layer: u.scale for u in model.adaptkit.methods[0].low_rank_updates()}
    assert set(scales.values()) == {2.0}  # alpha 2r over rank r


@pytest.mark.slow
def test_merge_writes_a_folder_from_pretrained_loads(folder, tmp_path):
    model = lora_run(folder, tmp_path)
    assert cli(["merge", str(tmp_path / "run"), str(tmp_path / "merged")]) == 0
    torch.testing.assert_close(ours(model, "dpmsolver++"), theirs(diffusers_pipeline(tmp_path / "merged", "dpmsolver++")),
                               rtol=0, atol=1e-4)


def test_generate_command_takes_the_sampling_flags(folder, tmp_path, capsys):
    lora_run(folder, tmp_path)
    out = tmp_path / "grid.png"
    assert cli(["generate", str(tmp_path / "run"), "--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--sampler", "euler",
                "--guidance", "4", "--steps", "2", "--num", "3", "--batch-size", "2", "--seed", "1", "--out", str(out)]) == 0
    assert out.is_file() and len(list((tmp_path / "grid").glob("*.png"))) == 3


def test_text_tower_token_site_is_a_placeholder_site(folder):
    model = build(adaptkit.load_spec(spec_of(folder)))
    site = model.backbone.surface.towers["text"].tokens
    assert isinstance(site, PlaceholderSite)
    assert site.in_vocabulary("cat") and site.in_vocabulary("cat</w>") and not site.in_vocabulary("<my-thing>")
    cat = site.embed_words("cat")
    assert cat.shape == (1, 32)
    vector = torch.nn.Parameter(cat[0].clone())
    site.bind_placeholder("<my-thing>", vector)
    assert site.in_vocabulary("<my-thing>")
    text = model.backbone.text
    # the learned word is encoded with its vector, wherever it occurs: here exactly as the word it copies
    torch.testing.assert_close(text.encode(["a <my-thing> photo"]), text.encode(["a cat photo"]))
    assert not torch.allclose(text.encode(["a <my-thing> photo"]), text.encode(["a dog photo"]))


def test_bf16_base_trains_and_generates(folder):
    model = build(adaptkit.load_spec(spec_of(folder, [LORA_BOTH], dtype="bf16")))
    assert model.backbone.unet.conv_in.weight.dtype == torch.bfloat16
    from adaptkit.precision import compute_context

    batch = {"images": torch.rand(2, 3, 16, 16) * 2 - 1, "labels": torch.tensor([1, 2]), "captions": ["one", "two"]}
    with compute_context(model, "cpu"):
        loss = model(batch).loss
        loss.backward()
        images = ours(model.eval(), num=1)
    assert torch.isfinite(loss) and torch.isfinite(images).all()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("part", ["unet", "tokenizer", "scheduler"])
def test_a_folder_missing_a_part_names_it(folder, tmp_path, part):
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / part)
    with pytest.raises(CheckpointError, match=rf"backbone.pretrained: {broken} lacks {part}/"):
        build(adaptkit.load_spec(spec_of(broken)))


def test_a_lora_for_another_unet_layout_names_the_keys(folder, tmp_path):
    from safetensors.torch import load_file, save_file

    path = peft_lora(folder, tmp_path / "lora", convert=False, metadata=False)
    tensors = load_file(str(path / "pytorch_lora_weights.safetensors"))
    other = {k.replace("down_blocks.1.attentions.0", "down_blocks.2.attentions.0"): v for k, v in tensors.items()}
    save_file(other, str(tmp_path / "other.safetensors"))
    from adaptkit_plugins.diffusion.diffusers_lora import read_diffusers

    with pytest.raises(CompatibilityError, match=r"of the adapter's \d+ LoRA modules have no adaptable layer .*unet.down_blocks.2"):
        read_diffusers(tmp_path / "other.safetensors", adaptkit.load_spec(spec_of(folder)))


def test_export_diffusers_refuses_another_backbone(tmp_path):
    from adaptkit_plugins.diffusion.diffusers_lora import write_diffusers

    model = build(adaptkit.load_spec({"backbone": {"name": "vit", "model": "vit_tiny_digits"}, "methods": [{"name": "lora"}],
                                      "task": {"name": "classification"}, "data": {"name": "digits"}}))
    with pytest.raises(CompatibilityError, match="sd_pipeline run; this run's backbone is 'vit'"):
        write_diffusers(model, tmp_path)


# ------------------------------------------------------------------ the example
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "sd_lora_digits.yaml"


def test_the_example_needs_its_folder_and_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/tiny_sd_pipeline here
    with pytest.raises(CheckpointError, match="runs/tiny_sd_pipeline is not a directory; give a diffusers pipeline folder"):
        build(adaptkit.load_spec(EXAMPLE, [f"output.dir={tmp_path / 'run'}"]))


def test_the_example_trains_lora_on_both_towers_in_latent_space(folder, tmp_path):
    model = build(adaptkit.load_spec(EXAMPLE, [f"backbone.pretrained={folder}", f"output.dir={tmp_path / 'run'}"]),
                           keep_data=True)
    trainable = {name.split(".")[1] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"unet", "text_encoder"}  # never the VAE
    batch = model.adaptkit.data.train.batch(range(4))
    assert batch["images"].shape == (4, 3, 16, 16)
    assert model.backbone.target(batch).shape == (4, 4, 8, 8)  # VAE latents
    model.training_step(batch).loss.backward()
    assert all(p.grad is None for p in model.backbone.vae.parameters())


@pytest.mark.slow
def test_textual_inversion_export_loads_with_load_textual_inversion(folder, tmp_path):
    """A word learned on the pipeline's own text encoder (method prompt with a placeholder) goes to
    diffusers as learned_embeds.safetensors; load_textual_inversion then gives our images."""
    word = "<my-digit>"
    method = {"name": "prompt", "tower": "text", "placeholder": word, "initializer_token": "three"}
    model = randomised(build(adaptkit.load_spec(spec_of(folder, [method])))).eval()
    save_run(model, tmp_path / "run", "finished")
    assert cli(["export", str(tmp_path / "run"), str(tmp_path / "out"), "--format", "diffusers"]) == 0
    pipe = diffusers_pipeline(folder)
    prompt = f"a handwritten digit {word}"
    initial = theirs(pipe, prompt=prompt.replace(word, "three"))
    pipe.load_textual_inversion(str(tmp_path / "out" / "learned_embeds.safetensors"))
    adapted = theirs(pipe, prompt=prompt)
    assert (adapted - initial).abs().max() > 1e-2  # the learned vector is not the initializer's
    torch.testing.assert_close(ours(model, prompt=prompt), adapted, rtol=0, atol=1e-4)
