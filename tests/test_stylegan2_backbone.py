"""The pure-PyTorch StyleGAN2 generator: ops, layout, loading, surface and methods on it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import adaptkit
from adaptkit.checkpoint import load_tensors, save_tensors
from adaptkit.errors import CheckpointError, CompatibilityError, PluginError, SpecError
from adaptkit_plugins.stylegan.generator import latent_avg_file, load_generator, read_generator_file, read_latent_avg, save_generator
from adaptkit_plugins.stylegan.networks import (
    Generator,
    ModulatedConv2d,
    default_channels,
    make_kernel,
    upfirdn2d,
)

TINY = {"size": 8, "style_dim": 16, "n_mlp": 2, "channels": {4: 8, 8: 8}, "img_channels": 1}


def tiny_generator(seed: int = 0, **overrides) -> Generator:
    torch.manual_seed(seed)
    return Generator(**{**TINY, **overrides})


def spec(tmp_path, methods=(), **backbone) -> dict:
    return {
        "name": "sg",
        "backbone": {"name": "stylegan2", "model": "stylegan2_tiny_8", **backbone},
        "methods": list(methods),
        "task": {"name": "stylegan2"},
        "data": {"name": "digits"},
        "train": {"max_steps": 2, "batch_size": 8, "progress": False},
        "output": {"dir": str(tmp_path / "run")},
    }


# --------------------------------------------------------------------- ops
def naive_upfirdn2d(x: np.ndarray, k: np.ndarray, up: int, down: int, pad: tuple[int, int]) -> np.ndarray:
    """Direct loops: zero insertion, padding, true convolution, decimation."""
    n, c, h, w = x.shape
    upsampled = np.zeros((n, c, h * up, w * up))
    upsampled[:, :, ::up, ::up] = x
    p0, p1 = pad
    padded = np.pad(upsampled, ((0, 0), (0, 0), (p0, p1), (p0, p1)))
    kh, kw = k.shape
    out_h, out_w = padded.shape[2] - kh + 1, padded.shape[3] - kw + 1
    out = np.zeros((n, c, out_h, out_w))
    flipped = k[::-1, ::-1]
    for i in range(out_h):
        for j in range(out_w):
            out[:, :, i, j] = (padded[:, :, i : i + kh, j : j + kw] * flipped).sum((2, 3))
    return out[:, :, ::down, ::down]


@pytest.mark.parametrize("up,down,pad", [(1, 1, (1, 1)), (2, 1, (2, 1)), (1, 2, (1, 1)), (2, 2, (1, 2))])
def test_upfirdn2d_matches_direct_loops(up, down, pad):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 5, 5))
    k = rng.normal(size=(4, 4))  # asymmetric, so a missing flip would show
    ours = upfirdn2d(torch.tensor(x, dtype=torch.float64), torch.tensor(k, dtype=torch.float64), up, down, pad).numpy()
    np.testing.assert_allclose(ours, naive_upfirdn2d(x, k, up, down, pad), atol=1e-10)


def test_upsample_of_a_constant_is_constant_inside():
    from adaptkit_plugins.stylegan.networks import Upsample

    out = Upsample([1, 3, 3, 1])(torch.ones(1, 1, 6, 6))
    assert out.shape == (1, 1, 12, 12)
    torch.testing.assert_close(out[..., 2:-2, 2:-2], torch.ones(1, 1, 8, 8))
    assert make_kernel([1, 3, 3, 1]).sum().item() == pytest.approx(1.0)


def reference_modulated_conv(conv: ModulatedConv2d, x: torch.Tensor, styles: torch.Tensor) -> torch.Tensor:
    """One sample at a time, straight from the paper: w' = s*w, w'' = w' / |w'|, conv."""
    outs = []
    k = conv.weight.shape[-1]
    for b in range(x.shape[0]):
        w = conv.scale * conv.weight * styles[b][None, :, None, None]
        if conv.demodulate:
            w = w / torch.sqrt((w**2).sum((1, 2, 3), keepdim=True) + 1e-8)
        if conv.upsample:
            out = F.conv_transpose2d(x[b : b + 1], w.transpose(0, 1), stride=2)
            out = upfirdn2d(out, conv.blur.kernel, pad=conv.blur.pad)
        else:
            out = F.conv2d(x[b : b + 1], w, padding=k // 2)
        outs.append(out)
    return torch.cat(outs)


@pytest.mark.parametrize("upsample,demodulate,k", [(False, True, 3), (True, True, 3), (False, False, 1)])
def test_modulated_conv_matches_per_sample_reference(upsample, demodulate, k):
    torch.manual_seed(0)
    conv = ModulatedConv2d(4, 5, k, 6, demodulate=demodulate, upsample=upsample).double()
    x = torch.randn(3, 4, 4, 4, dtype=torch.float64)
    styles = torch.randn(3, 4, dtype=torch.float64) + 1
    ours = conv.modulated_by_styles(x, styles)
    assert ours.shape == (3, 5, 8 if upsample else 4, 8 if upsample else 4)
    torch.testing.assert_close(ours, reference_modulated_conv(conv, x, styles))


def test_demodulation_normalises_output_scale():
    torch.manual_seed(0)
    conv = ModulatedConv2d(64, 64, 3, 8)
    x = torch.randn(4, 64, 16, 16)
    small = conv.modulated_by_styles(x, torch.full((4, 64), 0.1))
    large = conv.modulated_by_styles(x, torch.full((4, 64), 10.0))
    torch.testing.assert_close(small, large, rtol=1e-4, atol=1e-5)  # uniform styles cancel out


# --------------------------------------------------------------------- generator
def test_generator_shapes_w_and_w_plus_agree():
    g = tiny_generator(size=16, channels={4: 8, 8: 8, 16: 4})
    assert g.n_latent == 6 and g.num_layers == 5
    z = torch.randn(3, 16)
    w = g.mapping(z)
    a = g.synthesis(w, noise="const")
    b = g.synthesis(w[:, None].repeat(1, g.n_latent, 1), noise="const")
    assert a.shape == (3, 1, 16, 16)
    torch.testing.assert_close(a, b)
    image, latent = g([z], return_latents=True, randomize_noise=False)
    torch.testing.assert_close(image, a)
    assert latent.shape == (3, 6, 16)
    with pytest.raises(ValueError, match="expected w of shape"):
        g.synthesis(torch.randn(3, 5, 16))


def test_noise_and_truncation():
    g = tiny_generator()
    with torch.no_grad():
        g.conv1.noise.weight.fill_(1.0)  # make the noise input matter
    w = g.mapping(torch.randn(2, 16))
    torch.testing.assert_close(g.synthesis(w, noise="const"), g.synthesis(w, noise="const"))
    assert not torch.allclose(g.synthesis(w, noise="random"), g.synthesis(w, noise="random"))
    mean = g.mean_latent(256)
    torch.testing.assert_close(mean, g.mean_latent(256))  # seeded
    image_mean, _ = g([mean], input_is_latent=True, randomize_noise=False)
    truncated, _ = g([w], input_is_latent=True, truncation=0.0, truncation_latent=mean, randomize_noise=False)
    torch.testing.assert_close(truncated, image_mean.expand_as(truncated))


def test_style_mixing_uses_both_latents():
    g = tiny_generator()
    z1, z2 = torch.randn(1, 16), torch.randn(1, 16)
    _, mixed = g([z1, z2], inject_index=1, return_latents=True, randomize_noise=False)
    torch.testing.assert_close(mixed[:, 0], g.mapping(z1))
    torch.testing.assert_close(mixed[:, 1:], g.mapping(z2)[:, None].expand(-1, 3, -1))


def test_state_dict_has_rosinality_layout():
    g = Generator(size=16, style_dim=32, n_mlp=8, channels={4: 16, 8: 16, 16: 8}, img_channels=3)
    shapes = {k: tuple(v.shape) for k, v in g.state_dict().items()}
    expected = {
        "style.1.weight": (32, 32), "style.8.bias": (32,), "input.input": (1, 16, 4, 4),
        "conv1.conv.weight": (1, 16, 16, 3, 3), "conv1.conv.modulation.weight": (16, 32), "conv1.noise.weight": (1,),
        "conv1.activate.bias": (16,), "to_rgb1.conv.weight": (1, 3, 16, 1, 1), "to_rgb1.bias": (1, 3, 1, 1),
        "convs.0.conv.weight": (1, 16, 16, 3, 3), "convs.0.conv.blur.kernel": (4, 4), "convs.1.conv.weight": (1, 16, 16, 3, 3),
        "convs.2.conv.weight": (1, 8, 16, 3, 3), "to_rgbs.0.upsample.kernel": (4, 4), "to_rgbs.1.conv.weight": (1, 3, 8, 1, 1),
        "noises.noise_0": (1, 1, 4, 4), "noises.noise_1": (1, 1, 8, 8), "noises.noise_4": (1, 1, 16, 16),
    }
    for key, shape in expected.items():
        assert shapes[key] == shape, key
    assert "style.0.weight" not in shapes and "to_rgb1.upsample.kernel" not in shapes
    assert len([k for k in shapes if k.startswith("noises.")]) == g.num_layers == 5
    # the default channel table is rosinality's
    assert default_channels(2)[256] == 128 and default_channels(1)[64] == 256


# --------------------------------------------------------------------- loading
def rosinality_checkpoint(g: Generator, d_state: dict | None = None) -> dict:
    """What stylegan2-pytorch's train.py saves (minus optimizer state): g, d, g_ema, latent_avg."""
    state = {k: v.clone() for k, v in g.state_dict().items()}
    return {"g": {k: v + 1 for k, v in state.items()}, "d": d_state or {"convs.0.0.weight": torch.randn(2, 2, 1, 1)},
            "g_ema": state, "latent_avg": torch.randn(g.style_dim)}


def test_loader_round_trip_rosinality_pt_and_safetensors(tmp_path):
    source = tiny_generator(seed=1)
    torch.save(rosinality_checkpoint(source), tmp_path / "550000.pt")
    for key, shift in (("g_ema", 0.0), ("g", 1.0)):
        target = tiny_generator(seed=2)
        load_generator(target, tmp_path / "550000.pt", key=key)
        for name, tensor in source.state_dict().items():
            torch.testing.assert_close(target.state_dict()[name], tensor + shift, msg=name)
    z = torch.randn(2, 16)
    target = tiny_generator(seed=3)
    load_generator(target, tmp_path / "550000.pt")
    torch.testing.assert_close(target([z], randomize_noise=False)[0], source([z], randomize_noise=False)[0])

    save_generator(source, tmp_path / "g.safetensors", latent_avg=source.mean_latent(64))
    save_generator(source, tmp_path / "g.pt")
    for name in ("g.safetensors", "g.pt"):
        again = tiny_generator(seed=4)
        load_generator(again, tmp_path / name)
        torch.testing.assert_close(again([z], randomize_noise=False)[0], source([z], randomize_noise=False)[0])
    raw = torch.load(tmp_path / "g.pt", weights_only=True)
    assert set(raw) == {"g_ema"} and raw["g_ema"]["conv1.conv.weight"].ndim == 5
    # safetensors: the generator's tensors only (a strict load_state_dict takes them), latent_avg beside them
    strict = tiny_generator(seed=5)
    strict.load_state_dict(load_tensors(tmp_path / "g.safetensors")[0], strict=True)
    torch.testing.assert_close(read_latent_avg(tmp_path / "g.safetensors"), source.mean_latent(64).reshape(-1))
    assert read_latent_avg(tmp_path / "g.pt") is None and latent_avg_file(tmp_path / "g.safetensors").name == "g.latent_avg.safetensors"


def test_a_generator_file_that_holds_latent_avg_still_loads(tmp_path):
    # runs written before latent_avg moved beside generator.safetensors kept it inside
    source = tiny_generator(seed=1)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    average = source.mean_latent(64)
    save_tensors(tmp_path / "generator.safetensors", {**state, "latent_avg": average})
    target = tiny_generator(seed=2)
    load_generator(target, tmp_path / "generator.safetensors")
    for name, tensor in state.items():
        torch.testing.assert_close(target.state_dict()[name], tensor, msg=name)
    torch.testing.assert_close(read_latent_avg(tmp_path / "generator.safetensors"), average)
    torch.save(rosinality_checkpoint(source), tmp_path / "550000.pt")
    torch.testing.assert_close(read_latent_avg(tmp_path / "550000.pt"), torch.load(tmp_path / "550000.pt")["latent_avg"])


def test_backbone_loads_a_file_through_the_spec(tmp_path):
    torch.manual_seed(5)
    reference = adaptkit.build(spec(tmp_path))
    save_generator(reference.backbone.generator, tmp_path / "g.pt")
    model = adaptkit.build(spec(tmp_path, pretrained=str(tmp_path / "g.pt")))
    z = torch.randn(2, 64)
    torch.testing.assert_close(model.backbone.generate(z), reference.backbone.generate(z))


def test_loader_errors_name_the_problem(tmp_path):
    g = tiny_generator()
    with pytest.raises(CheckpointError, match="file not found"):
        load_generator(g, tmp_path / "missing.pt")
    torch.save({"d": {"x": torch.ones(1)}, "g": g.state_dict()}, tmp_path / "no_ema.pt")
    with pytest.raises(CheckpointError, match="no 'g_ema' generator; it holds d, g"):
        load_generator(g, tmp_path / "no_ema.pt")
    bigger = Generator(size=16, style_dim=16, n_mlp=2, channels={4: 8, 8: 8, 16: 8}, img_channels=1)
    torch.save({"g_ema": bigger.state_dict()}, tmp_path / "big.pt")
    with pytest.raises(CheckpointError, match="size 16"):
        load_generator(g, tmp_path / "big.pt", config={"size": 8})
    wider = Generator(**{**TINY, "style_dim": 32})
    torch.save(wider.state_dict(), tmp_path / "wide.pt")
    with pytest.raises(CheckpointError, match="style_dim 32"):
        load_generator(g, tmp_path / "wide.pt")
    partial = {k: v for k, v in g.state_dict().items() if not k.startswith("style.2")}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="lacks 2 of the generator's tensors"):
        load_generator(g, tmp_path / "partial.pt")
    torch.save({"g_ema": g.state_dict(), "args": object()}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match="not a weights-only torch file"):
        load_generator(g, tmp_path / "pickled.pt")
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError):
        load_generator(g, tmp_path / "garbage.safetensors")


def test_buffers_may_be_missing_from_adaptkit_files(tmp_path):
    g = tiny_generator(seed=1)
    params_only = {f"backbone.generator.{n}": p.detach() for n, p in g.named_parameters()}
    from adaptkit.checkpoint import save_tensors

    save_tensors(tmp_path / "adapter.safetensors", {**params_only, "discriminator.w": torch.ones(1)})
    state = read_generator_file(tmp_path / "adapter.safetensors")
    assert "discriminator.w" not in state and "style.1.weight" in state
    target = tiny_generator(seed=2)
    load_generator(target, tmp_path / "adapter.safetensors")
    torch.testing.assert_close(target.style[1].weight, g.style[1].weight)


def test_spec_errors(tmp_path):
    with pytest.raises(SpecError, match="power of two"):
        adaptkit.load_spec(spec(tmp_path, size=12))
    with pytest.raises(SpecError, match="local file"):
        adaptkit.load_spec(spec(tmp_path, pretrained=True))
    with pytest.raises(PluginError, match="not a stylegan2 preset.*did you mean 'stylegan2_tiny_8'"):
        adaptkit.build(spec(tmp_path, model="stylegan2_tiny_9"))
    with pytest.raises(PluginError, match="channel count for resolutions \\[8\\]"):
        adaptkit.build(spec(tmp_path, channels={4: 8}))


# --------------------------------------------------------------------- surface and methods
def images(model, seed: int = 0) -> torch.Tensor:
    bb = model.backbone
    return bb.generate(bb.z_from_seeds([seed, seed + 1]))


def test_surface_roles_and_blocks(tmp_path):
    model = adaptkit.build(spec(tmp_path))
    surface = model.surface
    mapping, synthesis = surface.towers["mapping"], surface.towers["synthesis"]
    assert [s.role for s in mapping.layers] == ["mlp.in", "mlp.out", "mlp.in", "mlp.out"]
    assert len(mapping.blocks) == 2
    roles = [s.role for s in synthesis.layers]
    assert roles.count("conv") == 3 and roles.count("to_rgb") == 2 and roles.count("modulation") == 5
    assert all(b.channel_dim == 1 for b in synthesis.blocks) and len(synthesis.blocks) == 3
    for site in mapping.layers + synthesis.layers:
        assert model.get_submodule(site.name) is site.module


@pytest.mark.parametrize("targets", [["conv"], ["modulation"], ["to_rgb"], ["mlp.in", "mlp.out"]])
def test_lora_merged_equals_unmerged(tmp_path, targets):
    model = adaptkit.build(spec(tmp_path, methods=[{"name": "lora", "rank": 2, "targets": targets}]))
    lora = model.adaptkit.methods[0]
    base = images(model)
    with torch.no_grad():
        for delta in lora.deltas.values():
            delta.lora_b.normal_(0, 0.3)
    adapted = images(model)
    assert (adapted - base).abs().max() > 1e-3  # the update changes the images
    lora.merge()
    torch.testing.assert_close(images(model), adapted, rtol=1e-4, atol=1e-5)
    lora.unmerge()
    torch.testing.assert_close(images(model), adapted, rtol=1e-4, atol=1e-5)


def test_lora_on_conv_gradients_reach_only_lora(tmp_path):
    model = adaptkit.build(spec(tmp_path, methods=[{"name": "lora", "rank": 2, "targets": ["conv"], "tower": "synthesis"}]))
    trainable = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
    assert trainable and all(".lora." in n for n in trainable)
    assert all(".conv.lora." in n and "modulation" not in n for n in trainable)
    images(model).square().mean().backward()
    for name, p in model.backbone.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name


def test_full_on_roles_unfreezes_only_those_layers(tmp_path):
    model = adaptkit.build(spec(tmp_path, methods=[{"name": "full", "targets": ["modulation"]}]))
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable and all(".modulation." in n for n in trainable)


def test_methods_without_sites_fail_validation(tmp_path):
    with pytest.raises(CompatibilityError, match="lora.*no layers with role 'attn.q'"):
        adaptkit.build(spec(tmp_path, methods=[{"name": "lora", "targets": ["attn.q"]}]))


def test_runs_on_cuda_when_present():
    if not torch.cuda.is_available():
        pytest.skip("no GPU here")
    g = tiny_generator().cuda()
    w = g.mapping(torch.randn(2, 16, device="cuda"))
    cpu = tiny_generator()
    torch.testing.assert_close(g.synthesis(w, "const").cpu(), cpu.synthesis(w.cpu(), "const"), rtol=1e-4, atol=1e-4)


def test_probe_reads_effective_kernel_exactly():
    torch.manual_seed(0)
    conv = ModulatedConv2d(3, 4, 3, 5).double()
    delta = torch.randn_like(conv.weight)
    conv.register_forward_hook(lambda m, args, out: out + F.conv2d(args[0], delta, padding=1))
    torch.testing.assert_close(conv.effective_weight(), conv.weight + delta)
    assert math.isclose(conv.scale, 1 / math.sqrt(27))
