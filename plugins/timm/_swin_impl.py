"""The built ``swin`` backbone (imports torch and timm).

Surface: the q/k/v slices of every fused ``qkv``, ``proj``, the MLP, the patch-merging
``reduction`` (role ``merge``) and the Conv2d patch embedding; every Swin block as a
block site (per-token adapters commute with the window partition); every window
attention as an attention site. Extra keys/values join *every* window: the relative
position bias and the shifted-window mask get zero columns for them, since they have
no position and belong to no window.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adaptkit import deferred
from adaptkit.backbone import Backbone
from adaptkit.sites import gated_attention, index_layers, prepend_kv
from adaptkit.surface import AttentionSite, BlockSite, LayerSite, Surface, Tower
from adaptkit_plugins.timm import common


class SwinBackbone(common.TimmNative, Backbone):
    capabilities = frozenset({"image_features"})

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.in_chans = net.patch_embed.proj.in_channels
        size = net.patch_embed.img_size
        self.image_size = tuple(size) if size is not None else None
        self.feature_dim = net.num_features

    @classmethod
    def create(cls, params: Any, ctx: Any) -> "SwinBackbone":
        from timm.models.swin_transformer import SwinTransformer

        net = common.create(params, ctx, "swin", SwinTransformer)
        if deferred.active():
            shifted_window_masks(net)
        return cls(net)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def make_surface(self) -> Surface:
        net = self.net
        layers: list[LayerSite] = [LayerSite("net.patch_embed.proj", "embed", net.patch_embed.proj)]
        blocks, attention = [], []
        for s, stage in enumerate(net.layers):
            if not isinstance(stage.downsample, nn.Identity):
                layers.append(LayerSite(f"net.layers.{s}.downsample.reduction", "merge", stage.downsample.reduction))
            for b, block in enumerate(stage.blocks):
                attn, prefix = block.attn, f"net.layers.{s}.blocks.{b}"
                width = attn.qkv.out_features // 3
                layers += common.block_layer_sites(prefix, block)
                blocks.append(BlockSite(
                    prefix, block.dim, attn_output=block.attn, mlp_output=block.mlp, mlp_input=block.mlp,
                    norms=common.block_norms(block),
                ))
                attention.append(
                    AttentionSite(
                        f"{prefix}.attn", attn, block.dim, attn.num_heads, width // attn.num_heads,
                        install=_install_window_attention, project_kv=_make_project_kv(block), supports_gate=True,
                    )
                )
        embeddings = [f"net.patch_embed.{n}" for n, _ in net.patch_embed.named_parameters()]
        tower = Tower(
            name="vision", dim=net.embed_dim, modality="image", layers=layers, blocks=blocks, attention=attention,
            tokens=None, embeddings=embeddings, param_prefixes=["net."], modules=index_layers(net, "net."),
        )
        return Surface("swin", {"vision": tower})


def _make_project_kv(block: nn.Module) -> Any:
    def project_kv(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attn = block.attn
        qkv = attn.qkv(block.norm1(tokens)).reshape(tokens.shape[0], 3, attn.num_heads, -1)
        return qkv[:, 1].transpose(0, 1), qkv[:, 2].transpose(0, 1)

    return project_kv


def _install_window_attention(site: AttentionSite) -> None:
    """Give a timm ``WindowAttention`` a forward that joins the site's extra keys and values.

    It follows timm's own two paths (fused SDPA, or explicit softmax) so that an
    empty prefix reproduces the base model's numbers.
    """
    attn = site.module

    def forward(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B_, N, _ = x.shape
        heads = attn.num_heads
        qkv = attn.qkv(x).reshape(B_, N, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        position = attn._get_rel_pos_bias()  # (1, heads, N, N)
        window = None
        if mask is not None:  # (windows, N, N) -> (B_, 1, N, N), window index fastest as in window_partition
            num_win = mask.shape[0]
            window = mask.to(position.dtype).view(1, num_win, 1, N, N).expand(B_ // num_win, -1, -1, -1, -1).reshape(B_, 1, N, N)
        extra = site.extra_kv(B_)
        if extra is not None:
            prefix_len = extra[0].shape[2]
            k, v = prepend_kv(k, v, extra)
            # extra keys have no position and belong to every window: zero bias, never masked
            position = F.pad(position, (prefix_len, 0))
            if window is not None:
                window = F.pad(window, (prefix_len, 0))
        dropout = attn.attn_drop.p if attn.training else 0.0
        if attn.fused_attn:
            bias = position if window is None else position + window
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=dropout)
        else:
            scores = (q * attn.scale) @ k.transpose(-2, -1)
            scores = scores + position
            if window is not None:
                scores = scores + window
            out = attn.attn_drop(attn.softmax(scores)) @ v
        gated = gated_attention(site, q, dropout)
        if gated is not None:
            out = out + gated
        out = out.transpose(1, 2).reshape(B_, N, -1)
        return attn.proj_drop(attn.proj(out))

    attn.forward = forward


def shifted_window_masks(net: nn.Module) -> None:
    """Recompute the shifted-window attention masks of a Swin built with its weights on the meta
    device: timm derives them on the device of the block's norm weight, so they came out empty,
    and no weights file holds them (non-persistent buffers)."""
    for module in net.modules():
        mask = module._buffers.get("attn_mask")
        if mask is not None and mask.is_meta:
            module.register_buffer("attn_mask", module.get_attn_mask(device=torch.device("cpu"), dtype=torch.float32), persistent=False)
