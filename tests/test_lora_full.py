"""LoRA and full fine-tuning on the ViT surface: targets, counts, merge equality."""

from __future__ import annotations

import pytest
import torch

import adaptkit
from adaptkit.compat import check_spec
from adaptkit.errors import CompatibilityError
from tests.conftest import tiny_vit_spec


def built(tmp_path, methods):
    return adaptkit.build(tiny_vit_spec(tmp_path, methods=methods))


def images(n=4):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def perturb(model):
    """Give every trainable tensor random values (LoRA's B starts at zero)."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def test_lora_starts_as_the_identity_and_counts_match(tmp_path):
    base = built(tmp_path, [])
    model = built(tmp_path, [{"name": "lora", "rank": 2, "targets": ["attn.q", "attn.v"]}])
    model.eval(), base.eval()
    assert torch.equal(model.logits(images()), base.logits(images()))
    state = adaptkit.trainable_state(model)
    lora = {k: v for k, v in state.items() if ".lora." in k}
    # q and v share one delta per fused qkv: A is (2 parts * r, 64), B is (64 + 64, r); 4 blocks
    assert sorted({tuple(v.shape) for v in lora.values()}) == [(4, 64), (128, 2)]
    assert sum(v.numel() for v in lora.values()) == 4 * 2 * 2 * (64 + 64)
    assert set(state) - set(lora) == {"head.weight", "head.bias"}


def test_q_and_v_only_touch_their_rows(tmp_path):
    model = built(tmp_path, [{"name": "lora", "rank": 2, "targets": ["attn.q", "attn.v"]}])
    perturb(model)
    qkv = model.backbone.net.blocks[0].attn.qkv
    x = torch.randn(3, 5, 64)
    delta = qkv(x) - torch.nn.functional.linear(x, qkv.weight, qkv.bias)
    assert delta[..., :64].abs().max() > 0          # q changed
    assert torch.equal(delta[..., 64:128], torch.zeros_like(delta[..., 64:128]))  # k untouched
    assert delta[..., 128:].abs().max() > 0         # v changed


@pytest.mark.parametrize("targets", [["attn.q", "attn.v"], ["attn.q", "attn.k", "attn.v", "attn.out", "mlp.in", "mlp.out", "embed", "head"]])
def test_merge_equals_unmerged_and_unmerge_restores(tmp_path, targets):
    model = built(tmp_path, [{"name": "lora", "rank": 3, "alpha": 5, "targets": targets}])
    perturb(model)
    model.eval()
    before_weights = {k: v.clone() for k, v in model.state_dict().items() if ".lora" not in k}
    unmerged = model.logits(images())
    (lora,) = model.adaptkit.methods
    lora.merge()
    merged = model.logits(images())
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    assert not torch.equal(model.backbone.net.blocks[0].attn.qkv.weight, before_weights["backbone.net.blocks.0.attn.qkv.weight"])
    lora.unmerge()
    for key, value in before_weights.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=1e-6)


def test_lora_on_conv_layers_by_regex(tmp_path):
    model = built(tmp_path, [{"name": "lora", "rank": 2, "targets": [], "target_modules": [r"patch_embed\.proj$"]}])
    conv = model.backbone.net.patch_embed.proj
    assert isinstance(conv, torch.nn.Conv2d) and tuple(conv.lora.lora_a.shape) == (2, 1, 2, 2)
    perturb(model)
    model.eval()
    out = model.logits(images())
    model.adaptkit.methods[0].merge()
    torch.testing.assert_close(model.logits(images()), out, rtol=1e-5, atol=1e-5)


def test_stacked_lora_gets_separate_deltas(tmp_path):
    model = built(tmp_path, [{"name": "lora", "rank": 2, "targets": ["attn.q"]}, {"name": "lora", "rank": 1, "targets": ["attn.q"]}])
    qkv = model.backbone.net.blocks[0].attn.qkv
    assert qkv.lora.rank == 2 and qkv.lora_1.rank == 1


def test_unknown_role_and_unmatched_regex_are_clear(tmp_path):
    with pytest.raises(CompatibilityError, match=r"backbone 'vit' has no layers with role 'attn.qq' \(did you mean 'attn.q'\?\)"):
        built(tmp_path, [{"name": "lora", "targets": ["attn.qq"]}])
    with pytest.raises(CompatibilityError, match="pattern 'nothing_here' matches no layer"):
        built(tmp_path, [{"name": "lora", "targets": [], "target_modules": ["nothing_here"]}])
    with pytest.raises(CompatibilityError, match="has no tower 'text'"):
        built(tmp_path, [{"name": "lora", "tower": "text"}])


def test_full_everything_and_frozen_embeddings(tmp_path):
    model = built(tmp_path, [{"name": "full"}])
    assert all(p.requires_grad for p in model.parameters())
    model = built(tmp_path, [{"name": "full", "freeze_embeddings": True}])
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"backbone.net.cls_token", "backbone.net.pos_embed", "backbone.net.patch_embed.proj.weight", "backbone.net.patch_embed.proj.bias"}


def test_full_on_roles_trains_only_those_rows(tmp_path):
    model = built(tmp_path, [{"name": "full", "targets": ["attn.q", "mlp.in"]}])
    trainable = adaptkit.trainable_state(model)
    assert "backbone.net.blocks.0.mlp.fc1.weight" in trainable
    assert "backbone.net.blocks.0.attn.qkv.weight" not in trainable
    assert tuple(trainable["backbone.net.blocks.0.attn.qkv.full_delta.weight"].shape) == (64, 64)
    perturb(model)
    model.eval()
    out = model.logits(images())
    model.adaptkit.methods[0].merge()
    torch.testing.assert_close(model.logits(images()), out, rtol=1e-5, atol=1e-5)
    model = built(tmp_path, [{"name": "full", "targets": ["attn.q", "attn.k", "attn.v"]}])
    assert "backbone.net.blocks.0.attn.qkv.weight" in adaptkit.trainable_state(model)  # all rows: unfreeze the layer


def test_tower_both_means_what_validation_says_at_build_too():
    # validation read `tower: both` as "every tower with the site"; the build read it as "every tower, each with
    # the site", so system_prompt (text sites, the text tower only) passed validate and failed at build
    spec = {"backbone": {"name": "clip", "model": "clip_tiny_digits"}, "task": {"name": "zero_shot"}, "data": {"name": "digits"},
            "methods": [{"name": "system_prompt", "templates": ["a photo of a {}"], "tower": "both"}]}
    loaded = adaptkit.load_spec(spec)
    assert check_spec(loaded, adaptkit.registry()) == []
    model = adaptkit.build(loaded)
    assert model.adaptkit.methods[0].name == "system_prompt"


def test_an_unknown_tower_in_a_list_is_named_alone():
    spec = {"backbone": {"name": "clip", "model": "clip_tiny_digits"}, "task": {"name": "zero_shot"}, "data": {"name": "digits"},
            "methods": [{"name": "full", "tower": ["vision", "nope"]}]}
    problems = check_spec(adaptkit.load_spec(spec), adaptkit.registry())
    assert problems == ["methods[0]: method 'full': backbone 'clip' has no tower 'nope'; towers: vision, text"]
    spec["methods"] = [{"name": "lora", "tower": ["both"]}]
    assert check_spec(adaptkit.load_spec(spec), adaptkit.registry()) == []
    assert adaptkit.build(spec).adaptkit.methods[0].name == "lora"
