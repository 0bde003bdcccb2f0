"""The text token site of a CLIP text tower: CoOp-style learned context (imports torch).

CoOp (Zhou et al., 2022) replaces the words of a hand-made template with learned
vectors in token-embedding space: ``[SOS] v_1 ... v_M <class name>. [EOS]``. Here
the entry prompts of every attached :class:`~adaptkit.surface.PromptSource` go right
after the start token, *before* position embeddings are added (as CoOp does), and
the sequence is cut back to the context length, so the causal mask and position
table keep their size. End-of-text pooling moves with the text: its index shifts by
the number of context tokens; when the shift would push the end token past the
context length, the end token takes the last position, as the tokenizer does when it
truncates. Deep prompts (``source.deep``) replace the context positions again
before every later block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from adaptkit.surface import PromptSource, TokenSite

#: how each open_clip text pooling finds its token
SHIFTING_POOLS = ("argmax", "eos")


class TextTokenSite(TokenSite):
    """Learned context tokens for a causal text transformer (see the module docstring)."""

    def __init__(
        self,
        *,
        dim: int,
        blocks: Sequence[nn.Module],
        token_embedding: nn.Embedding,
        tokenize: Callable[[Sequence[str]], torch.Tensor],
    ) -> None:
        self.dim = dim
        self.num_layers = len(blocks)
        self._blocks = list(blocks)
        self._token_embedding = token_embedding
        self._tokenize = tokenize
        self._sources: list[PromptSource] = []
        self._handles: list[Any] = []

    @property
    def total(self) -> int:
        """How many context tokens every text receives."""
        return sum(s.count for s in self._sources)

    def attach(self, source: PromptSource) -> None:
        if not self._handles:
            for index, block in enumerate(self._blocks):
                if index > 0:
                    self._handles.append(block.register_forward_pre_hook(self._make_deep_hook(index)))
        self._sources.append(source)

    @torch.no_grad()
    def embed_words(self, text: str) -> torch.Tensor:
        """Token embeddings (n, dim) of ``text``'s words, without start/end tokens.

        The CoOp initialisation "a photo of a": context vectors that equal these
        embeddings make the learner reproduce the hand-written template exactly.
        """
        ids = self._tokenize([text])[0]
        eot = int(ids.argmax())
        words = ids[1:eot].to(self._token_embedding.weight.device)
        return self._token_embedding(words).detach().clone()

    # -- used by the backbone's text encoder -------------------------------------
    def insert(self, x: torch.Tensor, pool_index: torch.Tensor, pool_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Insert the entry context into token embeddings ``x`` (B, L, D) after position 0.

        Returns the new (B, L, D) sequence and where pooling now reads each row.
        """
        if not self._sources:
            return x, pool_index
        batch, length = x.shape[:2]
        prompts = [s.tokens(batch, 0).to(dtype=x.dtype, device=x.device) for s in self._sources]
        total = sum(p.shape[1] for p in prompts)
        joined = torch.cat([x[:, :1], *prompts, x[:, 1:]], dim=1)[:, :length]
        if pool_type not in SHIFTING_POOLS:
            return joined, pool_index
        shifted = pool_index + total
        overflow = shifted >= length
        if bool(overflow.any()):
            # the end token was cut off: put it at the last position (the tokenizer's own truncation)
            rows = overflow.nonzero(as_tuple=True)[0]
            end_tokens = x[rows, pool_index[rows]]
            joined = joined.clone()
            joined[rows, length - 1] = end_tokens
            shifted = torch.where(overflow, torch.full_like(shifted, length - 1), shifted)
        return joined, shifted

    def _make_deep_hook(self, layer: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> Any:
            if not any(s.deep for s in self._sources):
                return None
            x = args[0]
            batch, length = x.shape[:2]
            pieces, offset = [x[:, :1]], 1
            for source in self._sources:
                stop = min(offset + source.count, length)
                if source.deep:
                    fresh = source.tokens(batch, layer).to(dtype=x.dtype, device=x.device)
                    pieces.append(fresh[:, : stop - offset])
                else:
                    pieces.append(x[:, offset:stop])
                offset = stop
            pieces.append(x[:, offset:])
            return (torch.cat(pieces, dim=1), *args[1:])

        return hook
