"""Interop: PEFT export/import (checked with peft itself) and merged plain-library models."""

from __future__ import annotations

import json
import re

import peft
import pytest
import timm
import torch

import adaptkit
from adaptkit.cli import main as cli
from adaptkit.errors import CheckpointError, CompatibilityError, RunError
from adaptkit.native import load_trained, merge_to_native, native_copy
from adaptkit.peft_format import export_peft, import_peft
from tests.conftest import tiny_vit_spec

BACKBONES = {"vit": "vit_tiny_digits", "swin": "swin_tiny_digits"}
#: LoRA on q/v slices of the fused qkv, the MLP, the conv patch embedding and the head, plus a
#: second LoRA stacked on q and attn.out with another rank and alpha
STACKED = [
    {"name": "lora", "rank": 2, "alpha": 3, "targets": ["attn.q", "attn.v", "mlp.in", "embed", "head"]},
    {"name": "lora", "rank": 3, "targets": ["attn.q", "attn.out"]},
]


def spec_for(tmp_path, backbone, methods, **extra):
    return tiny_vit_spec(tmp_path, backbone={"name": backbone, "model": BACKBONES[backbone]}, methods=methods,
                         data={"name": "digits", "classes": [5, 6, 7, 8, 9]}, **extra)


def randomised(model, seed=0):
    """Random trained tensors (LoRA's B starts at zero, which would hide mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def images(n=3, seed=1):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_peft_loads_our_export_and_computes_our_outputs(tmp_path, backbone):
    model = randomised(adaptkit.build(spec_for(tmp_path, backbone, STACKED)))
    ours = model.logits(images())
    export_peft(model, tmp_path / "peft")
    plain = native_copy(model).model  # plain timm model with the base weights
    assert not any("lora" in name for name, _ in plain.named_modules())
    theirs = peft.PeftModel.from_pretrained(plain, tmp_path / "peft").eval()(images())
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    # and back: the import computes the same again
    back = import_peft(tmp_path / "peft")
    torch.testing.assert_close(back.logits(images()), ours, rtol=1e-5, atol=1e-5)


def test_q_and_v_slices_become_one_block_structured_lora_on_qkv(tmp_path):
    model = randomised(adaptkit.build(spec_for(tmp_path, "vit", [{"name": "lora", "rank": 2, "alpha": 6, "targets": ["attn.q", "attn.v"]}])))
    export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    # rank 2 per part, two parts: rank 4 on the whole qkv; alpha doubled so alpha / r stays 3
    assert (config["r"], config["lora_alpha"], config["rank_pattern"], config["alpha_pattern"]) == (4, 12, {}, {})
    assert config["target_modules"] == [f"blocks.{i}.attn.qkv" for i in range(4)]
    assert config["modules_to_save"] == ["head"]
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    a, b = tensors["base_model.model.blocks.0.attn.qkv.lora_A.weight"], tensors["base_model.model.blocks.0.attn.qkv.lora_B.weight"]
    delta = model.backbone.net.blocks[0].attn.qkv.lora
    assert a.shape == (4, 64) and b.shape == (192, 4)
    assert torch.equal(a, delta.lora_a.detach())
    assert torch.equal(b[:64, :2], delta.lora_b[:64].detach()) and torch.equal(b[128:, 2:], delta.lora_b[64:].detach())
    assert not b[64:128].any() and not b[:64, 2:].any() and not b[128:, :2].any()  # k untouched, parts apart
    assert set(tensors) >= {"base_model.model.head.weight", "base_model.model.head.bias"}


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_an_adapter_peft_made_imports_with_the_same_outputs(tmp_path, backbone):
    base = adaptkit.build(spec_for(tmp_path, backbone, []))
    plain = native_copy(base).model
    plain.reset_classifier(5)
    targets = {"vit": ["blocks.0.attn.qkv", "blocks.1.mlp.fc2", "patch_embed.proj"],
               "swin": ["layers.0.blocks.0.attn.qkv", "layers.1.blocks.1.mlp.fc1", "layers.1.downsample.reduction", "patch_embed.proj"]}[backbone]
    head = "head" if backbone == "vit" else "head.fc"
    config = peft.LoraConfig(
        r=4, lora_alpha=5, target_modules=targets, modules_to_save=[head], use_rslora=True,
        rank_pattern={targets[1]: 2}, alpha_pattern={targets[0]: 7}, init_lora_weights=False,
    )
    made = peft.get_peft_model(plain, config)
    randomised(made, seed=4)
    made.save_pretrained(tmp_path / "peft")
    expected = made.eval()(images())
    model = import_peft(tmp_path / "peft", spec_for(tmp_path, backbone, []))
    torch.testing.assert_close(model.logits(images()), expected, rtol=1e-5, atol=1e-5)
    (lora,) = model.adaptkit.spec.methods
    assert lora.use_rslora and lora.rank == 4 and lora.alpha == 5
    assert sorted(lora.rank_pattern.values()) == [2] and sorted(lora.alpha_pattern.values()) == [7]


def test_cli_run_export_import_merge_and_plain_timm_loads_the_merge(tmp_path):
    import yaml
    from safetensors.torch import load_file

    spec = spec_for(tmp_path, "vit", [{"name": "lora", "rank": 2, "targets": ["attn.q", "attn.v", "mlp.out"]}])
    spec["train"]["max_steps"] = 3
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    run = tmp_path / "run"
    assert cli(["run", str(tmp_path / "spec.yaml")]) == 0
    assert cli(["export", str(run), str(tmp_path / "peft"), "--include-base"]) == 0
    assert cli(["import", str(tmp_path / "peft"), str(tmp_path / "imported")]) == 0
    assert cli(["merge", str(run), str(tmp_path / "merged")]) == 0
    trained = load_trained(run)
    expected = trained.logits(images())
    torch.testing.assert_close(load_trained(tmp_path / "imported").logits(images()), expected, rtol=1e-5, atol=1e-5)
    # without adaptkit: timm.create_model(**recipe) + load_state_dict
    recipe = json.loads((tmp_path / "merged" / "adaptkit_native.json").read_text())["recipe"]
    assert recipe["library"] == "timm" and recipe["create_model"]["num_classes"] == 5
    plain = timm.create_model(**recipe["create_model"])
    plain.load_state_dict(load_file(tmp_path / "merged" / "model.safetensors"))
    torch.testing.assert_close(plain.eval()(images()), expected, rtol=1e-5, atol=1e-5)
    # the PEFT directory alone: timm + peft, no adaptkit objects
    exported = json.loads((tmp_path / "peft" / "adaptkit.json").read_text())["recipe"]["create_model"]
    plain = timm.create_model(**exported)
    plain.load_state_dict(load_file(tmp_path / "peft" / "base_model.safetensors"))
    with_peft = peft.PeftModel.from_pretrained(plain, tmp_path / "peft").eval()
    torch.testing.assert_close(with_peft(images()), expected, rtol=1e-5, atol=1e-5)
    # a second write into the same directory is refused without --overwrite
    assert cli(["merge", str(run), str(tmp_path / "merged")]) == 2


def test_merge_of_full_row_updates_and_lora_on_swin_loads_into_plain_timm(tmp_path):
    methods = [{"name": "full", "targets": ["attn.q", "merge"]}, {"name": "lora", "rank": 2, "targets": ["attn.v", "mlp.in"]}]
    model = randomised(adaptkit.build(spec_for(tmp_path, "swin", methods)))
    expected = model.logits(images())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = merge_to_native(model, tmp_path / "merged")
    torch.testing.assert_close(result.model(images()), expected, rtol=1e-5, atol=1e-5)
    assert result.task_modules == {"head": "head.fc"}
    for key, value in model.state_dict().items():  # the model itself is left unmerged
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6)
    torch.testing.assert_close(model.logits(images()), expected, rtol=1e-5, atol=1e-5)
    from safetensors.torch import load_file

    recipe = json.loads((tmp_path / "merged" / "adaptkit_native.json").read_text())["recipe"]
    plain = timm.create_model(**recipe["create_model"])
    plain.load_state_dict(load_file(tmp_path / "merged" / "model.safetensors"))
    torch.testing.assert_close(plain.eval()(images()), expected, rtol=1e-5, atol=1e-5)


def test_what_cannot_travel_is_a_clear_error(tmp_path):
    prompt = adaptkit.build(spec_for(tmp_path, "vit", [{"name": "lora", "rank": 2}, {"name": "prompt", "count": 2}]))
    with pytest.raises(CompatibilityError, match="method 'prompt' is not a low-rank update"):
        export_peft(prompt, tmp_path / "a")
    with pytest.raises(CompatibilityError, match="method 'prompt' cannot be merged"):
        merge_to_native(prompt)
    full = adaptkit.build(spec_for(tmp_path, "vit", [{"name": "full", "targets": ["mlp.in"]}]))
    with pytest.raises(CompatibilityError, match="no low-rank updates .*adaptkit merge"):
        export_peft(full, tmp_path / "b")
    # trained whole layers travel as modules_to_save; the class token has no module of its own
    full = adaptkit.build(spec_for(tmp_path, "vit", [{"name": "full"}]))
    with pytest.raises(CompatibilityError, match="base weights were trained .*cls_token.*adaptkit merge"):
        export_peft(full, tmp_path / "b")
    lora = randomised(adaptkit.build(spec_for(tmp_path, "vit", [{"name": "lora", "rank": 2}])))
    export_peft(lora, tmp_path / "ok")
    # a foreign PEFT directory needs the base spec; ours carries it
    (tmp_path / "ok" / "adaptkit.json").unlink()
    with pytest.raises(CompatibilityError, match="not exported by adaptkit .*--spec"):
        import_peft(tmp_path / "ok")
    # the head of another class count
    with pytest.raises(CheckpointError, match="different number of classes"):
        import_peft(tmp_path / "ok", tiny_vit_spec(tmp_path, methods=[]))
    config = json.loads((tmp_path / "ok" / "adapter_config.json").read_text())
    (tmp_path / "ok" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(CompatibilityError, match="use_dora=True is not supported"):
        import_peft(tmp_path / "ok", spec_for(tmp_path, "vit", []))
    with pytest.raises(CheckpointError, match="not a PEFT adapter directory"):
        import_peft(tmp_path, spec_for(tmp_path, "vit", []))
    with pytest.raises(RunError, match="no adapter.safetensors"):
        load_trained(tmp_path)


# ------------------------------------------------------------------ clip (open_clip)
CLIP_BASE = {"name": "clip", "model": "clip_tiny_digits"}
TEXTS = ["a photo of the digit 3", "seven", "a blurry 5"]


def clip_spec(tmp_path, methods):
    return tiny_vit_spec(tmp_path, backbone=CLIP_BASE, methods=methods, data={"name": "digits", "classes": [5, 6, 7, 8, 9], "channels": 3})


def clip_outputs(encode_image, encode_text, backbone):
    """Image features (of images normalised as the backbone does) and text features."""
    pixels = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    ids = backbone.tokenize(TEXTS)
    return encode_image(backbone.normalise_images(pixels)), encode_text(ids)


def test_clip_lora_exports_to_peft_on_open_clip_and_imports_back(tmp_path):
    from safetensors.torch import load_file

    methods = [{"name": "lora", "rank": 2, "targets": ["attn.q", "attn.v", "mlp.in", "mlp.out"]},
               {"name": "lora", "rank": 3, "tower": "vision", "targets": ["embed", "attn.k"]}]
    model = randomised(adaptkit.build(clip_spec(tmp_path, methods)))
    backbone = model.backbone
    ours = clip_outputs(lambda x: backbone.net.visual(x), backbone.encode_text, backbone)
    export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    # "transformer.resblocks.0.attn" (text) ends "visual.transformer.resblocks.0.attn": a regex matched whole
    assert re.fullmatch(config["target_modules"], "visual.transformer.resblocks.0.attn")
    assert not re.fullmatch(config["target_modules"], "visual.transformer.resblocks.0.mlp")
    # in_proj q/v (rank 2 each) + k (rank 3) on the vision tower: one MultiheadAttention LoRA of rank 7;
    # the text tower's (q/v: rank 4) keys are anchored, as they too end the vision names
    assert config["r"] == 2 and config["rank_pattern"] == {
        **{rf"visual\.transformer\.resblocks\.{i}\.attn": 7 for i in range(2)},
        **{rf"^transformer\.resblocks\.{i}\.attn": 4 for i in range(2)},
        r"visual\.conv1": 3,
    }
    plain = native_copy(model).model
    assert isinstance(plain.visual.transformer.resblocks[0].attn, torch.nn.MultiheadAttention)
    peft_model = peft.PeftModel.from_pretrained(plain, tmp_path / "peft").eval()
    theirs = clip_outputs(peft_model.encode_image, peft_model.encode_text, backbone)
    for a, b in zip(theirs, ours):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # open_clip has no classifier: the head travels beside the adapter
    head = load_file(tmp_path / "peft" / "task_modules.safetensors")
    assert torch.equal(head["head.weight"], model.head.weight.detach())
    back = import_peft(tmp_path / "peft")
    again = clip_outputs(lambda x: back.backbone.net.visual(x), back.backbone.encode_text, back.backbone)
    for a, b in zip(again, ours):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_clip_out_proj_factors_are_exact_and_peft_multihead_bug_is_known(tmp_path):
    model = randomised(adaptkit.build(clip_spec(tmp_path, [{"name": "lora", "rank": 2, "tower": "text", "targets": ["attn.out"]}])))
    backbone = model.backbone
    ours = clip_outputs(lambda x: backbone.net.visual(x), backbone.encode_text, backbone)[1]
    export_peft(model, tmp_path / "peft")
    assert "huggingface/peft pull request 3774" in (tmp_path / "peft" / "README.md").read_text()
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())

    def reference(times):
        """Plain open_clip with out_proj.weight += times * (alpha / r) B A, read from the exported file."""
        plain = native_copy(model).model
        with torch.no_grad():
            for i, block in enumerate(plain.transformer.resblocks):
                stem = f"base_model.model.transformer.resblocks.{i}.attn.base_layer.out_proj"
                a, b = tensors[f"{stem}.lora_A.weight"], tensors[f"{stem}.lora_B.weight"]
                block.attn.out_proj.weight += times * config["lora_alpha"] / config["r"] * (b @ a)
        return plain.eval().encode_text(backbone.tokenize(TEXTS))

    torch.testing.assert_close(reference(1), ours, rtol=1e-5, atol=1e-5)  # the factors mean what LoRA means
    theirs = peft.PeftModel.from_pretrained(native_copy(model).model, tmp_path / "peft").eval().encode_text(backbone.tokenize(TEXTS))
    # PEFT with the fix computes ours; PEFT <= 0.21.2 adds the out_proj update twice
    assert torch.allclose(theirs, ours, rtol=1e-5, atol=1e-5) or torch.allclose(theirs, reference(2), rtol=1e-5, atol=1e-5)


def test_clip_merge_loads_into_plain_open_clip(tmp_path):
    import open_clip
    from safetensors.torch import load_file

    methods = [{"name": "lora", "rank": 2}, {"name": "full", "tower": "text", "targets": ["attn.q"]}]
    model = randomised(adaptkit.build(clip_spec(tmp_path, methods)))
    backbone = model.backbone
    ours = clip_outputs(lambda x: backbone.net.visual(x), backbone.encode_text, backbone)
    assert cli_free_merge(model, tmp_path / "merged") == {"open_clip_config.json", "open_clip_model.safetensors",
                                                         "task_modules.safetensors", "adaptkit_native.json"}
    plain = open_clip.create_model(f"local-dir:{tmp_path / 'merged'}").eval()  # no adaptkit involved
    theirs = clip_outputs(plain.encode_image, plain.encode_text, backbone)
    for a, b in zip(theirs, ours):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    head = load_file(tmp_path / "merged" / "task_modules.safetensors")
    logits = torch.nn.functional.linear(theirs[0], head["head.weight"], head["head.bias"])
    torch.testing.assert_close(logits, model.head(ours[0]), rtol=1e-5, atol=1e-5)


def cli_free_merge(model, directory):
    merge_to_native(model, directory)
    return {p.name for p in directory.iterdir()}


def test_lora_on_a_strided_dilated_reflect_padded_conv_equals_its_merge():
    from adaptkit_plugins.methods._lora_impl import LoraDelta

    conv = torch.nn.Conv2d(3, 5, 3, stride=2, padding=2, dilation=2, padding_mode="reflect")
    delta = LoraDelta(conv, [None], 2, 1.5, 0.0, "kaiming")
    conv.add_module("lora", delta)
    with torch.no_grad():
        delta.lora_b.normal_()
    x = torch.randn(2, 3, 9, 9)
    unmerged = conv(x)
    delta.merge(1.0)
    torch.testing.assert_close(conv(x), unmerged, rtol=1e-5, atol=1e-5)


def test_merge_to_native_leaves_the_model_exactly_as_it_was(tmp_path):
    model = randomised(adaptkit.build(spec_for(tmp_path, "vit", STACKED)))
    before = {n: t.clone() for n, t in model.state_dict().items()}
    for _ in range(2):
        merge_to_native(model)
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())  # not W + d - d, which rounds
    assert not any(m.merged for m in model.adaptkit.methods)


def test_a_clip_export_of_a_preset_is_recreated_by_plain_open_clip_and_its_readme_names_its_files(tmp_path):
    # clip_tiny_digits is adaptkit's own configuration: plain open_clip knows it only from the export's
    # open_clip_config.json; the export's README names the files the export holds
    import open_clip
    from safetensors.torch import load_file

    model = randomised(adaptkit.build(clip_spec(tmp_path, [{"name": "lora", "rank": 2, "targets": ["attn.q", "mlp.in"]}])))
    files = export_peft(model, tmp_path / "peft", include_base=True)
    assert "open_clip_config.json" in files
    plain = open_clip.create_model(f"local-dir:{tmp_path / 'peft'}", load_weights=False)
    plain.load_state_dict(load_file(tmp_path / "peft" / "base_model.safetensors"))
    peft_model = peft.PeftModel.from_pretrained(plain, tmp_path / "peft").eval()
    backbone = model.backbone
    ours = clip_outputs(lambda x: backbone.net.visual(x), backbone.encode_text, backbone)
    for a, b in zip(clip_outputs(peft_model.encode_image, peft_model.encode_text, backbone), ours):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    readme = (tmp_path / "peft" / "README.md").read_text()
    assert "base_model.safetensors" in readme and "'model.safetensors'" not in readme
    assert "local-dir:<this directory>" in readme


def test_the_timm_export_readme_loads_base_model_safetensors(tmp_path):
    model = randomised(adaptkit.build(spec_for(tmp_path, "vit", [{"name": "lora", "rank": 2}])))
    export_peft(model, tmp_path / "peft", include_base=True)
    readme = (tmp_path / "peft" / "README.md").read_text()
    assert "load_file('base_model.safetensors')" in readme and "'model.safetensors'" not in readme
    assert "['recipe']['create_model']" in readme
