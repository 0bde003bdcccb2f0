"""The built ``vit`` backbone (imports torch and timm)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adaptkit.backbone import Backbone
from adaptkit.sites import SequenceTokenSite, gated_attention, index_layers, prepend_kv
from adaptkit.surface import AttentionSite, BlockSite, LayerSite, Surface, Tower
from adaptkit_plugins.timm import common


class VitBackbone(common.TimmNative, Backbone):
    capabilities = frozenset({"image_features"})

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        proj = net.patch_embed.proj
        self.in_chans = proj.in_channels
        size = net.patch_embed.img_size
        self.image_size = tuple(size) if size is not None else None
        self.feature_dim = net.num_features

    @classmethod
    def create(cls, params: Any, ctx: Any) -> "VitBackbone":
        from timm.models.vision_transformer import VisionTransformer

        extra = {"global_pool": params.global_pool} if params.global_pool else {}
        if extra:
            params = params.model_copy(update={"kwargs": {**params.kwargs, **extra}})
        return cls(common.create(params, ctx, "vit", VisionTransformer))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def make_surface(self) -> Surface:
        net = self.net
        dim = net.embed_dim
        layers: list[LayerSite] = [LayerSite("net.patch_embed.proj", "embed", net.patch_embed.proj)]
        blocks, attention = [], []
        for i, block in enumerate(net.blocks):
            attn, prefix = block.attn, f"net.blocks.{i}"
            layers += common.block_layer_sites(prefix, block)
            blocks.append(BlockSite(
                prefix, dim, attn_output=block.attn, mlp_output=block.mlp, mlp_input=block.mlp,
                norms=common.block_norms(block),
            ))
            attention.append(
                AttentionSite(
                    f"{prefix}.attn", attn, dim, attn.num_heads, attn.head_dim,
                    install=_install_attention, project_kv=_make_project_kv(block), supports_gate=True,
                )
            )
        tokens = SequenceTokenSite(
            dim=dim, entry=net.norm_pre, blocks=list(net.blocks), exit=net.norm, insert_at=lambda: net.num_prefix_tokens
        )
        embeddings = [n for n in ("net.cls_token", "net.reg_token", "net.pos_embed") if getattr(net, n[4:], None) is not None]
        embeddings += [f"net.patch_embed.{n}" for n, _ in net.patch_embed.named_parameters()]
        tower = Tower(
            name="vision", dim=dim, modality="image", layers=layers, blocks=blocks, attention=attention,
            tokens=tokens, embeddings=embeddings, param_prefixes=["net."], modules=index_layers(net, "net."),
        )
        return Surface("vit", {"vision": tower})


def _make_project_kv(block: nn.Module) -> Any:
    def project_kv(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attn = block.attn
        qkv = attn.qkv(block.norm1(tokens)).reshape(tokens.shape[0], 3, attn.num_heads, attn.head_dim)
        k = attn.k_norm(qkv[:, 1].transpose(0, 1))
        return k, qkv[:, 2].transpose(0, 1)

    return project_kv


def _install_attention(site: AttentionSite) -> None:
    """Give a timm ``Attention`` a forward that joins the site's extra keys and values."""
    attn = site.module

    def forward(x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
        qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        extra = site.extra_kv(B)
        if extra is not None:
            prefix_len = extra[0].shape[2]
            k, v = prepend_kv(k, v, extra)
            if is_causal:
                causal = torch.ones(N, N, dtype=torch.bool, device=x.device).tril()
                attn_mask = causal if attn_mask is None else attn_mask & causal
                is_causal = False
            if attn_mask is not None:
                fill = True if attn_mask.dtype == torch.bool else 0.0
                pad = attn_mask.new_full((*attn_mask.shape[:-1], prefix_len), fill)
                attn_mask = torch.cat([pad, attn_mask], dim=-1)
        dropout = attn.attn_drop.p if attn.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal)
        gated = gated_attention(site, q, dropout)
        if gated is not None:
            x = x + gated
        x = x.transpose(1, 2).reshape(B, N, attn.num_heads * attn.head_dim)
        x = attn.norm(x)
        if gate is not None:
            x = x * gate
        return attn.proj_drop(attn.proj(x))

    attn.forward = forward
