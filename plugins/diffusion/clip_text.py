"""The text tower of Stable Diffusion-style pipelines: transformers' CLIPTextModel and its
tokenizer (imports torch and transformers).

Prompts become the last hidden states of the text encoder, as diffusers' pipelines
compute them (tokens padded to the tokenizer's ``model_max_length``, causal attention,
final layer norm). :class:`PipelineText` runs those steps itself so that the surface's
sites can act between them:

- the token site (:class:`PipelineTextTokens`): learned context tokens after the start
  token (CoOp-style; they join after the position embeddings, so the prompt keeps all
  its positions, and leave again after the final norm, so the UNet attends to the
  pipeline's usual sequence length), and learned placeholder words (textual inversion,
  :class:`adaptkit.surface.PlaceholderSite`);
- attention sites: extra keys/values through an attention function registered with
  transformers' own ``AttentionInterface`` (its extension point for attention), used
  only once a method attaches something, so an unadapted model keeps the native path;
- the text site: templates rewrite every prompt (``system_prompt``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adaptkit.sites import SequenceTokenSite, gated_attention, index_layers, prepend_kv
from adaptkit.surface import AttentionSite, BlockSite, LayerSite, TextSite, Tower

SITE_ATTENTION = "adaptkit_sites"


class PipelineTextTokens(SequenceTokenSite):
    """Context tokens (after the start token) and placeholder words (textual inversion) of a CLIPTextModel."""

    def __init__(self, text: "PipelineText") -> None:
        model = text.model
        super().__init__(dim=model.config.hidden_size, entry=model.embeddings, blocks=list(model.encoder.layers),
                         exit=model.final_layer_norm, insert_at=1)
        self._text = text
        self._token_embedding = model.embeddings.token_embedding
        self.placeholders: dict[int, nn.Parameter] = {}

    # PlaceholderSite -----------------------------------------------------------
    def in_vocabulary(self, word: str) -> bool:
        """True when the tokenizer has ``word`` as a vocabulary entry (diffusers' own refusal) or
        encodes it as one token (a learned word would shadow that token)."""
        tokenizer = self._text.tokenizer
        return word in tokenizer.get_vocab() or len(tokenizer(word, add_special_tokens=False).input_ids) == 1

    @torch.no_grad()
    def embed_words(self, text: str) -> torch.Tensor:
        ids = torch.tensor(self._text.tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
        return self.embed(ids[None].to(self._token_embedding.weight.device))[0].detach().clone()

    def bind_placeholder(self, word: str, vector: nn.Parameter) -> None:
        tokenizer = self._text.tokenizer
        tokenizer.add_tokens([word])
        self.placeholders[int(tokenizer.convert_tokens_to_ids(word))] = vector
        self._text.forget_tokens()

    # used by PipelineText ------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings of ``ids`` (B, L), the placeholders' learned vectors where they occur."""
        table = self._token_embedding
        if not self.placeholders:
            return table(ids)
        x = table(ids.clamp(max=table.num_embeddings - 1))
        for token, vector in self.placeholders.items():
            x = torch.where((ids == token)[..., None], vector.to(x.dtype), x)
        return x


class PipelineText:
    """Encodes prompts with a pipeline's CLIPTextModel ``model`` and CLIPTokenizer ``tokenizer``.

    Not a module: the model is registered by the backbone (as ``text_encoder``), so its
    parameter names are the pipeline's own.
    """

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.site = TextSite()
        self.tokens = PipelineTextTokens(self)
        self._ids: dict[str, torch.Tensor] = {}

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)

    def forget_tokens(self) -> None:
        self._ids.clear()

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids (n, model_max_length), padded and truncated as diffusers' pipelines do."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._ids]
        if missing:  # captions repeat from step to step: tokenize each distinct text once
            ids = self.tokenizer(missing, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            self._ids.update(zip(missing, ids))
            if len(self._ids) > 4096:
                self._ids = dict(list(self._ids.items())[-2048:])
        return torch.stack([self._ids[t] for t in texts])

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """The last hidden states (n, L, width) of the prompts after the text site's templates."""
        model = self.model
        device = model.embeddings.token_embedding.weight.device
        ids = self.tokenize(self.site.apply(list(prompts))).to(device)
        x = model.embeddings(inputs_embeds=self.tokens.embed(ids))  # (+ the token site's context)
        length = x.shape[1]
        mask = torch.full((length, length), torch.finfo(x.dtype).min, device=device, dtype=x.dtype).triu(1)[None, None]
        for layer in model.encoder.layers:
            x = layer(x, mask)
        return model.final_layer_norm(x)

    # surface --------------------------------------------------------------------
    def tower(self, prefix: str) -> Tower:
        """The ``text`` tower; parameter names under ``prefix`` (``text_encoder.``)."""
        layers, blocks, attention = [], [], []
        for index, layer in enumerate(self.model.encoder.layers):
            at = f"{prefix}encoder.layers.{index}."
            attn = layer.self_attn
            for role, child in (("attn.q", "q_proj"), ("attn.k", "k_proj"), ("attn.v", "v_proj"), ("attn.out", "out_proj")):
                layers.append(LayerSite(at + "self_attn." + child, role, getattr(attn, child)))
            layers.append(LayerSite(at + "mlp.fc1", "mlp.in", layer.mlp.fc1))
            layers.append(LayerSite(at + "mlp.fc2", "mlp.out", layer.mlp.fc2))
            blocks.append(BlockSite(at[:-1], self.width, attn_output=attn.out_proj, mlp_output=layer.mlp, mlp_input=layer.mlp,
                                    norms=[layer.layer_norm1, layer.layer_norm2]))
            attention.append(AttentionSite(
                at + "self_attn", attn, self.width, attn.num_heads, attn.head_dim, install=self._install,
                project_kv=_project_kv(layer), supports_gate=True,
            ))
        embeddings = [f"{prefix}embeddings.token_embedding.weight", f"{prefix}embeddings.position_embedding.weight"]
        return Tower(name="text", dim=self.width, modality="text", layers=layers, blocks=blocks, attention=attention,
                     tokens=self.tokens, text=self.site, embeddings=embeddings, param_prefixes=[prefix],
                     modules=index_layers(self.model, prefix))

    def _install(self, site: AttentionSite) -> None:
        _register_attention()
        site.module.__dict__["adaptkit_site"] = site  # a plain attribute: no module, no state-dict entry
        self.model.config._attn_implementation = SITE_ATTENTION


def _project_kv(layer: nn.Module) -> Any:
    def project_kv(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attn = layer.self_attn
        tokens = layer.layer_norm1(tokens)  # the pre-norm the layer applies to its own tokens
        k = attn.k_proj(tokens).view(tokens.shape[0], attn.num_heads, -1).transpose(0, 1)
        v = attn.v_proj(tokens).view(tokens.shape[0], attn.num_heads, -1).transpose(0, 1)
        return k, v

    return project_kv


def _site_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention function with an attention site's extra keys/values."""
    site = module.__dict__.get("adaptkit_site")
    extra = site.extra_kv(query.shape[0]) if site is not None else None
    if extra is not None:
        key, value = prepend_kv(key, value, extra)
        if attention_mask is not None:
            attention_mask = F.pad(attention_mask, (extra[0].shape[2], 0), value=0.0)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    if site is not None:
        gated = gated_attention(site, query, scale=scaling)
        if gated is not None:
            out = out + gated
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(SITE_ATTENTION, _site_attention)
