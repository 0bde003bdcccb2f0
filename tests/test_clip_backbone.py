"""The clip backbone: equivalence with open_clip, its sites, CoOp context, weights in and out."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch

import adaptkit
from adaptkit.builder import build
from adaptkit.errors import CheckpointError, CompatibilityError, PluginError, SpecError
from tests.clip_helpers import FixedPrompts, tiny_clip

TEXTS = [
    "a photo of the digit seven.",
    "7",
    "a very long caption that certainly does not fit into sixteen tokens of context at all",
]


def _images(n: int = 5) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_swapped_attention_equals_open_clip():
    native, backbone = tiny_clip()
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in backbone.modules())
    ids = backbone.tokenize(TEXTS)
    with torch.no_grad():
        assert torch.allclose(backbone.encode_image(_images()), native.encode_image(_images()), atol=1e-6)
        assert torch.allclose(backbone.encode_text(ids), native.encode_text(ids), atol=1e-6)
        assert torch.allclose(backbone.encode_text(TEXTS), native.encode_text(ids), atol=1e-6)


def test_image_normalisation_uses_the_models_mean_and_std():
    mean, std = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
    native, backbone = tiny_clip(mean=mean, std=std)
    x = _images()
    pixels = (x + 1) / 2
    expected = native.encode_image((pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    with torch.no_grad():
        assert torch.allclose(backbone.encode_image(x), expected, atol=1e-5)


def test_native_state_dict_loads_into_plain_open_clip():
    native, backbone = tiny_clip()
    exported = backbone.native_state_dict(backbone.state_dict())
    assert set(exported) == set(native.state_dict())
    fresh = copy.deepcopy(native)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(exported, strict=True)
    ids = backbone.tokenize(TEXTS)
    with torch.no_grad():
        assert torch.equal(fresh.encode_text(ids), native.encode_text(ids))


def test_coop_context_equal_to_template_words_reproduces_encode_text():
    """CoOp's calibration check: context vectors = the template's word embeddings."""
    _, backbone = tiny_clip()
    template = "a photo of the digit"
    with torch.no_grad():
        expected = backbone.encode_text([f"{template} seven.", f"{template} 3", f"{template} {TEXTS[2]}"])
        context = backbone.text_tokens.embed_words(template)
        assert context.shape == (5, 64)
        backbone.text_tokens.attach(FixedPrompts(context))
        learned = backbone.encode_text(["seven.", "3", TEXTS[2]])  # the third overflows: its end token is moved
    assert torch.allclose(learned, expected, atol=1e-6)
    # other context changes the features: the context really enters the tower
    backbone.text_tokens._sources[0].t = torch.randn_like(context)
    with torch.no_grad():
        assert not torch.allclose(backbone.encode_text(["seven."]), expected[:1], atol=1e-3)


def test_deep_text_context_is_replaced_before_every_block():
    _, backbone = tiny_clip()
    fresh = torch.randn(2, 3, 64)  # layers x count x dim
    backbone.text_tokens.attach(FixedPrompts(fresh, deep=True))
    seen = {}
    block = backbone.net.transformer.resblocks[1]
    handle = block.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].clone()), prepend=False)
    with torch.no_grad():
        backbone.encode_text(["seven"])
    handle.remove()
    assert seen["x"].shape == (1, 16, 64)
    assert torch.equal(seen["x"][0, 1:4], fresh[1])


def test_vision_prompts_join_after_the_class_token_and_leave_before_pooling():
    _, backbone = tiny_clip()
    x = _images(2)
    with torch.no_grad():
        plain = backbone.encode_image(x)
    lengths = []
    block = backbone.net.visual.transformer.resblocks[0]
    handle = block.register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
    backbone.vision_tokens.attach(FixedPrompts(torch.randn(4, 64)))
    with torch.no_grad():
        prompted = backbone.encode_image(x)
    handle.remove()
    assert lengths == [1 + 16 + 4]
    assert prompted.shape == plain.shape and not torch.allclose(prompted, plain)


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_attention_site_extra_kv_equals_attending_to_prefix_tokens(tower):
    """Prefix keys/values = what attention over [prefix tokens; sequence] gives for the sequence."""
    native, backbone = tiny_clip()
    index = 1
    site = backbone.surface.towers[tower].attention[index]
    block = (backbone.net.visual if tower == "vision" else backbone.net).transformer.resblocks[index]
    native_attn = (native.visual if tower == "vision" else native).transformer.resblocks[index].attn
    prefix = torch.randn(3, 64)
    k, v = site.project_kv(prefix)
    assert k.shape == (2, 3, 32)
    site.add_kv(lambda batch: (k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)))
    seq = torch.randn(2, 16 if tower == "text" else 17, 64)
    h = block.ln_1(seq)
    mask = backbone.net.attn_mask if tower == "text" else None
    with torch.no_grad():
        out = block.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        joined = torch.cat([block.ln_1(prefix).expand(2, -1, -1), h], dim=1)
        full_mask = None if mask is None else torch.cat([torch.zeros(16, 3), mask], dim=1)
        expected = native_attn(h, joined, joined, need_weights=False, attn_mask=full_mask)[0]
    assert torch.allclose(out, expected, atol=1e-5)


def test_surface_has_two_towers_with_every_site():
    _, backbone = tiny_clip()
    surface = backbone.surface
    assert set(surface.towers) == {"vision", "text"}
    vision, text = surface.towers["vision"], surface.towers["text"]
    assert vision.roles() == {"embed", "attn.q", "attn.k", "attn.v", "attn.out", "mlp.in", "mlp.out"}
    assert text.roles() == {"attn.q", "attn.k", "attn.v", "attn.out", "mlp.in", "mlp.out"}
    for tower in (vision, text):
        assert len(tower.blocks) == 2 and len(tower.attention) == 2 and tower.tokens is not None
        q, k, v = (s for s in tower.layers if s.role in ("attn.q", "attn.k", "attn.v") and ".0." in s.name)
        assert (q.rows, k.rows, v.rows) == ((0, 64), (64, 128), (128, 192)) and q.module is k.module
    assert text.text is backbone.text_site and vision.text is None
    assert "net.logit_scale" in text.param_prefixes


def test_block_sites_output_the_attention_and_mlp_sublayers():
    """Zeroing a block site's outputs (what an adapter hooks) leaves exactly the residual stream."""
    _, backbone = tiny_clip()
    site = backbone.surface.towers["vision"].blocks[0]
    block = backbone.net.visual.transformer.resblocks[0]
    handles = [m.register_forward_hook(lambda mod, args, out: out * 0) for m in (site.attn_output, site.mlp_output)]
    x = torch.randn(2, 17, 64)
    with torch.no_grad():
        assert torch.equal(block(x), x)
    for h in handles:
        h.remove()


def test_block_sites_name_the_mlp_input_and_the_norms_for_parallel_adapters():
    _, backbone = tiny_clip()
    for tower in ("vision", "text"):
        site = backbone.surface.towers[tower].blocks[1]
        block = backbone.get_submodule(site.name)
        assert site.mlp_input is block.mlp and site.norms == [block.ln_1, block.ln_2]
    spec = {
        "backbone": {"name": "clip"},
        "methods": [{"name": "adapter", "placement": "parallel", "train_norms": True, "bottleneck": 4, "tower": "vision"}],
        "task": {"name": "zero_shot"},
        "data": {"name": "digits", "classes": [0, 1]},
    }
    model = adaptkit.build(spec)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == model.adaptkit.methods[0].expected_parameters
    assert {n.rsplit(".", 2)[-2] for n in trained if ".ln_" in n} == {"ln_1", "ln_2"}
    assert all(".visual." in n for n in trained)


def test_lora_on_in_proj_slices_merges_and_exports_to_open_clip():
    spec = {
        "backbone": {"name": "clip"},
        "methods": [{"name": "lora", "rank": 2, "targets": ["attn.q", "attn.v"], "tower": "text"}],
        "task": {"name": "zero_shot"},
        "data": {"name": "digits", "classes": [0, 1]},
    }
    model = build(spec)
    lora = model.adaptkit.methods[0]
    deltas = list(lora.deltas.values())
    assert len(deltas) == 2 and all(d.ranges == [(0, 64), (128, 192)] for d in deltas)
    with torch.no_grad():
        for d in deltas:
            d.lora_b.normal_()
    backbone = model.backbone
    ids = backbone.tokenize(TEXTS)
    with torch.no_grad():
        adapted = backbone.encode_text(ids)
        lora.set_enabled(False)
        base = backbone.encode_text(ids)
        lora.set_enabled(True)
        assert not torch.allclose(adapted, base, atol=1e-4)
        lora.merge()
        assert torch.allclose(backbone.encode_text(ids), adapted, atol=1e-5)
    state = {k: v for k, v in backbone.state_dict().items() if ".lora" not in k}
    plain = open_clip.create_model("clip_tiny_digits")
    plain.load_state_dict(backbone.native_state_dict(state), strict=True)
    with torch.no_grad():
        assert torch.allclose(plain.encode_text(ids), adapted, atol=1e-5)


def _clip_spec(**backbone):
    return {"backbone": {"name": "clip", **backbone}, "task": {"name": "zero_shot"}, "data": {"name": "digits", "classes": [0, 1]}}


def test_pretrained_accepts_open_clip_names_and_adaptkit_runs(tmp_path):
    from safetensors.torch import save_file

    native, backbone = tiny_clip(seed=3)
    native_file = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in native.state_dict().items()}, str(native_file))
    own_file = tmp_path / "run.safetensors"
    save_file({f"backbone.{k}": v.contiguous() for k, v in backbone.state_dict().items()}, str(own_file))
    ids = backbone.tokenize(TEXTS)
    for source in (native_file, tmp_path, own_file):  # a directory finds open_clip_model.safetensors
        model = build(_clip_spec(pretrained=str(source)))
        with torch.no_grad():
            assert torch.allclose(model.backbone.encode_text(ids), native.encode_text(ids), atol=1e-6), source


def test_pretrained_errors_are_clear(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(CheckpointError, match="not found"):
        build(_clip_spec(pretrained=str(tmp_path / "missing.safetensors")))
    other = build(_clip_spec(model="clip_tiny_32")).backbone
    wrong = tmp_path / "wrong.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(wrong))
    with pytest.raises(CheckpointError, match="lacks|shape"):
        build(_clip_spec(pretrained=str(wrong)))
    with pytest.raises(SpecError, match="pretrained"):
        adaptkit.load_spec(_clip_spec(pretrained=True))
    with pytest.raises(CheckpointError, match="neither a local file nor an open_clip weights tag of 'clip_tiny_digits'"):
        build(_clip_spec(pretrained="openai"))


def test_unknown_model_suggests_a_preset():
    with pytest.raises(PluginError, match="did you mean 'clip_tiny_digits'"):
        build(_clip_spec(model="clip_tiny_digit"))


def test_tiny_32_preset_builds_at_its_size():
    backbone = build(_clip_spec(model="clip_tiny_32")).backbone
    assert backbone.image_size == (32, 32) and backbone.context_length == 32 and backbone.feature_dim == 64
    with torch.no_grad():
        assert backbone.encode_image(torch.zeros(1, 3, 32, 32)).shape == (1, 64)


def test_text_methods_on_an_image_only_backbone_fail_at_validation():
    from adaptkit.compat import check_spec

    spec = adaptkit.load_spec({
        "backbone": {"name": "vit"}, "methods": [{"name": "system_prompt", "templates": ["a {label}"]}],
        "task": {"name": "zero_shot"}, "data": {"name": "digits"},
    })
    problems = check_spec(spec, adaptkit.registry())
    assert any("system_prompt" in p and "text sites" in p and "vit" in p for p in problems)
    assert any("zero_shot" in p and "text_features" in p for p in problems)
    with pytest.raises(CompatibilityError):
        build(spec)


def test_a_real_open_clip_architecture_builds_by_name_and_matches_open_clip():
    """ViT-S-32 (63M parameters, random weights: nothing is downloaded) at 64x64 input."""
    backbone = build({**_clip_spec(model="ViT-S-32", image_size=64)}).backbone
    assert backbone.context_length == 77 and backbone.image_size == (64, 64) and not backbone.identity_normalisation
    plain = open_clip.create_model("ViT-S-32", force_image_size=64)
    plain.load_state_dict(backbone.native_state_dict(backbone.state_dict()), strict=True)
    plain.eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    ids = open_clip.get_tokenizer("ViT-S-32")(["a photo of a cat", "a diagram"])
    with torch.no_grad():
        assert torch.allclose(backbone.encode_image(x), plain.encode_image(((x + 1) / 2 - mean) / std), atol=1e-5)
        assert torch.allclose(backbone.encode_text(["a photo of a cat", "a diagram"]), plain.encode_text(ids), atol=1e-5)


def test_coop_through_the_prompt_method_reproduces_a_hand_template():
    """The prompt method on the text tower is CoOp: set its context to the template's words."""
    spec = {
        "backbone": {"name": "clip"},
        "methods": [{"name": "prompt", "tower": "text", "count": 5, "deep": False, "init": "normal"}],
        "task": {"name": "zero_shot", "class_names": ["zero", "one", "two"]},
        "data": {"name": "digits", "classes": [0, 1, 2]},
    }
    model = build(spec)
    (applied,) = model.adaptkit.methods
    (source,) = applied.added
    backbone = model.backbone
    with torch.no_grad():
        source.prompts.copy_(backbone.text_tokens.embed_words("a photo of the digit")[None])
        learned = model.class_features()
        backbone.text_tokens._sources.clear()  # the plain tower, fed the hand template
        expected = backbone.encode_text([f"a photo of the digit {n}" for n in ("zero", "one", "two")], normalize=True)
    assert torch.allclose(learned, expected, atol=1e-6)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt_text.prompts"]


def test_coop_init_text_starts_the_context_at_the_template_and_round_trips(tmp_path):
    """`init_text` is CoOp's initialisation: before training the learner equals the hand template."""
    spec = {
        "backbone": {"name": "clip"},
        "methods": [{"name": "prompt", "tower": "text", "deep": False, "init_text": "a photo of the digit"}],
        "task": {"name": "zero_shot", "class_names": ["zero", "one", "two"]},
        "data": {"name": "digits", "classes": [0, 1, 2]},
    }
    model = build(spec)
    (applied,) = model.adaptkit.methods
    (source,) = applied.added
    assert source.count == 5 and applied.summary.startswith("5 shallow prompts")
    backbone = model.backbone
    with torch.no_grad():
        learned = model.class_features()
        sources, backbone.text_tokens._sources = backbone.text_tokens._sources, []  # the plain tower
        expected = backbone.encode_text([f"a photo of the digit {n}" for n in ("zero", "one", "two")], normalize=True)
        backbone.text_tokens._sources = sources
        assert torch.allclose(learned, expected, atol=1e-6)
        source.prompts.add_(0.1 * torch.randn(source.prompts.shape, generator=torch.Generator().manual_seed(0)))  # 'trained'
    # the saved spec (count left out) rebuilds the same learner, and the trained context loads into it
    path = adaptkit.save_adapter(model, tmp_path / "adapter.safetensors")
    again = build(model.adaptkit.spec.to_dict())
    adaptkit.load_adapter(again, path)
    with torch.no_grad():
        assert torch.equal(again.class_features(), model.class_features())
        assert not torch.allclose(model.class_features(), expected, atol=1e-3)


@pytest.mark.parametrize(
    "method, message",
    [
        ({"tower": "text", "init_text": "a photo of a"}, "set deep: false"),
        ({"tower": "all", "deep": False, "init_text": "a photo of a"}, "init_text needs text towers, but tower 'vision' reads images; set tower: text"),
        ({"tower": "text", "deep": False, "count": 3, "init_text": "a photo of the digit"}, "is 5 tokens in tower 'text', but count is 3"),
    ],
)
def test_coop_init_text_mistakes_are_named(method, message):
    spec = {"backbone": {"name": "clip"}, "methods": [{"name": "prompt", **method}],
            "task": {"name": "zero_shot", "class_names": ["zero", "one"]}, "data": {"name": "digits", "classes": [0, 1]}}
    with pytest.raises((SpecError, CompatibilityError), match=message.replace("(", r"\(").replace(")", r"\)")):
        build(spec)


def test_gated_prefix_starts_at_the_base_model_on_both_towers():
    spec = {"backbone": {"name": "clip"}, "methods": [{"name": "prefix", "gate": True, "tower": "all"}],
            "task": {"name": "zero_shot"}, "data": {"name": "digits", "classes": [0, 1, 2]}}
    model, base = build(spec, keep_data=True).eval(), build({**spec, "methods": []}).eval()
    batch = model.adaptkit.data.train.batch(range(8))
    with torch.no_grad():
        assert torch.equal(model(batch).loss, base(batch).loss)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    model(batch).loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        assert not torch.equal(model(batch).loss, base(batch).loss)
