"""StyleGAN2 networks in plain PyTorch (no CUDA extensions; CPU and GPU alike).

The generator follows Karras et al. 2020 ("Analyzing and Improving the Image Quality
of StyleGAN") and keeps the state-dict layout of the widely used rosinality
stylegan2-pytorch checkpoints: ``style.N`` (mapping MLP), ``input.input``,
``conv1``, ``to_rgb1``, ``convs.N``, ``to_rgbs.N`` and ``noises.noise_N``, with the
same tensor shapes, so such a checkpoint loads with ``load_state_dict``.

Two choices keep every adaptation method exact on these layers:

- :class:`EqualLinear` is an ``nn.Linear`` whose input is multiplied by the
  equalized-learning-rate scale in a forward *pre*-hook, so ``forward`` is the
  plain ``x @ W.T + b``. A method that adds ``B A x`` to the output (LoRA) sees the
  true input, and folding ``B A`` into ``weight`` gives the same function.
- :class:`ModulatedConv2d` is an ``nn.Conv2d`` whose ``forward`` is the plain
  convolution. StyleGAN's modulated, demodulated convolution (:meth:`~ModulatedConv2d.modulated`)
  uses the layer's *effective* kernel: when a method has hooked the layer, the
  kernel is read off the layer itself by convolving one unit impulse per input
  channel, so modulation and demodulation see ``W + delta`` exactly as if the
  update had been merged into ``weight``. Stored as (out, in, k, k) and saved as
  rosinality's (1, out, in, k, k).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SQRT2 = math.sqrt(2.0)


# --------------------------------------------------------------------- ops
def make_kernel(taps: Sequence[float]) -> torch.Tensor:
    """The separable 2-D FIR filter of 1-D ``taps``, normalised to sum 1."""
    k = torch.tensor(list(taps), dtype=torch.float32)
    k = k[None, :] * k[:, None] if k.ndim == 1 else k
    return k / k.sum()


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Upsample by zero insertion, pad, convolve each channel with ``kernel``, downsample.

    The same operation as StyleGAN2's CUDA ``upfirdn2d`` (equal factors and pads on
    both axes), written with ``F.pad`` and a depthwise ``F.conv2d``.
    Output size: ``(H * up + pad0 + pad1 - kh) // down + 1``.
    """
    batch, channels, height, width = x.shape
    if up > 1:
        x = x.reshape(batch, channels, height, 1, width, 1)
        x = F.pad(x, (0, up - 1, 0, 0, 0, up - 1))
        x = x.reshape(batch, channels, height * up, width * up)
    pad0, pad1 = pad
    x = F.pad(x, (max(pad0, 0), max(pad1, 0), max(pad0, 0), max(pad1, 0)))
    if pad0 < 0 or pad1 < 0:
        h, w = x.shape[-2:]
        x = x[:, :, max(-pad0, 0) : h - max(-pad1, 0), max(-pad0, 0) : w - max(-pad1, 0)]
    # a true convolution (flipped kernel), one filter per channel
    weight = torch.flip(kernel, (0, 1)).to(x.dtype)[None, None].expand(channels, 1, *kernel.shape)
    x = F.conv2d(x, weight, groups=channels)
    if down > 1:
        x = x[:, :, ::down, ::down]
    return x


def fused_leaky_relu(x: torch.Tensor, bias: torch.Tensor, negative_slope: float = 0.2, scale: float = SQRT2) -> torch.Tensor:
    """``leaky_relu(x + bias) * sqrt(2)`` with ``bias`` broadcast along dimension 1."""
    shape = (1, bias.shape[0]) + (1,) * (x.ndim - 2)
    return F.leaky_relu(x + bias.view(shape).to(x.dtype), negative_slope) * scale


# --------------------------------------------------------------------- layers
class PixelNorm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(torch.mean(x * x, dim=1, keepdim=True) + 1e-8)


def _scale_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (args[0] * module.scale, *args[1:])


class EqualLinear(nn.Linear):
    """A linear layer with equalized learning rate: ``(x * lr_mul / sqrt(in)) @ W.T + b * lr_mul``.

    ``weight`` and ``bias`` hold rosinality's raw values. The input scaling happens
    in a forward pre-hook (see the module docstring); the activation, when there is
    one, is applied by the caller, so hooks see the pre-activation output.
    """

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True, bias_init: float = 0.0, lr_mul: float = 1.0) -> None:
        super().__init__(in_dim, out_dim, bias=bias)
        with torch.no_grad():
            self.weight.normal_().div_(lr_mul)
            if self.bias is not None:
                self.bias.fill_(bias_init)
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.register_forward_pre_hook(_scale_input)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x arrives already scaled
        bias = self.bias * self.lr_mul if self.bias is not None else None
        return F.linear(x, self.weight, bias)


class Blur(nn.Module):
    def __init__(self, taps: Sequence[float], pad: tuple[int, int], upsample_factor: int = 1) -> None:
        super().__init__()
        kernel = make_kernel(taps) * (upsample_factor**2 if upsample_factor > 1 else 1)
        self.register_buffer("kernel", kernel)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad)


class Upsample(nn.Module):
    def __init__(self, taps: Sequence[float], factor: int = 2) -> None:
        super().__init__()
        self.factor = factor
        self.register_buffer("kernel", make_kernel(taps) * factor**2)
        p = self.kernel.shape[0] - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)


class ModulatedConv2d(nn.Conv2d):
    """StyleGAN2's modulated convolution; ``forward`` is the plain convolution (see module docstring)."""

    def __init__(
        self,
        in_channel: int,
        out_channel: int,
        kernel_size: int,
        style_dim: int,
        demodulate: bool = True,
        upsample: bool = False,
        blur_kernel: Sequence[float] = (1, 3, 3, 1),
    ) -> None:
        super().__init__(in_channel, out_channel, kernel_size, padding=kernel_size // 2, bias=False)
        with torch.no_grad():
            self.weight.normal_()
        self.scale = 1 / math.sqrt(in_channel * kernel_size**2)
        self.modulation = EqualLinear(style_dim, in_channel, bias_init=1.0)
        self.demodulate, self.upsample = demodulate, upsample
        if upsample:
            factor = 2
            p = (len(blur_kernel) - factor) - (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1), upsample_factor=factor)
        self.register_state_dict_post_hook(_weight_to_5d)
        self.register_load_state_dict_pre_hook(_weight_from_5d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, None, 1, self.padding)

    def effective_weight(self) -> torch.Tensor:
        """The kernel this layer applies, including updates that methods add through hooks."""
        if not (self._forward_hooks or self._forward_pre_hooks):
            return self.weight
        k = self.kernel_size[0]
        centre = k // 2
        probe = self.weight.new_zeros(self.in_channels, self.in_channels, k, k)
        index = torch.arange(self.in_channels, device=probe.device)
        probe[index, index, centre, centre] = 1.0
        response = self(probe)  # response[i, o] is kernel[o, i] flipped
        return response.flip(-1, -2).transpose(0, 1)

    def modulated(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Convolve ``x`` (B, in, H, W) with the kernel modulated by latent ``w`` (B, style_dim)."""
        return self.modulated_by_styles(x, self.modulation(w))

    def modulated_by_styles(self, x: torch.Tensor, styles: torch.Tensor) -> torch.Tensor:
        """As :meth:`modulated`, from per-input-channel styles (B, in) (StyleGAN's S space)."""
        batch, in_channel, height, width = x.shape
        out_channel, k = self.out_channels, self.kernel_size[0]
        weight = self.scale * self.effective_weight()[None] * styles[:, None, :, None, None].to(x.dtype)
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.pow(2).sum((2, 3, 4)) + 1e-8)[:, :, None, None, None]
        x = x.reshape(1, batch * in_channel, height, width)
        if self.upsample:
            weight = weight.transpose(1, 2).reshape(batch * in_channel, out_channel, k, k)
            out = F.conv_transpose2d(x, weight, padding=0, stride=2, groups=batch)
            out = self.blur(out.reshape(batch, out_channel, *out.shape[-2:]))
        else:
            out = F.conv2d(x, weight.reshape(batch * out_channel, in_channel, k, k), padding=self.padding, groups=batch)
            out = out.reshape(batch, out_channel, *out.shape[-2:])
        return out


def _weight_to_5d(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    key = prefix + "weight"
    if key in state and state[key].ndim == 4:
        state[key] = state[key].unsqueeze(0)


def _weight_from_5d(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
    key = prefix + "weight"
    if key in state and state[key].ndim == 5 and state[key].shape[0] == 1:
        state[key] = state[key].squeeze(0)


class NoiseInjection(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if noise is None:
            noise = x.new_empty(x.shape[0], 1, *x.shape[-2:]).normal_()
        return x + self.weight * noise


class FusedLeakyReLU(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_leaky_relu(x, self.bias)


class ConstantInput(nn.Module):
    def __init__(self, channels: int, size: int = 4) -> None:
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channels, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.input.expand(batch, -1, -1, -1)


class StyledConv(nn.Module):
    """Modulated conv -> noise -> bias + leaky ReLU: one synthesis layer (one residual-free block)."""

    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, style_dim: int,
                 upsample: bool = False, blur_kernel: Sequence[float] = (1, 3, 3, 1)) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(in_channel, out_channel, kernel_size, style_dim, upsample=upsample, blur_kernel=blur_kernel)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channel)

    def forward(self, x: torch.Tensor, styles: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        return self.activate(self.noise(self.conv.modulated_by_styles(x, styles), noise))


class ToRGB(nn.Module):
    def __init__(self, in_channel: int, style_dim: int, out_channel: int = 3, upsample: bool = True,
                 blur_kernel: Sequence[float] = (1, 3, 3, 1)) -> None:
        super().__init__()
        if upsample:
            self.upsample = Upsample(blur_kernel)
        self.conv = ModulatedConv2d(in_channel, out_channel, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, out_channel, 1, 1))

    def forward(self, x: torch.Tensor, styles: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv.modulated_by_styles(x, styles) + self.bias
        if skip is not None:
            out = out + self.upsample(skip)
        return out


def default_channels(channel_multiplier: int = 2) -> dict[int, int]:
    """rosinality's channel count per resolution."""
    return {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * channel_multiplier, 128: 128 * channel_multiplier,
            256: 64 * channel_multiplier, 512: 32 * channel_multiplier, 1024: 16 * channel_multiplier}


# --------------------------------------------------------------------- generator
class Generator(nn.Module):
    """StyleGAN2 generator: mapping MLP z -> w, synthesis from a learned 4x4 constant.

    ``n_latent`` = number of w vectors one image consumes (W+ has shape (B, n_latent,
    style_dim)): one per synthesis conv and one per ToRGB, the ToRGB sharing the
    index after its resolution's second conv, as in StyleGAN2.
    """

    def __init__(
        self,
        size: int,
        style_dim: int,
        n_mlp: int,
        channels: dict[int, int],
        img_channels: int = 3,
        lr_mlp: float = 0.01,
        blur_kernel: Sequence[float] = (1, 3, 3, 1),
    ) -> None:
        super().__init__()
        self.size, self.style_dim, self.img_channels = size, style_dim, img_channels
        self.style = nn.Sequential(PixelNorm(), *[EqualLinear(style_dim, style_dim, lr_mul=lr_mlp) for _ in range(n_mlp)])
        self.channels = dict(channels)
        self.input = ConstantInput(channels[4])
        self.conv1 = StyledConv(channels[4], channels[4], 3, style_dim, blur_kernel=blur_kernel)
        self.to_rgb1 = ToRGB(channels[4], style_dim, img_channels, upsample=False)
        self.log_size = int(math.log2(size))
        self.num_layers = (self.log_size - 2) * 2 + 1
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()
        for index in range(self.num_layers):
            res = (index + 5) // 2
            self.noises.register_buffer(f"noise_{index}", torch.randn(1, 1, 2**res, 2**res))
        in_channel = channels[4]
        for i in range(3, self.log_size + 1):
            out_channel = channels[2**i]
            self.convs.append(StyledConv(in_channel, out_channel, 3, style_dim, upsample=True, blur_kernel=blur_kernel))
            self.convs.append(StyledConv(out_channel, out_channel, 3, style_dim, blur_kernel=blur_kernel))
            self.to_rgbs.append(ToRGB(out_channel, style_dim, img_channels, blur_kernel=blur_kernel))
            in_channel = out_channel
        self.n_latent = self.log_size * 2 - 2
        #: the state-dict names of the generator itself (methods may attach more later)
        self.native_keys = frozenset(self.state_dict())

    # -- latents -------------------------------------------------------------
    def mapping(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, style_dim) -> w (B, style_dim): pixel norm, then the MLP with leaky ReLUs."""
        x = self.style[0](z)
        for layer in self.style[1:]:
            x = F.leaky_relu(layer(x), 0.2) * SQRT2
        return x

    def broadcast(self, w: torch.Tensor) -> torch.Tensor:
        """W (B, style_dim) -> W+ (B, n_latent, style_dim); W+ passes through."""
        if w.ndim == 2:
            return w[:, None, :].expand(-1, self.n_latent, -1)
        if w.ndim != 3 or w.shape[1] != self.n_latent:
            raise ValueError(f"expected w of shape (B, {self.style_dim}) or (B, {self.n_latent}, {self.style_dim}), got {tuple(w.shape)}")
        return w

    def style_layers(self) -> list[ModulatedConv2d]:
        """Every modulated conv in forward order: conv1, to_rgb1, then per resolution conv, conv, to_rgb."""
        layers = [self.conv1.conv, self.to_rgb1.conv]
        for index, to_rgb in enumerate(self.to_rgbs):
            layers += [self.convs[2 * index].conv, self.convs[2 * index + 1].conv, to_rgb.conv]
        return layers

    def latent_index(self) -> list[int]:
        """For each entry of :meth:`style_layers`, the index of the W+ vector it reads."""
        index = [0, 1]
        for i in range(len(self.to_rgbs)):
            index += [2 * i + 1, 2 * i + 2, 2 * i + 3]
        return index

    def styles(self, w: torch.Tensor) -> list[torch.Tensor]:
        """StyleSpace: the per-channel styles of every modulated conv for W or W+ latents ``w``."""
        ws = self.broadcast(w)
        return [layer.modulation(ws[:, i]) for layer, i in zip(self.style_layers(), self.latent_index())]

    # -- synthesis ----------------------------------------------------------
    def noise_buffers(self) -> list[torch.Tensor]:
        return [getattr(self.noises, f"noise_{i}") for i in range(self.num_layers)]

    def synthesis_from_styles(self, styles: Sequence[torch.Tensor], noise: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        """Render images from StyleSpace styles (as :meth:`styles` returns them)."""
        noise = list(noise) if noise is not None else [None] * self.num_layers
        s = iter(styles)
        out = self.conv1(self.input(styles[0].shape[0]), next(s), noise[0])
        skip = self.to_rgb1(out, next(s))
        for index, to_rgb in enumerate(self.to_rgbs):
            out = self.convs[2 * index](out, next(s), noise[2 * index + 1])
            out = self.convs[2 * index + 1](out, next(s), noise[2 * index + 2])
            skip = to_rgb(out, next(s), skip)
        return skip

    def synthesis(self, w: torch.Tensor, noise: str | Sequence[torch.Tensor | None] = "random") -> torch.Tensor:
        """Images (B, C, size, size) from W (B, style_dim) or W+ (B, n_latent, style_dim) latents.

        ``noise``: ``"random"`` (fresh per call), ``"const"`` (the stored ``noises``
        buffers, so the same w gives the same image) or a list of tensors.
        """
        if isinstance(noise, str):
            noise = [None] * self.num_layers if noise == "random" else self.noise_buffers()
        return self.synthesis_from_styles(self.styles(w), noise)

    def forward(
        self,
        styles: Sequence[torch.Tensor],
        return_latents: bool = False,
        inject_index: int | None = None,
        truncation: float = 1.0,
        truncation_latent: torch.Tensor | None = None,
        input_is_latent: bool = False,
        noise: Sequence[torch.Tensor | None] | None = None,
        randomize_noise: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """rosinality's calling convention: a list of one z (or two, for style mixing)."""
        if not input_is_latent:
            styles = [self.mapping(s) for s in styles]
        if truncation < 1:
            styles = [truncation_latent + truncation * (s - truncation_latent) for s in styles]
        if len(styles) < 2:
            latent = self.broadcast(styles[0])
        else:
            cut = inject_index if inject_index is not None else int(torch.randint(1, self.n_latent, ()).item())
            latent = torch.cat([self.broadcast(styles[0])[:, :cut], self.broadcast(styles[1])[:, cut:]], dim=1)
        if noise is None:
            noise = [None] * self.num_layers if randomize_noise else self.noise_buffers()
        image = self.synthesis_from_styles(self.styles(latent), noise)
        return image, (latent if return_latents else None)

    @torch.no_grad()
    def mean_latent(self, count: int = 4096, seed: int = 0) -> torch.Tensor:
        """The mean w of ``count`` seeded z's (what truncation pulls towards), shape (1, style_dim)."""
        generator = torch.Generator().manual_seed(seed)
        z = torch.randn(count, self.style_dim, generator=generator).to(self.input.input.device)
        return self.mapping(z).mean(0, keepdim=True)


# --------------------------------------------------------------------- discriminator
class EqualConv2d(nn.Conv2d):
    """A convolution with equalized learning rate (input scaled in a pre-hook, as EqualLinear)."""

    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, stride: int = 1, padding: int = 0, bias: bool = True) -> None:
        super().__init__(in_channel, out_channel, kernel_size, stride=stride, padding=padding, bias=bias)
        with torch.no_grad():
            self.weight.normal_()
            if self.bias is not None:
                self.bias.zero_()
        self.scale = 1 / math.sqrt(in_channel * kernel_size**2)
        self.register_forward_pre_hook(_scale_input)


class ConvLayer(nn.Sequential):
    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, downsample: bool = False,
                 blur_kernel: Sequence[float] = (1, 3, 3, 1), bias: bool = True, activate: bool = True) -> None:
        layers: list[nn.Module] = []
        if downsample:
            p = (len(blur_kernel) - 2) + (kernel_size - 1)
            layers.append(Blur(blur_kernel, pad=((p + 1) // 2, p // 2)))
            stride, padding = 2, 0
        else:
            stride, padding = 1, kernel_size // 2
        layers.append(EqualConv2d(in_channel, out_channel, kernel_size, stride, padding, bias=bias and not activate))
        if activate:
            layers.append(FusedLeakyReLU(out_channel))
        super().__init__(*layers)


class ResBlock(nn.Module):
    def __init__(self, in_channel: int, out_channel: int, blur_kernel: Sequence[float] = (1, 3, 3, 1)) -> None:
        super().__init__()
        self.conv1 = ConvLayer(in_channel, in_channel, 3)
        self.conv2 = ConvLayer(in_channel, out_channel, 3, downsample=True, blur_kernel=blur_kernel)
        self.skip = ConvLayer(in_channel, out_channel, 1, downsample=True, activate=False, bias=False, blur_kernel=blur_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.conv2(self.conv1(x)) + self.skip(x)) / SQRT2


class Discriminator(nn.Module):
    """StyleGAN2's residual discriminator (rosinality layout), with minibatch standard deviation."""

    def __init__(self, size: int, channels: dict[int, int], img_channels: int = 3, blur_kernel: Sequence[float] = (1, 3, 3, 1)) -> None:
        super().__init__()
        convs: list[nn.Module] = [ConvLayer(img_channels, channels[size], 1)]
        in_channel = channels[size]
        for i in range(int(math.log2(size)), 2, -1):
            out_channel = channels[2 ** (i - 1)]
            convs.append(ResBlock(in_channel, out_channel, blur_kernel))
            in_channel = out_channel
        self.convs = nn.Sequential(*convs)
        self.stddev_group = 4
        self.final_conv = ConvLayer(in_channel + 1, channels[4], 3)
        self.final_linear = nn.Sequential(EqualLinear(channels[4] * 16, channels[4]), EqualLinear(channels[4], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.convs(x)
        batch, channel, height, width = out.shape
        group = max(g for g in range(1, min(batch, self.stddev_group) + 1) if batch % g == 0)
        stddev = out.reshape(group, -1, 1, channel, height, width)
        stddev = torch.sqrt(stddev.var(0, unbiased=False) + 1e-8).mean((2, 3, 4), keepdim=True).squeeze(2)
        out = torch.cat([out, stddev.repeat(group, 1, height, width)], 1)
        out = self.final_conv(out).reshape(batch, -1)
        hidden, last = self.final_linear
        return last(F.leaky_relu(hidden(out), 0.2) * SQRT2)
