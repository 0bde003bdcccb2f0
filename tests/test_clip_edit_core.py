"""The editing algorithms (StyleCLIP latent / global, NADA loss, inversion) against a small stand-in encoder.

The task itself is tested with the real ``clip`` backbone in test_clip_stylegan_edit.py;
these tests pin down the algorithms independently of any CLIP.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adaptkit_plugins.stylegan.networks import Generator
from adaptkit_plugins.stylegan import clip_edit_core as core


class StandInEncoder(nn.Module):
    """A fixed random image/text encoder with CLIP's interface (8x8 RGB images, 16-d features)."""

    image_size = 8
    in_chans = 3

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(123)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.image_proj = nn.Linear(8 * 16, 16)
        self.words = nn.EmbeddingBag(97, 16)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_proj(F.avg_pool2d(torch.tanh(self.conv(images)), 2).flatten(1))

    def encode_text(self, texts) -> torch.Tensor:
        ids = [torch.tensor([sum(map(ord, w)) % 97 for w in t.split()]) for t in texts]
        offsets = torch.tensor([0] + [len(i) for i in ids[:-1]]).cumsum(0)
        return self.words(torch.cat(ids), offsets)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    g = Generator(size=8, style_dim=16, n_mlp=2, channels={4: 16, 8: 16}, img_channels=1).requires_grad_(False)
    guide = core.ClipGuide(StandInEncoder().requires_grad_(False), templates=["{}", "a picture of {}"])
    w = g.broadcast(g.mapping(torch.randn(4, 16))).clone()
    return g, guide, w


def render_of(g):
    return lambda w: g.synthesis(w, noise="const")


def test_guide_views_gray_images_as_rgb_at_clip_size(setup):
    g, guide, w = setup
    view = guide.view(torch.zeros(2, 1, 16, 16))
    assert view.shape == (2, 3, 8, 8)
    text = guide.text_features(["a digit", "another digit"])
    torch.testing.assert_close(text.norm(dim=1), torch.ones(2))
    direction = guide.text_direction("a digit", "another digit")
    assert direction.norm().item() == pytest.approx(1.0)


def test_styleclip_lr_ramps():
    values = [core.styleclip_lr(t / 100, 0.1) for t in range(100)]
    assert values[0] == 0.0 and max(values) == pytest.approx(0.1)
    assert values[-1] < 0.01 and values.index(max(values)) < 80


def test_latent_edit_raises_similarity_and_only_w_gets_gradients(setup):
    g, guide, w = setup
    target = guide.text_features(["a bright ring"])[0]
    before = guide.image_features(g.synthesis(w, "const")) @ target
    edit = core.optimise_latent(render_of(g), guide.image_features, w, target, steps=40, lr=0.1, l2_lambda=0.008)
    after = guide.image_features(g.synthesis(edit.w, "const")) @ target
    assert (after > before + 0.05).all(), (before, after)
    assert all(p.grad is None for p in g.parameters()) and all(p.grad is None for p in guide.parameters())
    assert not edit.w.requires_grad and edit.w.shape == w.shape


def test_latent_edit_distance_bounds(setup):
    g, guide, w = setup
    target = guide.text_features(["a bright ring"])[0]
    free = core.optimise_latent(render_of(g), guide.image_features, w, target, steps=40, l2_lambda=0.0)
    tied = core.optimise_latent(render_of(g), guide.image_features, w, target, steps=40, l2_lambda=0.5)
    capped = core.optimise_latent(render_of(g), guide.image_features, w, target, steps=40, l2_lambda=0.0, max_distance=0.5)

    def distance(edit):
        return (edit.w - w).flatten(1).norm(dim=1)

    assert (distance(tied) < distance(free)).all()
    assert (distance(capped) <= 0.5 + 1e-5).all() and (distance(free) > 0.5).all()
    capped_sim = guide.image_features(g.synthesis(capped.w, "const")) @ target
    start_sim = guide.image_features(g.synthesis(w, "const")) @ target
    assert (capped_sim > start_sim).all()


def test_latent_edit_in_w_space(setup):
    g, guide, _ = setup
    w = g.mapping(torch.randn(3, 16))
    target = guide.text_features(["a bright ring"])[0]
    edit = core.optimise_latent(render_of(g), guide.image_features, w, target, steps=30)
    assert edit.w.shape == (3, 16)
    assert ((guide.image_features(g.synthesis(edit.w, "const")) - guide.image_features(g.synthesis(w, "const"))) @ target > 0).all()


def test_global_direction_moves_relevant_channels(setup):
    g, guide, w = setup
    layers = [i for i, layer in enumerate(g.style_layers()) if layer.demodulate]
    channels = core.channel_directions(g.styles, lambda s: g.synthesis_from_styles(s, g.noise_buffers()), guide.image_features,
                                       w, g.broadcast(g.mapping(torch.randn(64, 16))), layers, magnitude=3.0)
    assert channels.directions.shape == (sum(channels.sizes), 16) and channels.layers == layers
    torch.testing.assert_close(channels.directions.norm(dim=1), torch.ones(len(channels.directions)))
    direction = guide.text_direction("a bright ring", "a dark blob")
    delta, moved = core.global_direction(channels, direction, beta=0.2)
    relevance = channels.directions @ direction
    assert moved == int((relevance.abs() >= 0.2).sum()) and 0 < moved < len(relevance)
    assert ((relevance.abs() < 0.2) == (delta == 0)).all()
    top = relevance.abs().argmax()
    assert delta[top].abs().item() == pytest.approx(channels.std[top].item(), rel=1e-5)
    # moving along the direction raises the CLIP-space projection on the text direction
    styles = g.styles(w)
    draw = lambda s: guide.image_features(g.synthesis_from_styles(s, g.noise_buffers()))  # noqa: E731
    before = draw(styles) @ direction
    after = draw(core.apply_style_delta(styles, channels, delta, 3.0)) @ direction
    assert after.mean() > before.mean()


def test_directional_loss():
    direction = F.normalize(torch.tensor([1.0, 0.0, 0.0]), dim=0)
    source = F.normalize(torch.tensor([[0.0, 1.0, 0.0]]), dim=1)
    along = F.normalize(source + 0.05 * direction, dim=1)
    against = F.normalize(source - 0.05 * direction, dim=1)
    assert core.directional_loss(source, along, direction).item() < 0.01
    assert core.directional_loss(source, against, direction).item() > 1.99


def test_inversion_recovers_a_generated_image(setup):
    g, _, w = setup
    target = g.synthesis(w[:1], "const")
    start = g.broadcast(g.mean_latent(256)).clone()
    initial = (g.synthesis(start, "const") - target).pow(2).mean().item()
    found, mse = core.invert(render_of(g), target, start, steps=80, lr=0.1)
    assert found.shape == start.shape and mse < 0.25 * initial
