"""The Swin backbone: its surface, and window attention with extra keys/values."""

from __future__ import annotations

import pytest
import torch

import adaptkit
from adaptkit.compat import check_spec
from adaptkit.errors import SpecError


def swin_spec(methods=(), **backbone):
    return {
        "backbone": {"name": "swin", "model": "swin_tiny_digits", **backbone},
        "methods": list(methods),
        "task": {"name": "classification"},
        "data": {"name": "digits"},
    }


def images(n=3, size=8, chans=1):
    return torch.randn(n, chans, size, size, generator=torch.Generator().manual_seed(0))


def test_surface_roles_blocks_and_attention_sites():
    model = adaptkit.build(swin_spec())
    tower = model.surface.towers["vision"]
    assert tower.roles() == {"attn.q", "attn.k", "attn.v", "attn.out", "mlp.in", "mlp.out", "merge", "embed", "head"}
    assert tower.tokens is None  # windows: no place for extra tokens
    net = model.backbone.net
    depths = [len(stage.blocks) for stage in net.layers]
    assert len(tower.blocks) == len(tower.attention) == sum(depths) == 4
    assert [s.dim for s in tower.attention] == [32, 32, 64, 64]
    merge = [s for s in tower.layers if s.role == "merge"]
    assert [s.name for s in merge] == ["backbone.net.layers.1.downsample.reduction"]
    q = [s for s in tower.layers if s.role == "attn.q"][2]
    assert q.rows == (0, 64) and q.module is net.layers[1].blocks[0].attn.qkv
    assert isinstance(next(s for s in tower.layers if s.role == "embed").module, torch.nn.Conv2d)
    # the tiny preset really has shifted windows, so mask padding is exercised
    assert any(any(b.shift_size) for stage in net.layers for b in stage.blocks)


def test_presets_build_with_their_input_sizes():
    for preset, size, chans in (("swin_tiny_digits", 8, 1), ("swin_tiny_32", 32, 3)):
        model = adaptkit.build(swin_spec(model=preset))
        assert model.backbone.in_chans == chans
        assert model.logits(images(2, size, chans)).shape == (2, 10)


def reference_window_attention(attn, x, mask, pk, pv):
    """Plain per-window attention over [prefix; window] keys with bias [0; rel-pos + mask]."""
    B_, N, C = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(B_, N, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    bias = attn._get_rel_pos_bias()[0]  # heads, N, N
    outs = []
    for i in range(B_):
        window_bias = bias + (mask[i % mask.shape[0]] if mask is not None else 0)
        full_bias = torch.cat([torch.zeros(heads, N, pk.shape[2]), window_bias], dim=-1)
        keys = torch.cat([pk[i], k[i]], dim=1)
        values = torch.cat([pv[i], v[i]], dim=1)
        scores = (q[i] @ keys.transpose(-1, -2)) * attn.scale + full_bias
        outs.append(scores.softmax(-1) @ values)
    out = torch.stack(outs).transpose(1, 2).reshape(B_, N, -1)
    return attn.proj(out)


@pytest.mark.parametrize("fused", [True, False])
def test_prefix_joins_every_window_with_padded_bias_and_mask(fused):
    model = adaptkit.build(swin_spec([{"name": "prefix", "length": 3, "init_std": 1.0}]))
    block = model.backbone.net.layers[0].blocks[1]  # the shifted block: has a mask
    assert block.attn_mask is not None
    attn = block.attn
    attn.fused_attn = fused
    site = next(s for s in model.surface.towers["vision"].attention if s.module is attn)
    num_windows = block.attn_mask.shape[0]
    x = torch.randn(2 * num_windows, attn.window_area, 32, generator=torch.Generator().manual_seed(1))
    pk, pv = site.extra_kv(x.shape[0])
    with torch.no_grad():
        got = attn(x, mask=block.attn_mask)
        want = reference_window_attention(attn, x, block.attn_mask, pk, pv)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_zero_length_prefix_reproduces_the_base_model(fused):
    base = adaptkit.build(swin_spec())
    model = adaptkit.build(swin_spec([{"name": "prefix", "length": 0}]))
    for net in (base.backbone.net, model.backbone.net):
        for stage in net.layers:
            for block in stage.blocks:
                block.attn.fused_attn = fused
    base.eval(), model.eval()
    assert model.backbone.net.layers[0].blocks[0].attn.forward.__name__ == "forward"  # the installed one
    with torch.no_grad():
        torch.testing.assert_close(model.logits(images()), base.logits(images()), rtol=0, atol=1e-6)


def test_vpt_shallow_on_swin_fails_validation_clearly():
    spec = adaptkit.load_spec(swin_spec([{"name": "prompt", "deep": False}]))
    problems = check_spec(spec, adaptkit.registry())
    assert problems == [
        "methods[0]: method 'prompt' needs tokens sites, but backbone 'swin' has none "
        "(VPT-shallow needs a token site; deep: true goes through the attention sites instead)"
    ]
    with pytest.raises(SpecError, match="route 'attention' is deep by construction"):
        adaptkit.load_spec(swin_spec([{"name": "prompt", "deep": False, "route": "attention"}]))


def test_lora_on_merge_and_embed_roles_merges_exactly():
    model = adaptkit.build(swin_spec([{"name": "lora", "rank": 2, "targets": ["merge", "embed", "attn.k"]}]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.05)
    model.eval()
    reduction = model.backbone.net.layers[1].downsample.reduction
    assert tuple(reduction.lora.lora_a.shape) == (2, 128)  # 4 x 32 merged channels in
    with torch.no_grad():
        before = model.logits(images())
        model.adaptkit.methods[0].merge()
        torch.testing.assert_close(model.logits(images()), before, rtol=1e-5, atol=1e-5)
