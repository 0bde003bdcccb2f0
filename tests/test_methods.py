"""Prefix, prompt and adapter methods, and stacking, on the ViT and Swin surfaces."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adaptkit
from adaptkit.errors import CompatibilityError
from adaptkit.records import TowerInfo
from adaptkit.surface import BlockSite, Surface, Tower
from adaptkit_plugins.methods.adapter import AdapterParams, check_adapter
from adaptkit_plugins.methods.prefix import PrefixParams, check_prefix
from adaptkit_plugins.methods.prompt import PromptParams, check_prompt

PRESETS = {"vit": "vit_tiny_digits", "swin": "swin_tiny_digits"}


def spec(backbone, methods, seed=0):
    return {
        "seed": seed,
        "backbone": {"name": backbone, "model": PRESETS[backbone]},
        "methods": methods,
        "task": {"name": "classification"},
        "data": {"name": "digits"},
    }


def images(n=4):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model):
    model.eval()
    return model.logits(images())


def randomise(model, names=None, std=0.3):
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and (names is None or any(n in name for n in names)):
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


HEAD = 64 * 10 + 10


# ----------------------------------------------------------------- prefix
@pytest.mark.parametrize("backbone", ["vit", "swin"])
def test_zero_length_and_gated_prefixes_start_at_the_base_model(backbone):
    base = logits(adaptkit.build(spec(backbone, [])))
    empty = adaptkit.build(spec(backbone, [{"name": "prefix", "length": 0}]))
    torch.testing.assert_close(logits(empty), base, rtol=0, atol=1e-6)
    gated = adaptkit.build(spec(backbone, [{"name": "prefix", "length": 4, "gate": True, "init_std": 1.0}]))
    torch.testing.assert_close(logits(gated), base, rtol=0, atol=1e-6)
    # the gate is what makes it the identity: opening it changes the output
    randomise(gated, ["prefix.gate"])
    assert (logits(gated) - base).abs().max() > 1e-3


def test_a_plain_zero_prefix_still_takes_a_share_of_the_softmax():
    """k = v = 0 adds exp(0) to every softmax denominator: not the identity (hence ``gate``)."""
    base = logits(adaptkit.build(spec("vit", [])))
    zero = adaptkit.build(spec("vit", [{"name": "prefix", "length": 4, "init_std": 0.0}]))
    assert (logits(zero) - base).abs().max() > 1e-4


def test_prefix_shapes_layers_and_reparameterisation():
    model = adaptkit.build(spec("swin", [{"name": "prefix", "length": 3, "layers": [0, -1]}]))
    state = adaptkit.trainable_state(model)
    keys = sorted(n for n in state if n.endswith("prefix.key"))
    assert keys == ["backbone.net.layers.0.blocks.0.attn.prefix.key", "backbone.net.layers.1.blocks.1.attn.prefix.key"]
    assert tuple(state[keys[0]].shape) == (2, 3, 16) and tuple(state[keys[1]].shape) == (4, 3, 16)

    model = adaptkit.build(spec("vit", [{"name": "prefix", "length": 5, "reparameterize": True, "hidden": 16}]))
    encoder = model.prefix_encoder_vision
    assert trainable(model) - HEAD == 5 * 16 + (16 * 16 + 16) + (16 + 1) * 2 * 4 * 64
    model.train()
    batch = {"images": images(), "labels": torch.tensor([0, 1, 2, 3])}
    model(batch).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())

    with pytest.raises(CompatibilityError, match="layers index 9 is out of range; tower 'vision' of backbone 'vit' has 4 attention sites"):
        adaptkit.build(spec("vit", [{"name": "prefix", "layers": [9]}]))


# ----------------------------------------------------------------- prompt
def test_vpt_deep_through_attention_equals_vpt_deep_through_tokens():
    """The route Swin uses is VPT-deep: on ViT, both routes give the same outputs."""
    tokens = adaptkit.build(spec("vit", [{"name": "prompt", "count": 3, "route": "tokens"}]))
    attention = adaptkit.build(spec("vit", [{"name": "prompt", "count": 3, "route": "attention"}]))
    randomise(tokens, ["prompt"], std=1.0)
    with torch.no_grad():
        deep = tokens.prompt_vision.prompts  # (blocks, count, dim)
        sites = tokens.surface.towers["vision"].attention
        for layer, block in enumerate(attention.backbone.net.blocks):
            block.attn.prompt.prompts.copy_(deep[layer])
    base = logits(adaptkit.build(spec("vit", [])))
    assert (logits(tokens) - base).abs().max() > 1e-3
    torch.testing.assert_close(logits(attention), logits(tokens), rtol=1e-5, atol=1e-5)
    assert len(sites) == 4


def test_vpt_shallow_and_deep_counts_and_init():
    shallow = adaptkit.build(spec("vit", [{"name": "prompt", "count": 5, "deep": False}]))
    assert tuple(shallow.prompt_vision.prompts.shape) == (1, 5, 64)
    deep = adaptkit.build(spec("vit", [{"name": "prompt", "count": 5}]))
    assert tuple(deep.prompt_vision.prompts.shape) == (4, 5, 64)
    bound = (6 / (1 * 2 * 2 + 64)) ** 0.5  # VPT: Xavier-uniform over patch fan-in (1 x 2 x 2) + width
    assert deep.prompt_vision.prompts.abs().max() <= bound
    assert deep.prompt_vision.prompts.abs().max() > 0.8 * bound
    swin = adaptkit.build(spec("swin", [{"name": "prompt", "count": 5}]))
    assert trainable(swin) - HEAD == 5 * (32 + 32 + 64 + 64)
    # the prompts pass through the frozen, shifted-window layers and change the output
    assert (logits(swin) - logits(adaptkit.build(spec("swin", [])))).abs().max() > 1e-4


# ----------------------------------------------------------------- adapter
@pytest.mark.parametrize("backbone", ["vit", "swin"])
def test_adapters_start_as_the_identity_and_count_by_placement(backbone):
    base = logits(adaptkit.build(spec(backbone, [])))
    houlsby = adaptkit.build(spec(backbone, [{"name": "adapter", "bottleneck": 4}]))
    pfeiffer = adaptkit.build(spec(backbone, [{"name": "adapter", "placement": "pfeiffer", "bottleneck": 4}]))
    bare = adaptkit.build(spec(backbone, [{"name": "adapter", "bottleneck": 4, "train_norms": False}]))
    assert torch.equal(logits(houlsby), base) and torch.equal(logits(pfeiffer), base)
    dims = [b.dim for b in houlsby.surface.towers["vision"].blocks]
    per_adapter = [2 * d * 4 + 4 + d for d in dims]
    norms = sum(2 * 2 * d for d in dims)  # by default the two LayerNorms of every adapted block train too
    assert trainable(houlsby) - HEAD == 2 * sum(per_adapter) + norms
    assert trainable(pfeiffer) - HEAD == sum(per_adapter) + norms
    assert trainable(bare) - HEAD == 2 * sum(per_adapter)
    randomise(houlsby, ["adapter"])
    assert (logits(houlsby) - base).abs().max() > 1e-3


def test_adapter_reduction_factor_sets_the_bottleneck():
    model = adaptkit.build(spec("swin", [{"name": "adapter", "reduction_factor": 8}]))
    block = model.backbone.net.layers[1].blocks[0]
    assert block.adapter_attn.down.out_features == 64 // 8
    assert model.backbone.net.layers[0].blocks[0].adapter_mlp.down.out_features == 32 // 8


class ConvBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x)


def test_adapters_on_convolutional_feature_maps_use_the_channel_axis():
    root = nn.Module()
    root.block = ConvBlock()
    root.requires_grad_(False)
    tower = Tower("unet", dim=6, blocks=[BlockSite("block", 6, mlp_output=root.block.conv, channel_dim=1)], param_prefixes=["block."])
    surface = Surface("toy_unet", {"unet": tower}, root=root)
    from adaptkit_plugins.methods._adapter_impl import apply

    x = torch.randn(2, 6, 5, 5)
    before = root.block(x)
    applied = apply(AdapterParams(bottleneck=2), surface)
    assert applied.expected_parameters == 2 * 6 * 2 + 2 + 6
    assert torch.equal(root.block(x), before)
    adapter = root.block.adapter_mlp
    with torch.no_grad():
        adapter.up.weight.normal_()
        h = nn.functional.conv2d(x, root.block.conv.weight, root.block.conv.bias, padding=1)
        per_pixel = adapter.up(adapter.act(adapter.down(h.permute(0, 2, 3, 1)))).permute(0, 3, 1, 2)
        torch.testing.assert_close(root.block(x), x + h + per_pixel)


@pytest.mark.parametrize("backbone", ["vit", "swin"])
def test_adapter_train_norms_trains_the_adapted_blocks_norms_and_saves_them(backbone, tmp_path):
    plain = adaptkit.build(spec(backbone, [{"name": "adapter", "bottleneck": 4, "layers": [0, -1], "train_norms": False}]))
    model = adaptkit.build(spec(backbone, [{"name": "adapter", "bottleneck": 4, "layers": [0, -1], "train_norms": True}]))
    torch.testing.assert_close(logits(model), logits(adaptkit.build(spec(backbone, []))), rtol=0, atol=0)
    blocks = model.surface.towers["vision"].blocks
    # two LayerNorms (weight + bias) in each of the two adapted blocks, none elsewhere
    extra = sum(2 * 2 * b.dim for b in (blocks[0], blocks[-1]))
    assert trainable(model) - trainable(plain) == extra == model.adaptkit.methods[0].expected_parameters - plain.adaptkit.methods[0].expected_parameters
    norm_names = sorted(n for n in adaptkit.trainable_state(model) if ".norm" in n)
    assert len(norm_names) == 8 and all(n.startswith((f"{blocks[0].name}.", f"{blocks[-1].name}.")) for n in norm_names)
    # trained norms travel in the adapter file
    randomise(model, std=0.3)
    expected = logits(model)
    path = adaptkit.save_adapter(model, tmp_path / "a.safetensors")
    fresh = adaptkit.build(model.adaptkit.spec)
    adaptkit.load_adapter(fresh, path)
    assert torch.equal(logits(fresh), expected)


def test_train_norms_on_a_backbone_that_does_not_list_its_norms_is_a_clear_error():
    root = nn.Module()
    root.block = ConvBlock()
    root.requires_grad_(False)
    tower = Tower("unet", dim=6, blocks=[BlockSite("block", 6, mlp_output=root.block.conv, channel_dim=1)], param_prefixes=["block."])
    from adaptkit_plugins.methods._adapter_impl import apply

    with pytest.raises(CompatibilityError, match="'adapter' \\(train_norms\\) needs the norms of block 'block', but backbone 'toy' does not list them"):
        apply(AdapterParams(bottleneck=2, train_norms=True), Surface("toy", {"unet": tower}, root=root))
    # the default (auto) trains the norms where they are listed, and only the adapter here
    assert apply(AdapterParams(bottleneck=2), Surface("toy", {"unet": tower}, root=root)).expected_parameters == 2 * 6 * 2 + 2 + 6
    with pytest.raises(CompatibilityError, match="'adapter' \\(parallel\\) needs blocks with MLP inputs and outputs, but backbone 'toy'"):
        apply(AdapterParams(bottleneck=2, placement="parallel"), Surface("toy", {"unet": tower}, root=root))


class ScaledMlpBlock(nn.Module):
    """Pre-norm block whose MLP output passes a LayerScale-like module (as in open_clip)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(6)
        self.mlp = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 6))
        self.ls = nn.Linear(6, 6)

    def forward(self, x):
        return x + self.ls(self.mlp(self.norm(x)))


def test_parallel_adapter_adds_scaled_bottleneck_of_the_mlp_input_to_its_output():
    root = nn.Module()
    root.block = ScaledMlpBlock()
    root.requires_grad_(False)
    block = root.block
    site = BlockSite("block", 6, mlp_output=block.ls, mlp_input=block.mlp, norms=[block.norm])
    surface = Surface("toy", {"vision": Tower("vision", dim=6, blocks=[site], param_prefixes=["block."])}, root=root)
    from adaptkit_plugins.methods._adapter_impl import apply

    x = torch.randn(3, 5, 6)
    before = block(x)
    applied = apply(AdapterParams(bottleneck=2, placement="parallel", scale=4.0, train_norms=True), surface)
    assert applied.expected_parameters == (2 * 6 * 2 + 2 + 6) + 2 * 6
    assert torch.equal(block(x), before)
    adapter = block.adapter_mlp
    with torch.no_grad():
        adapter.up.weight.normal_()
        adapter.up.bias.normal_()
        got = block(x)
        applied.set_enabled(False)  # the reference below calls the hooked modules
        h = block.norm(x)
        want = x + block.ls(block.mlp(h)) + 4.0 * adapter.up(adapter.act(adapter.down(h)))
    torch.testing.assert_close(got, want)
    assert (got - before).abs().max() > 1e-3
    torch.testing.assert_close(block(x), before)


# ----------------------------------------------------------------- stacking
@pytest.mark.parametrize("backbone", ["vit", "swin"])
@pytest.mark.parametrize("methods", [["lora", "prompt"], ["adapter", "prefix"]])
def test_stacked_methods_train_save_and_load_together(backbone, methods, tmp_path):
    stack = [{"name": "lora", "rank": 2} if m == "lora" else {"name": m} for m in methods]
    model = adaptkit.build(spec(backbone, stack))
    applied = model.adaptkit.methods
    assert [m.name for m in applied] == methods
    assert trainable(model) - HEAD == sum(m.expected_parameters for m in applied)
    state = adaptkit.trainable_state(model)
    for name in methods:
        assert any(f".{name}" in key or f"{name}_" in key for key in state), (name, list(state)[:8])
    randomise(model, std=0.1)
    expected = logits(model)
    path = adaptkit.save_adapter(model, tmp_path / "stack.safetensors")
    fresh = adaptkit.build(spec(backbone, stack))
    assert not torch.equal(logits(fresh), expected)
    adaptkit.load_adapter(fresh, path)
    assert torch.equal(logits(fresh), expected)


def test_lora_under_prompt_projects_prompts_through_the_adapted_qkv():
    model = adaptkit.build(spec("swin", [{"name": "lora", "rank": 2}, {"name": "prompt", "count": 2}]))
    randomise(model, ["lora_b"], std=0.5)
    site = model.surface.towers["vision"].attention[0]
    k_with, _ = site.extra_kv(1)
    model.adaptkit.methods[0].set_enabled(False)
    k_without, _ = site.extra_kv(1)
    assert (k_with - k_without).abs().max() > 1e-4


# ----------------------------------------------------------------- validation
NO_ATTENTION = {"vision": TowerInfo(sites=frozenset({"layers"}), roles=frozenset({"conv", "head"}))}


def test_impossible_combinations_name_method_backbone_and_site():
    assert check_prefix(PrefixParams(), "resnet", NO_ATTENTION) == ["method 'prefix' needs attention sites, but backbone 'resnet' has none"]
    assert check_adapter(AdapterParams(), "resnet", NO_ATTENTION) == ["method 'adapter' needs blocks sites, but backbone 'resnet' has none"]
    assert check_prompt(PromptParams(), "resnet", NO_ATTENTION) == [
        "method 'prompt' needs tokens or attention sites, but backbone 'resnet' has none"
    ]
    assert check_prompt(PromptParams(route="tokens"), "swin", {"vision": TowerInfo(sites=frozenset({"attention"}))}) == [
        "method 'prompt' needs tokens sites, but backbone 'swin' has none"
    ]
    assert check_prefix(PrefixParams(tower="text"), "vit", NO_ATTENTION) == [
        "method 'prefix': backbone 'vit' has no tower 'text'; towers: vision"
    ]
