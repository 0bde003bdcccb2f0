"""CLIP-guided StyleGAN editing, as functions over a generator and a CLIP guide (imports torch).

- :func:`optimise_latent`: StyleCLIP latent optimisation (Patashnik et al. 2021, sec. 4):
  minimise ``(1 - cos(CLIP(G(w)), CLIP(text))) + l2_lambda * |w - w_src|^2`` (+ an
  optional pixel term) with Adam and StyleCLIP's learning-rate ramp, in W or W+.
- :func:`channel_directions` and :func:`global_direction`: StyleCLIP global directions
  (sec. 6): each StyleSpace channel's effect on the CLIP image embedding, its
  relevance to a text direction, thresholded by ``beta`` and applied with ``alpha``.
- :func:`directional_loss`: StyleGAN-NADA's loss (Gal et al. 2022): the CLIP-space
  direction from source image to adapted image should follow the text direction.
- :func:`invert`: find a W+ latent whose image matches a given picture.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


class ClipGuide(nn.Module):
    """Normalised CLIP image and text features for generated images and prompts.

    ``clip`` is any backbone with ``encode_image`` / ``encode_text`` (the ``clip``
    backbone). Generated images (B, C, S, S) in [-1, 1] are resized to the CLIP's
    input size and their channels matched (gray repeated to RGB, RGB averaged to
    gray). A prompt's text feature is the normalised mean over ``templates`` (each
    holding ``{}``) of the normalised features of the filled-in templates.
    """

    def __init__(self, clip: nn.Module, templates: Sequence[str] = ("{}",)) -> None:
        super().__init__()
        self.clip = clip
        self.templates = list(templates)
        size = getattr(clip, "image_size", None)
        self.image_size = (size, size) if isinstance(size, int) else tuple(size) if size else None
        self.in_chans = int(getattr(clip, "in_chans", 3) or 3)

    def view(self, images: torch.Tensor) -> torch.Tensor:
        """Generated images as the CLIP sees them."""
        if self.image_size is not None and tuple(images.shape[-2:]) != self.image_size:
            down = images.shape[-1] > self.image_size[-1]
            images = F.interpolate(images, size=self.image_size, mode="bilinear", antialias=down, align_corners=False)
        if images.shape[1] != self.in_chans:
            images = images.repeat(1, self.in_chans, 1, 1) if images.shape[1] == 1 else images.mean(1, keepdim=True)
        return images

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_image(self.view(images)).float(), dim=-1)

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """(len(prompts), D) normalised template-ensemble features."""
        out = []
        for prompt in prompts:
            texts = [t.format(prompt) if "{}" in t else t for t in self.templates]
            features = F.normalize(self.clip.encode_text(texts).float(), dim=-1)
            out.append(F.normalize(features.mean(0), dim=-1))
        return torch.stack(out)

    def text_direction(self, target: str, neutral: str) -> torch.Tensor:
        """The normalised CLIP text direction neutral -> target (averaged over templates)."""
        features = self.text_features([target, neutral])
        return F.normalize(features[0] - features[1], dim=-1)


# --------------------------------------------------------------------- latent optimisation
def styleclip_lr(t: float, initial: float, rampdown: float = 0.25, rampup: float = 0.05) -> float:
    """StyleCLIP's (and StyleGAN's projector's) schedule: cosine ramp-down at the end, linear ramp-up at the start."""
    ramp = min(1.0, (1.0 - t) / rampdown)
    ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
    ramp = ramp * min(1.0, t / rampup)
    return initial * ramp


@dataclass
class LatentEdit:
    """The result of :func:`optimise_latent`: edited latents and the loss history."""

    w: torch.Tensor
    history: list[dict[str, float]] = field(default_factory=list)


def optimise_latent(
    render: Callable[[torch.Tensor], torch.Tensor],
    image_features: Callable[[torch.Tensor], torch.Tensor],
    w_source: torch.Tensor,
    target: torch.Tensor,
    *,
    steps: int = 300,
    lr: float = 0.1,
    l2_lambda: float = 0.008,
    image_lambda: float = 0.0,
    max_distance: float | None = None,
    log_every: int = 0,
) -> LatentEdit:
    """StyleCLIP latent optimisation of ``w_source`` (B, ...) towards text feature ``target`` (D,).

    Each sample's latent is optimised independently (the losses are summed over the
    batch, and Adam is per element). ``max_distance`` additionally projects each
    latent back onto the ball of that L2 radius around its source after every step.
    Only the latent receives gradients: ``render`` and ``image_features`` should
    close over frozen modules.
    """
    source = w_source.detach()
    w = source.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([w], lr=lr)
    source_images = render(source).detach() if image_lambda > 0 else None
    history: list[dict[str, float]] = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = styleclip_lr(step / steps, lr)
        images = render(w)
        clip_loss = 1 - image_features(images) @ target
        l2 = (w - source).pow(2).flatten(1).sum(1)
        loss = clip_loss + l2_lambda * l2
        if source_images is not None:
            loss = loss + image_lambda * (images - source_images).pow(2).flatten(1).mean(1)
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        optimizer.step()
        if max_distance is not None:
            with torch.no_grad():
                offset = w - source
                norm = offset.flatten(1).norm(dim=1).clamp(min=1e-12)
                factor = (max_distance / norm).clamp(max=1.0).reshape(-1, *([1] * (w.ndim - 1)))
                w.copy_(source + offset * factor)
        if log_every and (step % log_every == 0 or step == steps - 1):
            history.append({"step": step, "clip_loss": float(clip_loss.mean()), "l2": float(l2.mean())})
    return LatentEdit(w.detach(), history)


# --------------------------------------------------------------------- global directions
@dataclass
class ChannelDirections:
    """Per StyleSpace channel: its unit CLIP image-space direction and the style's std."""

    directions: torch.Tensor  # (channels, D)
    std: torch.Tensor  # (channels,)
    layers: list[int]  # which style layers the channels come from, in order
    sizes: list[int]  # channels per listed layer


@torch.no_grad()
def channel_directions(
    styles_of: Callable[[torch.Tensor], list[torch.Tensor]],
    render_styles: Callable[[list[torch.Tensor]], torch.Tensor],
    image_features: Callable[[torch.Tensor], torch.Tensor],
    ws: torch.Tensor,
    std_ws: torch.Tensor,
    layers: Sequence[int],
    magnitude: float = 5.0,
    batch: int = 256,
) -> ChannelDirections:
    """Each listed layer's channels, one by one: move the style by +-``magnitude`` std on
    the images of ``ws`` and average the normalised change of their CLIP embedding.

    ``std_ws`` (many random latents) gives each channel's standard deviation.
    """
    base = styles_of(ws)
    std_all = [s.std(0) for s in styles_of(std_ws)]
    n = ws.shape[0]
    directions, stds, sizes = [], [], []
    per_batch = max(1, batch // (2 * n))
    for layer in layers:
        count = base[layer].shape[1]
        sizes.append(count)
        stds.append(std_all[layer])
        for start in range(0, count, per_batch):
            channels = list(range(start, min(count, start + per_batch)))
            k = len(channels)
            styles = [s.repeat(2 * k, 1) for s in base]
            grid = styles[layer].reshape(2, k, n, count)
            for i, c in enumerate(channels):
                delta = magnitude * std_all[layer][c]
                grid[0, i, :, c] += delta
                grid[1, i, :, c] -= delta
            features = image_features(render_styles(styles)).reshape(2, k, n, -1)
            change = F.normalize(features[0] - features[1], dim=-1).mean(1)
            directions.append(F.normalize(change, dim=-1))
    return ChannelDirections(torch.cat(directions), torch.cat(stds), list(layers), sizes)


def global_direction(channels: ChannelDirections, text_direction: torch.Tensor, beta: float) -> tuple[torch.Tensor, int]:
    """StyleCLIP's style-space edit direction for a text direction.

    Relevance of channel c: ``r_c = direction_c . text_direction``; channels with
    ``|r_c| < beta`` are left alone; the rest move by ``r_c / max|r| * std_c`` per unit
    of alpha. Returns (delta over the listed channels, number of channels moved).
    """
    relevance = channels.directions @ text_direction.to(channels.directions)
    relevance = torch.where(relevance.abs() >= beta, relevance, torch.zeros_like(relevance))
    top = relevance.abs().max()
    if top > 0:
        relevance = relevance / top
    return relevance * channels.std, int((relevance != 0).sum())


def apply_style_delta(styles: list[torch.Tensor], channels: ChannelDirections, delta: torch.Tensor, alpha: float) -> list[torch.Tensor]:
    """``styles`` with ``alpha * delta`` added to the channels of ``channels.layers``."""
    out = list(styles)
    offset = 0
    for layer, size in zip(channels.layers, channels.sizes):
        out[layer] = styles[layer] + alpha * delta[offset : offset + size].to(styles[layer])
        offset += size
    return out


# --------------------------------------------------------------------- NADA
def directional_loss(source_features: torch.Tensor, edited_features: torch.Tensor, text_direction: torch.Tensor) -> torch.Tensor:
    """StyleGAN-NADA: ``1 - cos(E(edited) - E(source), text direction)`` per sample (features normalised)."""
    change = F.normalize(edited_features - source_features, dim=-1)
    return 1 - change @ text_direction


# --------------------------------------------------------------------- inversion
def invert(
    render: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    w_start: torch.Tensor,
    steps: int = 300,
    lr: float = 0.1,
) -> tuple[torch.Tensor, float]:
    """A latent (same shape as ``w_start``) whose image matches ``images`` in pixels (MSE), by Adam
    with the StyleCLIP/projector learning-rate ramp. Returns the latent and the final MSE."""
    w = w_start.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([w], lr=lr)
    target = images.detach()
    loss = torch.zeros(())
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = styleclip_lr(step / steps, lr)
        loss = (render(w) - target).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final = float((render(w) - target).pow(2).mean())
    return w.detach(), final


def cosine_to(features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    return features @ text.to(features)
