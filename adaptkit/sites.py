"""Reusable site implementations for backbone authors (imports torch).

- :func:`index_layers` lists every Linear/Conv2d of a module by qualified name;
- :class:`SequenceTokenSite` inserts prompt tokens into any transformer whose blocks
  map a (batch, tokens, dim) sequence to one of the same shape (ViT, CLIP towers);
- :func:`gated_attention` computes the gated extra keys/values of an attention site.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adaptkit.surface import AttentionSite, PromptSource, TokenSite


def index_layers(root: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    """Every ``nn.Linear`` and ``nn.Conv2d`` under ``root``, keyed by qualified name."""
    return {
        prefix + name: module
        for name, module in root.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d))
    }


def prepend_kv(k: torch.Tensor, v: torch.Tensor, extra: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Put an attention site's extra keys/values (``site.extra_kv(batch)``) before ``k`` and ``v``.

    All are (batch, heads, tokens, head_dim); the extra ones take the dtype of ``k`` / ``v``.
    The caller pads its mask or bias by ``extra[0].shape[2]`` columns on the left.
    """
    pk, pv = extra
    return torch.cat([pk.to(k.dtype), k], dim=2), torch.cat([pv.to(v.dtype), v], dim=2)


def gated_attention(site: AttentionSite, q: torch.Tensor, dropout_p: float = 0.0, scale: float | None = None) -> torch.Tensor | None:
    """The sum of ``gate * softmax(q k^T) v`` over the site's gated providers, or None.

    ``q`` is (batch, heads, N, head_dim); so is the result, to be added to the
    attention output before the heads are merged. A backbone whose attention
    forward adds this sets ``supports_gate=True`` on its sites::

        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        gated = gated_attention(site, q)
        if gated is not None:
            out = out + gated
    """
    total = None
    for provider, gate in site.gated:
        k, v = provider(q.shape[0])
        if k.shape[2] == 0:  # an empty prefix adds nothing (and its softmax would be empty)
            continue
        part = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), dropout_p=dropout_p, scale=scale)
        part = part * gate.to(q.dtype).reshape(1, -1, 1, 1)
        total = part if total is None else total + part
    return total


class SequenceTokenSite(TokenSite):
    """Prompt tokens for a transformer over (batch, tokens, dim) sequences.

    ``entry`` is a module whose output is the embedded sequence (after position
    embeddings); prompts are inserted at index ``insert_at`` (after class/register
    tokens). Deep prompts are replaced before each module of ``blocks``; ``exit``'s
    output has every inserted token removed again, so pooling and heads see the
    original length. ``batch_first=False`` handles (tokens, batch, dim) sequences.
    """

    def __init__(
        self,
        *,
        dim: int,
        entry: nn.Module,
        blocks: Sequence[nn.Module],
        exit: nn.Module,
        insert_at: int | Callable[[], int] = 1,
        batch_first: bool = True,
    ) -> None:
        self.dim = dim
        self.num_layers = len(blocks)
        self._entry, self._blocks, self._exit = entry, list(blocks), exit
        self._insert_at = insert_at
        self._seq_dim = 1 if batch_first else 0
        self._sources: list[PromptSource] = []
        self._handles: list[Any] = []

    @property
    def insert_at(self) -> int:
        return self._insert_at() if callable(self._insert_at) else self._insert_at

    @property
    def total(self) -> int:
        return sum(s.count for s in self._sources)

    def attach(self, source: PromptSource) -> None:
        if not self._handles:
            self._install()
        self._sources.append(source)

    # -- hooks ---------------------------------------------------------------
    def _install(self) -> None:
        self._handles.append(self._entry.register_forward_hook(self._on_entry))
        for index, block in enumerate(self._blocks):
            if index > 0:
                self._handles.append(block.register_forward_pre_hook(self._make_deep_hook(index)))
        self._handles.append(self._exit.register_forward_hook(self._on_exit))

    def _prompts(self, x: torch.Tensor, layer: int, deep_only: bool) -> list[torch.Tensor]:
        batch = x.shape[1 - self._seq_dim]
        out = []
        for source in self._sources:
            if deep_only and not source.deep:
                out.append(None)
                continue
            tokens = source.tokens(batch, layer).to(x.dtype)
            out.append(tokens if self._seq_dim == 1 else tokens.transpose(0, 1))
        return out

    def _on_entry(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        if not self._sources:
            return output
        at, d = self.insert_at, self._seq_dim
        head, tail = output.narrow(d, 0, at), output.narrow(d, at, output.shape[d] - at)
        return torch.cat([head, *self._prompts(output, 0, False), tail], dim=d)

    def _make_deep_hook(self, layer: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> Any:
            if not any(s.deep for s in self._sources):
                return None
            x = args[0]
            at, d = self.insert_at, self._seq_dim
            pieces = [x.narrow(d, 0, at)]
            offset = at
            for source, fresh in zip(self._sources, self._prompts(x, layer, True)):
                pieces.append(fresh if fresh is not None else x.narrow(d, offset, source.count))
                offset += source.count
            pieces.append(x.narrow(d, offset, x.shape[d] - offset))
            return (torch.cat(pieces, dim=d), *args[1:])

        return hook

    def _on_exit(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        if not self._sources:
            return output
        at, d, n = self.insert_at, self._seq_dim, self.total
        return torch.cat([output.narrow(d, 0, at), output.narrow(d, at + n, output.shape[d] - at - n)], dim=d)
