"""An attention module for open_clip towers that methods can reach (imports torch).

open_clip's blocks use ``nn.MultiheadAttention``, which keeps the q/k/v projection in
one raw ``in_proj_weight`` parameter rather than a Linear layer: layer-level methods
(LoRA, selective fine-tuning) cannot hook it, and it cannot take extra keys/values.
:class:`ClipAttention` is an equivalent module with the same weights as two Linear
layers, ``in_proj`` (rows q; k; v) and ``out_proj``; :func:`swap_attention` puts one in
place of every ``nn.MultiheadAttention`` of a built model. :func:`to_native` /
:func:`from_native` translate state-dict names between the two layouts.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adaptkit.errors import PluginError
from adaptkit.sites import gated_attention, prepend_kv

_OWN = re.compile(r"(^|\.)in_proj\.(weight|bias)$")
_NATIVE = re.compile(r"(^|\.)in_proj_(weight|bias)$")


class ClipAttention(nn.Module):
    """Multi-head attention computing what ``nn.MultiheadAttention`` computes.

    Called like it (``attn(q, k, v, need_weights=False, attn_mask=mask)``) and returns
    ``(output, None)``. ``kv_site``, once set by an attention site, supplies extra keys
    and values of shape (batch, heads, P, head_dim) that every query may attend to, and
    gated ones whose attention is added to the output (``adaptkit.sites.gated_attention``).
    """

    def __init__(self, dim: int, num_heads: int, bias: bool = True, dropout: float = 0.0, batch_first: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise PluginError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.embed_dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.dropout, self.batch_first = dropout, batch_first
        self.in_proj = nn.Linear(dim, 3 * dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        self.kv_site: Any = None

    @classmethod
    def from_native(cls, native: nn.MultiheadAttention, where: str) -> "ClipAttention":
        """An equivalent module holding copies of ``native``'s weights."""
        if not native._qkv_same_embed_dim or native.bias_k is not None or native.add_zero_attn:
            raise PluginError(
                f"{where}: this nn.MultiheadAttention has separate k/v widths, bias_k/bias_v or zero attention, "
                "which the clip backbone does not support"
            )
        bias = native.in_proj_bias is not None
        module = cls(native.embed_dim, native.num_heads, bias=bias, dropout=native.dropout, batch_first=native.batch_first)
        weight = native.in_proj_weight
        module.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            module.in_proj.weight.copy_(weight)
            module.out_proj.weight.copy_(native.out_proj.weight)
            if bias:
                module.in_proj.bias.copy_(native.in_proj_bias)
                module.out_proj.bias.copy_(native.out_proj.bias)
        module.train(native.training)
        return module

    def _mask(self, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, batch: int, dtype: torch.dtype) -> torch.Tensor | None:
        """An additive float mask (..., L, S) from MultiheadAttention's conventions (bool True = blocked)."""
        mask = None
        if attn_mask is not None:
            mask = attn_mask
            if mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
            mask = mask.to(dtype)
            if mask.dim() == 3:  # (batch * heads, L, S)
                mask = mask.reshape(batch, self.num_heads, *mask.shape[-2:])
        if key_padding_mask is not None:
            pad = key_padding_mask
            if pad.dtype == torch.bool:
                pad = torch.zeros(pad.shape, dtype=dtype, device=pad.device).masked_fill(pad, float("-inf"))
            pad = pad.to(dtype)[:, None, None, :]
            mask = pad if mask is None else mask + pad
        return mask

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        **unused: Any,
    ) -> tuple[torch.Tensor, None]:
        key = query if key is None else key
        value = key if value is None else value
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        B, L, D = query.shape
        heads, hd = self.num_heads, self.head_dim
        if key is query and value is query:
            q, k, v = self.in_proj(query).split(D, dim=-1)
        else:  # cross-attention: each input through the same (hooked) projection, its own rows kept
            q = self.in_proj(query)[..., :D]
            k = self.in_proj(key)[..., D : 2 * D]
            v = self.in_proj(value)[..., 2 * D :]
        S = k.shape[1]
        q = q.reshape(B, L, heads, hd).transpose(1, 2)
        k = k.reshape(B, S, heads, hd).transpose(1, 2)
        v = v.reshape(B, S, heads, hd).transpose(1, 2)
        mask = self._mask(attn_mask, key_padding_mask, B, q.dtype)
        extra = self.kv_site.extra_kv(B) if self.kv_site is not None else None
        if extra is not None:
            k, v = prepend_kv(k, v, extra)
            if mask is not None:  # every query may attend to the extra keys
                mask = torch.cat([mask.new_zeros((*mask.shape[:-1], extra[0].shape[2])), mask], dim=-1)
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        if self.kv_site is not None and self.kv_site.gated:  # gated prefixes: a softmax of their own, times the gate
            gated = gated_attention(self.kv_site, q, dropout)
            if gated is not None:
                out = out + gated
        out = self.out_proj(out.transpose(1, 2).reshape(B, L, D))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    def project_kv(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (heads, P, head_dim) of already-normalised tokens (P, dim)."""
        D = self.embed_dim
        kv = self.in_proj(tokens)[..., D:]
        k, v = kv.split(D, dim=-1)
        P = tokens.shape[0]
        return (k.reshape(P, self.num_heads, self.head_dim).transpose(0, 1),
                v.reshape(P, self.num_heads, self.head_dim).transpose(0, 1))


def swap_attention(root: nn.Module) -> int:
    """Replace every ``nn.MultiheadAttention`` under ``root`` by a :class:`ClipAttention`; return the count.

    The replacements are batch-first; transformers that transposed to (L, B, D) for
    the native module are switched to batch-first too, so the maths is unchanged.
    """
    count = 0
    for name, module in list(root.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.MultiheadAttention):
                where = f"{name}.{child_name}" if name else child_name
                swapped = ClipAttention.from_native(child, where)
                swapped.batch_first = True
                setattr(module, child_name, swapped)
                count += 1
        if hasattr(module, "resblocks") and getattr(module, "batch_first", True) is False:
            module.batch_first = True
    return count


def to_native(state: dict[str, Any]) -> dict[str, Any]:
    """Our names -> open_clip's: ``...attn.in_proj.weight`` -> ``...attn.in_proj_weight``."""
    return {_OWN.sub(r"\1in_proj_\2", k): v for k, v in state.items()}


def from_native(state: dict[str, Any]) -> dict[str, Any]:
    """open_clip's names -> ours (names already ours pass through)."""
    return {_NATIVE.sub(r"\1in_proj.\2", k): v for k, v in state.items()}
