"""Interop of the diffusion UNet (ddpm_unet): PEFT export/import checked with peft itself on the
plain diffusers UNet, and merged models that plain diffusers loads (``from_pretrained``)."""

from __future__ import annotations

import json

import diffusers
import peft
import pytest
import torch

import adaptkit
from adaptkit.cli import main as cli
from adaptkit.errors import CompatibilityError
from adaptkit.native import load_trained, merge_to_native, native_copy
from adaptkit.peft_format import export_peft, import_peft
from tests.test_interop import randomised

CLASS = {"name": "ddpm_unet", "model": "ddpm_unet_tiny", "conditioning": "class", "num_classes": 10}
CROSS_CLASS = {"name": "ddpm_unet", "model": "ddpm_unet_cross_tiny", "conditioning": "class", "num_classes": 10}
TEXT = {"name": "ddpm_unet", "model": "ddpm_unet_cross_tiny", "conditioning": "text", "text_encoder": {"model": "clip_tiny_digits"}}
#: LoRA on every kind of UNet layer PEFT takes: attention q/k/v/out, resnet and sampler convs, the time
#: MLP and projections, conv_in / conv_out
UNET_LORA = {"name": "lora", "rank": 2, "alpha": 3, "targets": ["attn.q", "attn.k", "attn.v", "attn.out", "conv", "time", "embed", "output"]}
PROMPTS = ["a handwritten digit 3", "seven", ""]


def spec(tmp_path, backbone, methods, **train):
    return {
        "name": "tiny_ddpm", "seed": 0, "backbone": backbone, "methods": methods,
        "task": {"name": "text_to_image", "preview": 0, "steps": 2},
        "data": {"name": "digits", "classes": [5, 6, 7]},
        "train": {"max_steps": 2, "batch_size": 8, "progress": False, **train},
        "output": {"dir": str(tmp_path / "run")},
    }


def noisy(n=3):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=gen), torch.tensor([3, 480, 999])[:n]


def class_inputs(model):
    x, t = noisy()
    labels = torch.tensor([5, 7, 10])  # 10: the null class of guidance
    return (x, t), {"class_labels": labels}, model.backbone.predict_noise(x, t, {"labels": labels})


def text_inputs(model):
    x, t = noisy()
    cond = model.backbone.condition(prompts=PROMPTS)
    plain = {"encoder_hidden_states": cond["context"], "encoder_attention_mask": cond["mask"]}
    return (x, t), plain, model.backbone.predict_noise(x, t, cond)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_class_unet_lora_and_class_rows_export_to_peft_import_and_merge(tmp_path):
    methods = [UNET_LORA, {"name": "full", "targets": ["class_embed"]}]
    model = randomised(adaptkit.build(spec(tmp_path, CLASS, methods)))
    args, kwargs, ours = class_inputs(model)
    export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["class_embedding"]  # the trained class rows travel whole
    targets = set(config["target_modules"])
    assert {"conv_in", "conv_out", "down_blocks.0.downsamplers.0.conv", "up_blocks.0.upsamplers.0.conv",
            "down_blocks.1.attentions.0.to_q", "mid_block.attentions.0.to_out.0", "up_blocks.1.resnets.0.conv2",
            "time_embedding.linear_1", "down_blocks.0.resnets.0.time_emb_proj"} <= targets
    plain = native_copy(model).model
    assert type(plain) is diffusers.UNet2DModel and not any("lora" in n for n, _ in plain.named_modules())
    assert not torch.allclose(plain(*args, **kwargs).sample, ours, atol=1e-3)  # the adapter matters
    theirs = peft.PeftModel.from_pretrained(plain, tmp_path / "peft").eval()
    close(theirs(*args, **kwargs).sample, ours)
    back = import_peft(tmp_path / "peft")
    assert [m.name for m in back.adaptkit.spec.methods] == ["lora", "full"]
    close(back.backbone.predict_noise(args[0], args[1], {"labels": kwargs["class_labels"]}), ours)
    # merged: a diffusers directory that plain diffusers loads
    merge_to_native(model, tmp_path / "merged")
    assert {"config.json", "diffusion_pytorch_model.safetensors"} <= {p.name for p in (tmp_path / "merged").iterdir()}
    unet = diffusers.UNet2DModel.from_pretrained(tmp_path / "merged").eval()
    close(unet(*args, **kwargs).sample, ours)


def test_an_adapter_peft_made_for_a_diffusers_unet_imports_with_the_same_outputs(tmp_path):
    base = adaptkit.build(spec(tmp_path, CLASS, []))
    plain = native_copy(base).model
    config = peft.LoraConfig(
        r=4, lora_alpha=5, target_modules=["to_q", "to_v", "conv1", "conv_in", "linear_1"], modules_to_save=["class_embedding"],
        rank_pattern={"conv_in": 2}, alpha_pattern={"to_v": 7}, init_lora_weights=False,
    )
    made = peft.get_peft_model(plain, config)
    randomised(made, seed=4)
    made.save_pretrained(tmp_path / "peft")
    (x, t), labels = noisy(), torch.tensor([5, 7, 10])
    with torch.no_grad():
        expected = made.eval()(x, t, class_labels=labels).sample
        model = import_peft(tmp_path / "peft", spec(tmp_path, CLASS, []))
        close(model.backbone.predict_noise(x, t, {"labels": labels}), expected)


@torch.no_grad()
def test_text_unet_lora_with_cross_attention_exports_imports_and_merges(tmp_path):
    lora = {**UNET_LORA, "tower": "unet", "targets": [*UNET_LORA["targets"], "proj", "mlp.in", "mlp.out"]}
    model = randomised(adaptkit.build(spec(tmp_path, TEXT, [lora])))
    args, kwargs, ours = text_inputs(model)
    assert kwargs["encoder_attention_mask"] is not None and not kwargs["encoder_attention_mask"].all()
    export_peft(model, tmp_path / "peft")
    targets = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["target_modules"]
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k" in targets  # cross-attention k
    assert "down_blocks.1.attentions.0.proj_in" in targets
    plain = native_copy(model).model
    assert type(plain) is diffusers.UNet2DConditionModel
    theirs = peft.PeftModel.from_pretrained(plain, tmp_path / "peft").eval()
    close(theirs(*args, **kwargs).sample, ours)
    back = import_peft(tmp_path / "peft")
    close(back.backbone.predict_noise(*args, back.backbone.condition(prompts=PROMPTS)), ours)
    merge_to_native(model, tmp_path / "merged")
    unet = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "merged").eval()
    close(unet(*args, **kwargs).sample, ours)


@torch.no_grad()
def test_class_tokens_of_a_cross_attention_unet_travel_beside_the_merge(tmp_path):
    from safetensors.torch import load_file

    model = randomised(adaptkit.build(spec(tmp_path, CROSS_CLASS, [UNET_LORA, {"name": "full", "targets": ["class_embed"]}])))
    (x, t), labels = noisy(), torch.tensor([5, 7, 10])
    ours = model.backbone.predict_noise(x, t, {"labels": labels})
    merge_to_native(model, tmp_path / "merged")
    unet = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "merged").eval()
    tokens = load_file(tmp_path / "merged" / "class_context.safetensors")["weight"]
    close(unet(x, t, encoder_hidden_states=tokens[labels][:, None]).sample, ours)
    # PEFT has no place for adaptkit's class tokens: training them cannot be exported, only merged
    with pytest.raises(CompatibilityError, match="class_context.*not a whole layer of the plain model.*adaptkit merge"):
        export_peft(model, tmp_path / "peft")


def test_cli_train_export_import_merge_round_trip(tmp_path):
    import yaml

    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec(tmp_path, CLASS, [UNET_LORA], lr=0.05)))
    assert cli(["run", str(tmp_path / "spec.yaml")]) == 0
    run = tmp_path / "run"
    assert cli(["export", str(run), str(tmp_path / "peft"), "--include-base"]) == 0
    assert cli(["import", str(tmp_path / "peft"), str(tmp_path / "imported")]) == 0
    assert cli(["merge", str(run), str(tmp_path / "merged")]) == 0
    trained = load_trained(run)
    with torch.no_grad():
        args, kwargs, ours = class_inputs(trained)
        assert any(u.b.abs().sum() > 0 for u in trained.adaptkit.methods[0].low_rank_updates())  # it trained
        close(load_trained(tmp_path / "imported").backbone.predict_noise(*args, {"labels": kwargs["class_labels"]}), ours)
        recipe = json.loads((tmp_path / "merged" / "adaptkit_native.json").read_text())["recipe"]
        assert recipe["library"] == "diffusers" and recipe["class"] == "UNet2DModel"
        close(diffusers.UNet2DModel.from_pretrained(tmp_path / "merged").eval()(*args, **kwargs).sample, ours)
        # the PEFT directory alone: diffusers + peft, no adaptkit objects
        from safetensors.torch import load_file

        exported = json.loads((tmp_path / "peft" / "adaptkit.json").read_text())["recipe"]
        plain = diffusers.UNet2DModel.from_config(exported["config"])
        plain.load_state_dict(load_file(tmp_path / "peft" / "base_model.safetensors"))
        close(peft.PeftModel.from_pretrained(plain, tmp_path / "peft").eval()(*args, **kwargs).sample, ours)


def test_what_cannot_leave_a_diffusion_run_is_a_clear_error(tmp_path):
    prefix = adaptkit.build(spec(tmp_path, CLASS, [UNET_LORA, {"name": "prefix", "length": 2}]))
    with pytest.raises(CompatibilityError, match="method 'prefix' is not a low-rank update"):
        export_peft(prefix, tmp_path / "a")
    with pytest.raises(CompatibilityError, match="method 'prefix' cannot be merged"):
        merge_to_native(prefix)
    # LoRA on the CLIP text tower: not part of the diffusers UNet
    text = randomised(adaptkit.build(spec(tmp_path, TEXT, [{"name": "lora", "rank": 2, "tower": "text", "targets": ["attn.q"]}])))
    with pytest.raises(CompatibilityError, match="text.encoder.* not part of the diffusers UNet .*text encoder"):
        export_peft(text, tmp_path / "b")
    with pytest.raises(CompatibilityError, match="text.encoder.* not part of the diffusers UNet"):
        merge_to_native(text, tmp_path / "c")
    assert not (tmp_path / "c").exists()
    # the whole UNet fine-tuned (group norms, ...): merge it; PEFT's format cannot hold it
    full = adaptkit.build(spec(tmp_path, CLASS, [UNET_LORA, {"name": "full", "targets": None}]))
    with pytest.raises(CompatibilityError, match="base weights were trained .*adaptkit merge"):
        export_peft(full, tmp_path / "d")
    # a LoRA and trained weights on one layer
    both = adaptkit.build(spec(tmp_path, CLASS, [UNET_LORA, {"name": "full", "targets": ["embed"]}]))
    with pytest.raises(CompatibilityError, match="'conv_in' has trained weights and a LoRA"):
        export_peft(both, tmp_path / "e")


# ------------------------------------------------------------------ stylegan2 (merge only)
@torch.no_grad()
def test_stylegan2_lora_merges_into_a_rosinality_layout_generator_file(tmp_path):
    from safetensors.torch import load_file

    from adaptkit_plugins.stylegan.generator import StyleGan2Backbone, build_generator

    sg = {"name": "sg", "backbone": {"name": "stylegan2", "model": "stylegan2_tiny_8"},
          "methods": [{"name": "lora", "rank": 2, "targets": ["conv", "mlp.in"]}],
          "task": {"name": "stylegan2"}, "data": {"name": "digits"}, "output": {"dir": str(tmp_path / "run")}}
    model = adaptkit.build(sg)
    gen = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if p.requires_grad and name.startswith("backbone."):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    z = torch.randn(2, model.backbone.style_dim, generator=gen)
    ours = model.backbone.generate(z)
    merge_to_native(model, tmp_path / "merged")
    state = load_file(tmp_path / "merged" / "generator.safetensors")
    assert state["conv1.conv.weight"].ndim == 5 and not any("lora" in k for k in state)  # rosinality's layout
    plain = build_generator(model.backbone.config)
    plain.load_state_dict(state)
    base = native_copy(model).model  # the generator without the LoRA
    assert not torch.allclose(StyleGan2Backbone(base, model.backbone.config).generate(z), ours, atol=1e-3)
    close(StyleGan2Backbone(plain, model.backbone.config).generate(z), ours)
    with pytest.raises(CompatibilityError, match="backbone 'stylegan2' cannot export to PEFT: .*adaptkit merge"):
        export_peft(model, tmp_path / "peft")


def test_cli_import_of_an_adapter_with_trained_backbone_modules(tmp_path, capsys):
    # modules_to_save beside the LoRA (the class embedding) import as a second method
    model = randomised(adaptkit.build(spec(tmp_path, CLASS, [UNET_LORA, {"name": "full", "targets": ["class_embed"]}])))
    args, kwargs, ours = class_inputs(model)
    export_peft(model, tmp_path / "peft")
    assert cli(["import", str(tmp_path / "peft"), str(tmp_path / "imported")]) == 0
    assert "imported " in capsys.readouterr().out
    back = load_trained(tmp_path / "imported")
    assert [m.name for m in back.adaptkit.spec.methods] == ["lora", "full"]
    with torch.no_grad():
        close(back.backbone.predict_noise(args[0], args[1], {"labels": kwargs["class_labels"]}), ours)
