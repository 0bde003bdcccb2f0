"""The adaptation surface of diffusers models (UNets, PriorTransformer); imports torch and diffusers.

:func:`diffusers_tower` walks a diffusers module and lists its sites:

- layers by role: ``attn.q/k/v/out`` (the separate to_q/to_k/to_v/to_out[0] Linears of
  every self- and cross-attention), ``conv`` (resnet and down/up-sampler convs),
  ``time`` (timestep MLP and the resnets' time projections), ``mlp.in/out`` (transformer
  feed-forwards), ``proj`` (transformer in/out projections), plus the roles the
  backbone assigns to its own top-level layers (``embed``, ``output``, ``class_embed``);
- blocks: resnets (the output of ``conv2`` is the residual branch: feature maps, so
  ``channel_dim=1``), transformer blocks (attn1 and the feed-forward) and the attention
  blocks of UNet2DModel (``to_out[0]``, tokens);
- attention sites: every diffusers ``Attention``; extra keys/values join through
  :class:`SiteProcessor`, an attention processor installed on first use;
- :class:`ContextTokenSite`: extra learned context tokens appended to the text (or other)
  conditioning of every cross-attention, i.e. prompt tuning of the conditioning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adaptkit.sites import gated_attention, index_layers
from adaptkit.surface import AttentionSite, BlockSite, LayerSite, PromptSource, TokenSite, Tower


def diffusers_tower(
    name: str,
    root: nn.Module,
    prefix: str,
    *,
    dim: int,
    own_roles: dict[str, str] | None = None,
    embeddings: Iterable[str] = (),
    extra_prefixes: Iterable[str] = (),
    tokens: TokenSite | None = None,
) -> Tower:
    """The tower of a diffusers model ``root`` whose parameters are named ``prefix + ...``.

    ``own_roles`` maps module names under ``root`` (``conv_in``) to roles; ``embeddings``
    lists embedding parameter names under ``root`` (frozen by ``freeze_embeddings``).
    """
    from diffusers.models.attention import BasicTransformerBlock, FeedForward
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

    layers: list[LayerSite] = []
    blocks: list[BlockSite] = []
    attention: list[AttentionSite] = []
    modules = dict(root.named_modules())

    def add(module_name: str, role: str) -> None:
        module = modules.get(module_name)
        if module is not None:
            layers.append(LayerSite(prefix + module_name, role, module))

    for module_name, role in (own_roles or {}).items():
        add(module_name, role)
    for qualified, module in root.named_modules():
        at = f"{qualified}." if qualified else ""
        if isinstance(module, ResnetBlock2D):
            for conv in ("conv1", "conv2", "conv_shortcut"):
                if isinstance(getattr(module, conv, None), nn.Conv2d):
                    add(at + conv, "conv")
            if isinstance(getattr(module, "time_emb_proj", None), nn.Linear):
                add(at + "time_emb_proj", "time")
            blocks.append(BlockSite(prefix + qualified, module.conv2.out_channels, mlp_output=module.conv2, channel_dim=1))
        elif isinstance(module, (Downsample2D, Upsample2D)) and isinstance(getattr(module, "conv", None), nn.Conv2d):
            add(at + "conv", "conv")
        elif isinstance(module, BasicTransformerBlock):
            blocks.append(BlockSite(prefix + qualified, module.attn1.query_dim, attn_output=module.attn1, mlp_output=module.ff))
        elif isinstance(module, FeedForward):
            add(at + "net.0.proj", "mlp.in")
            add(at + "net.2", "mlp.out")
        elif type(module).__name__ == "TimestepEmbedding":
            add(at + "linear_1", "time")
            add(at + "linear_2", "time")
        elif type(module).__name__ == "Transformer2DModel":
            add(at + "proj_in", "proj")
            add(at + "proj_out", "proj")
        elif isinstance(module, Attention):
            for role, child in (("attn.q", "to_q"), ("attn.k", "to_k"), ("attn.v", "to_v"), ("attn.out", "to_out.0")):
                add(at + child, role)
            parent = _transformer_block_of(root, qualified)
            norm = None
            if parent is not None and module is parent.attn1 and isinstance(parent.norm1, nn.LayerNorm):
                norm = parent.norm1  # the pre-norm the block applies before its self-attention
            attention.append(attention_site(prefix + qualified, module, norm))
            if parent is None:
                # a UNet2DModel attention block: residual and group norm live inside the module
                blocks.append(BlockSite(prefix + qualified, module.query_dim, attn_output=module.to_out[0]))
    layer_modules = index_layers(root, prefix)
    for module_name, role in (own_roles or {}).items():
        module = modules.get(module_name)
        if module is not None and not isinstance(module, (nn.Linear, nn.Conv2d)):
            layer_modules[prefix + module_name] = module  # an nn.Embedding, for full fine-tuning by role
    return Tower(
        name=name, dim=dim, modality="image", layers=layers, blocks=blocks, attention=attention, tokens=tokens,
        embeddings=[prefix + e for e in embeddings], param_prefixes=[prefix, *extra_prefixes], modules=layer_modules,
    )


def _transformer_block_of(root: nn.Module, qualified: str) -> Any:
    from diffusers.models.attention import BasicTransformerBlock

    parent_name = qualified.rpartition(".")[0]
    if not parent_name:
        return None
    parent = root.get_submodule(parent_name)
    return parent if isinstance(parent, BasicTransformerBlock) else None


# ---------------------------------------------------------------- attention
def attention_site(name: str, attn: nn.Module, norm: nn.Module | None) -> AttentionSite:
    """An :class:`AttentionSite` on a diffusers ``Attention`` module."""
    heads = attn.heads
    head_dim = attn.to_k.out_features // heads
    return AttentionSite(
        name, attn, attn.to_k.in_features, heads, head_dim,
        install=lambda site: processor_of(site.module).sites.append(site),
        project_kv=_make_project_kv(attn, norm), supports_gate=True,
    )


def _make_project_kv(attn: nn.Module, norm: nn.Module | None) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    def project_kv(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # tokens (P, dim) take the path the layer's own keys/values take (norms and k/v
        # projections); a UNet2DModel block's group norm is left out: it would pool statistics
        # over the learned tokens, which carry no spatial structure
        if norm is not None:
            tokens = norm(tokens)
        elif attn.norm_cross is not None and attn.is_cross_attention:
            tokens = attn.norm_encoder_hidden_states(tokens[None])[0]
        heads = attn.heads
        k = attn.to_k(tokens).view(tokens.shape[0], heads, -1).transpose(0, 1)
        v = attn.to_v(tokens).view(tokens.shape[0], heads, -1).transpose(0, 1)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        return k, v

    return project_kv


class SiteProcessor:
    """A diffusers attention processor that joins extra keys/values and context tokens.

    ``sites`` add key/value vectors (prefix tuning, prompts through attention);
    ``context`` adds tokens to the encoder states of a cross-attention (they pass through
    the layer's k/v projections like the conditioning itself). With neither, the module's
    original processor runs, so unadapted models keep diffusers' native path.
    """

    def __init__(self, original: Any) -> None:
        self.original = original
        self.sites: list[AttentionSite] = []
        self.context: list[Callable[[int], torch.Tensor | None]] = []

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        batch = hidden_states.shape[0]
        cross = encoder_hidden_states is not None
        context = [c for c in (f(batch) for f in self.context) if c is not None] if cross else []
        extra = [kv for kv in (s.extra_kv(batch) for s in self.sites) if kv is not None]
        if not context and not extra and not any(s.gated for s in self.sites):
            if temb is not None:
                kwargs["temb"] = temb
            return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **kwargs)
        return self._attend(attn, hidden_states, encoder_hidden_states, attention_mask, temb, context, extra)

    def _attend(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        temb: torch.Tensor | None,
        context: list[torch.Tensor],
        extra: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        # the steps of diffusers' AttnProcessor2_0, plus the extra keys/values
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)

        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        base_length = encoder_hidden_states.shape[1]
        if context:
            encoder_hidden_states = torch.cat([encoder_hidden_states, *(c.to(encoder_hidden_states.dtype) for c in context)], dim=1)
        if attn.norm_cross and attn.is_cross_attention:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        heads = attn.heads
        head_dim = key.shape[-1] // heads
        query = query.view(batch, -1, heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, base_length, batch)
            attention_mask = attention_mask.view(batch, heads, -1, attention_mask.shape[-1])
            added = key.shape[2] - base_length
            if added:
                attention_mask = _pad_mask(attention_mask, 0, added)
        if extra:
            pk = torch.cat([k for k, _ in extra], dim=2).to(key.dtype)
            pv = torch.cat([v for _, v in extra], dim=2).to(value.dtype)
            key, value = torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2)
            if attention_mask is not None:
                attention_mask = _pad_mask(attention_mask, pk.shape[2], 0)

        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        for site in self.sites:  # zero-initialised gated prefixes: their own softmax, added to the output
            gated = gated_attention(site, query)
            if gated is not None:
                hidden_states = hidden_states + gated
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _pad_mask(mask: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """Let every query see ``before`` + ``after`` added key positions."""
    mask = mask.expand(*mask.shape[:-2], max(mask.shape[-2], 1), mask.shape[-1])
    visible = True if mask.dtype == torch.bool else 0.0
    parts = []
    if before:
        parts.append(mask.new_full((*mask.shape[:-1], before), visible))
    parts.append(mask)
    if after:
        parts.append(mask.new_full((*mask.shape[:-1], after), visible))
    return torch.cat(parts, dim=-1)


def processor_of(attn: nn.Module) -> SiteProcessor:
    """The :class:`SiteProcessor` of a diffusers ``Attention``, installed on first use."""
    current = attn.processor
    if not isinstance(current, SiteProcessor):
        current = SiteProcessor(current)
        attn.set_processor(current)
    return current


# ---------------------------------------------------------------- tokens
class ContextTokenSite(TokenSite):
    """Extra context tokens for every cross-attention of a model (prompt tuning of the conditioning).

    Shallow sources give the same tokens to every cross-attention; deep ones fresh tokens
    per cross-attention (``layer`` = its index). The tokens join the conditioning
    sequence, so they pass through each layer's frozen k/v projections.
    """

    def __init__(self, dim: int, cross_attentions: list[nn.Module]) -> None:
        self.dim = dim
        self.num_layers = len(cross_attentions)
        self._modules = cross_attentions
        self._sources: list[PromptSource] = []

    def attach(self, source: PromptSource) -> None:
        if not self._sources:
            for layer, attn in enumerate(self._modules):
                processor_of(attn).context.append(lambda batch, layer=layer: self.tokens(batch, layer))
        self._sources.append(source)

    def tokens(self, batch: int, layer: int) -> torch.Tensor | None:
        if not self._sources:
            return None
        parts = [s.tokens(batch, layer if s.deep else 0) for s in self._sources]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
