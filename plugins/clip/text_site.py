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

The site also learns new words (textual inversion, :class:`~adaptkit.surface.PlaceholderSite`):
a text that contains a bound placeholder is tokenized piece by piece around it, and
the placeholder becomes one token whose id is negative (-1 for the first placeholder,
-2 for the second, ...). Negative ids never win the end-token ``argmax``; the
embedding step looks them up in the learned vectors instead of the vocabulary.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from adaptkit.errors import CompatibilityError
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
        self._placeholders: dict[str, nn.Parameter] = {}
        self._placeholder_pattern: re.Pattern[str] | None = None
        self._placeholder_seen = False

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
        words = torch.tensor(self._word_ids(text), dtype=torch.long, device=self._token_embedding.weight.device)
        return self._token_embedding(words).detach().clone()

    # -- placeholders (textual inversion) ------------------------------------------
    def in_vocabulary(self, word: str) -> bool:
        """Whether the tokenizer already reads ``word`` as one token (start, word, end)."""
        return int(self._tokenize([word])[0].argmax()) == 2

    def bind_placeholder(self, word: str, vector: nn.Parameter) -> None:
        """Encode ``word`` as one token with embedding ``vector`` (dim,) in every text from now on."""
        if word in self._placeholders:
            raise CompatibilityError(f"the placeholder {word!r} is already bound on this text tower")
        self._placeholders[word] = vector
        # the longest first, so that "<cat>" inside "<cat-toy>" does not split it
        alternatives = sorted(self._placeholders, key=len, reverse=True)
        self._placeholder_pattern = re.compile("|".join(re.escape(w) for w in alternatives))

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids (n, context_length) of ``texts``; bound placeholders get negative ids."""
        pattern = self._placeholder_pattern
        if pattern is None:
            return self._tokenize(texts)
        ids = self._tokenize(texts)
        found = [i for i, text in enumerate(texts) if pattern.search(text)]
        if not found:
            self._warn_missing(texts)
            return ids
        self._placeholder_seen = True
        ids = ids.clone()
        for row in found:
            ids[row] = self._split_ids(texts[row], pattern, ids.shape[1]).to(ids.device)
        return ids

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (n, L, dim) of ``ids``, with the learned vector at each placeholder id."""
        if not self._placeholders or not bool((ids < 0).any()):
            return self._token_embedding(ids)
        x = self._token_embedding(ids.clamp(min=0))
        for index, vector in enumerate(self._placeholders.values()):
            here = (ids == -(index + 1)).unsqueeze(-1)
            x = torch.where(here, vector.to(x.dtype), x)
        return x

    def _split_ids(self, text: str, pattern: re.Pattern[str], length: int) -> torch.Tensor:
        """The ids of one text with placeholders, as the tokenizer would give with them as added tokens."""
        ids: list[int] = []
        index = {word: -(i + 1) for i, word in enumerate(self._placeholders)}
        start = 0
        for match in pattern.finditer(text):
            ids += self._word_ids(text[start:match.start()])
            ids.append(index[match.group(0)])
            start = match.end()
        ids += self._word_ids(text[start:])
        empty = self._tokenize([""])[0]  # [start, end, padding...]
        begin, end, pad = int(empty[0]), int(empty[1]), int(empty[2]) if length > 2 else 0
        row = [begin, *ids, end][:length]
        row[-1] = end  # the tokenizer's own truncation keeps the end token last
        return torch.tensor(row + [pad] * (length - len(row)), dtype=torch.long)

    def _word_ids(self, piece: str) -> list[int]:
        if not piece.strip():
            return []
        ids = self._tokenize([piece])[0]
        return ids[1:int(ids.argmax())].tolist()

    def _warn_missing(self, texts: Sequence[str]) -> None:
        # the first training batch (gradients on, several captions) lacks the word: its vector cannot train
        if self._placeholder_seen or len(texts) < 2 or not torch.is_grad_enabled():
            return
        if not any(v.requires_grad for v in self._placeholders.values()):
            return
        self._placeholder_seen = True  # warn once
        words = ", ".join(repr(w) for w in self._placeholders)
        warnings.warn(
            f"textual inversion: no caption of this training batch contains the placeholder {words}; its learned "
            f"embedding only trains on texts that contain it (e.g. caption: 'a photo of {next(iter(self._placeholders))}')",
            stacklevel=2,
        )

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
