"""The adaptation surface of diffusers UNets: roles, blocks, attention sites, context tokens."""

from __future__ import annotations

import pytest
import torch

import adaptkit
from adaptkit.surface import PromptSource

CROSS = {"name": "ddpm_unet", "model": "ddpm_unet_cross_tiny", "conditioning": "class", "num_classes": 10}
PLAIN = {"name": "ddpm_unet", "model": "ddpm_unet_tiny", "conditioning": "class", "num_classes": 10}


def build(backbone, methods=()):
    return adaptkit.build({
        "backbone": backbone, "methods": list(methods), "task": {"name": "text_to_image", "preview": 0}, "data": {"name": "digits"},
    }).eval()


def inputs(n=3):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 8, 8, generator=gen), torch.tensor([10, 400, 900][:n]), {"labels": torch.tensor([1, 4, 10][:n])}


@pytest.mark.parametrize("backbone, roles", [
    (PLAIN, {"attn.q", "attn.k", "attn.v", "attn.out", "conv", "time", "embed", "output", "class_embed"}),
    (CROSS, {"attn.q", "attn.k", "attn.v", "attn.out", "conv", "time", "embed", "output", "class_embed", "mlp.in", "mlp.out", "proj"}),
])
def test_roles_and_sites_match_what_validation_promises(backbone, roles):
    record = adaptkit.registry().get("backbone", "ddpm_unet")
    info = record.towers_for(record.params.model_validate(backbone))["unet"]
    tower = build(backbone).surface.towers["unet"]
    assert tower.roles() == roles == set(info.roles)
    assert {kind for kind in ("layers", "blocks", "attention", "tokens") if tower.has(kind)} == set(info.sites)
    unet = build(backbone).backbone.unet
    attentions = [m for m in unet.modules() if type(m).__name__ == "Attention"]
    assert len(tower.attention) == len(attentions)
    q_layers = [s for s in tower.layers if s.role == "attn.q"]
    assert len(q_layers) == len(attentions) and all(s.name.endswith("to_q") for s in q_layers)
    resnets = [b for b in tower.blocks if b.channel_dim == 1]
    assert len(resnets) == sum(type(m).__name__ == "ResnetBlock2D" for m in unet.modules())


def test_every_conv_of_the_resnets_and_samplers_has_the_conv_role():
    model = build(PLAIN)
    tower = model.surface.towers["unet"]
    convs = {s.name for s in tower.layers if s.role == "conv"}
    expected = {f"backbone.unet.{n}" for n, m in model.backbone.unet.named_modules()
                if isinstance(m, torch.nn.Conv2d) and n not in ("conv_in", "conv_out")}
    assert convs == expected


class _Zero:
    def __init__(self, site):
        self.site = site

    def __call__(self, batch):
        return (torch.zeros(batch, self.site.num_heads, 0, self.site.head_dim),) * 2


@pytest.mark.parametrize("backbone", [PLAIN, CROSS])
def test_the_site_processor_reproduces_diffusers_attention(backbone):
    model = build(backbone)
    x, t, cond = inputs()
    before = model.backbone.predict_noise(x, t, cond)
    for site in model.surface.towers["unet"].attention:
        site.add_kv(_Zero(site))  # an empty prefix takes our processor's path
    after = model.backbone.predict_noise(x, t, cond)
    assert torch.allclose(before, after, atol=1e-5)


def test_extra_keys_of_cross_attention_equal_extra_context_tokens():
    model = build(CROSS)
    x, t, cond = inputs()
    extra = torch.randn(2, 16, generator=torch.Generator().manual_seed(3))
    backbone = model.backbone
    context = backbone.class_context(cond["labels"])[:, None]
    expected = backbone.unet(x, t, encoder_hidden_states=torch.cat([context, extra.expand(3, 2, 16)], dim=1)).sample
    cross_sites = [s for s in model.surface.towers["unet"].attention if s.module.is_cross_attention]
    for site in cross_sites:
        k, v = site.project_kv(extra)
        site.add_kv(lambda batch, k=k, v=v: (k.expand(batch, *k.shape), v.expand(batch, *v.shape)))
    # prefix keys come first, appended context last: attention is order-free over keys
    assert torch.allclose(backbone.predict_noise(x, t, cond), expected, atol=1e-5)


class _Tokens(PromptSource):
    def __init__(self, tokens, deep=False):
        self.values, self.count, self.deep = tokens, tokens.shape[-2], deep

    def tokens(self, batch, layer):
        value = self.values[layer] if self.deep else self.values
        return value.expand(batch, *value.shape)


def test_context_tokens_join_the_conditioning_of_every_cross_attention():
    model = build(CROSS)
    x, t, cond = inputs()
    site = model.surface.towers["unet"].tokens
    assert site.dim == 16 and site.num_layers == 4  # one down, one mid, two up cross-attentions
    backbone = model.backbone
    tokens = torch.randn(4, 16, generator=torch.Generator().manual_seed(4))
    context = backbone.class_context(cond["labels"])[:, None]
    expected = backbone.unet(x, t, encoder_hidden_states=torch.cat([context, tokens.expand(3, 4, 16)], dim=1)).sample
    site.attach(_Tokens(tokens))
    assert torch.allclose(backbone.predict_noise(x, t, cond), expected, atol=1e-5)


def test_deep_context_tokens_differ_per_cross_attention():
    model = build(CROSS)
    x, t, cond = inputs()
    site = model.surface.towers["unet"].tokens
    same = torch.randn(2, 16, generator=torch.Generator().manual_seed(5))
    site.attach(_Tokens(same.expand(site.num_layers, 2, 16), deep=True))
    shallow_equivalent = model.backbone.predict_noise(x, t, cond)
    fresh = build(CROSS)
    fresh.surface.towers["unet"].tokens.attach(_Tokens(same))
    assert torch.allclose(fresh.backbone.predict_noise(x, t, cond), shallow_equivalent, atol=1e-5)
    varied = torch.randn(site.num_layers, 2, 16, generator=torch.Generator().manual_seed(6))
    other = build(CROSS)
    other.surface.towers["unet"].tokens.attach(_Tokens(varied, deep=True))
    assert not torch.allclose(other.backbone.predict_noise(x, t, cond), shallow_equivalent, atol=1e-3)


@pytest.mark.parametrize("backbone", [PLAIN, CROSS])
def test_lora_on_every_role_trains_only_its_own_tensors_and_merges(backbone):
    targets = ["attn.q", "attn.k", "attn.v", "attn.out", "conv", "time", "embed", "output"]
    model = build(backbone, [{"name": "lora", "rank": 2, "targets": targets}])
    assert all(".lora." in n for n, p in model.named_parameters() if p.requires_grad)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    x, t, cond = inputs()
    unmerged = model.backbone.predict_noise(x, t, cond)
    lora = model.adaptkit.methods[0]
    lora.merge()
    assert torch.allclose(model.backbone.predict_noise(x, t, cond), unmerged, atol=1e-4)


def test_lora_refuses_the_class_embedding_table_but_full_trains_it():
    with pytest.raises(adaptkit.CompatibilityError, match="Embedding"):
        build(PLAIN, [{"name": "lora", "targets": ["class_embed"]}])
    model = build(PLAIN, [{"name": "full", "targets": ["class_embed"]}])
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["backbone.unet.class_embedding.weight"]


@pytest.mark.parametrize("preset", [p.name for p in adaptkit.registry().presets("ddpm_unet")])
def test_every_preset_builds_and_predicts_noise_of_its_image_shape(preset):
    cross = "cross" in preset
    backbone = {"name": "ddpm_unet", "model": preset, "conditioning": "class", "num_classes": 10}
    model = build(backbone)
    unet = model.backbone
    x = torch.randn(1, *unet.sample_shape, generator=torch.Generator().manual_seed(0))
    eps = unet.predict_noise(x, torch.tensor([500]), {"labels": torch.tensor([3])})
    assert eps.shape == x.shape and torch.isfinite(eps).all()
    assert (type(unet.unet).__name__ == "UNet2DConditionModel") == cross
