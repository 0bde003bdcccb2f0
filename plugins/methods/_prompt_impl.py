"""Prompt tuning through token sites or attention sites (imports torch)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from adaptkit.errors import CompatibilityError
from adaptkit.method import AppliedMethod
from adaptkit.surface import AttentionSite, PlaceholderSite, PromptSource, Surface, Tower
from adaptkit_plugins.methods.common import attach, host
from adaptkit_plugins.methods.prompt import sites_needed


def _init(tensor: torch.Tensor, how: str, fan_in: int) -> torch.Tensor:
    if how == "uniform":  # VPT: Xavier-uniform over (patch fan-in + width)
        bound = math.sqrt(6.0 / (fan_in + tensor.shape[-1]))
        return nn.init.uniform_(tensor, -bound, bound)
    return nn.init.normal_(tensor, std=0.02)


def _patch_fan_in(tower: Tower) -> int:
    embed = next((s for s in tower.layers if s.role == "embed"), None)
    return int(embed.module.weight[0].numel()) if embed is not None else tower.dim


class SequencePrompts(nn.Module, PromptSource):
    """Prompt tokens for a token site: (layers, count, dim); layer 0 only when shallow."""

    def __init__(self, count: int, dim: int, layers: int, deep: bool, init: str, fan_in: int) -> None:
        super().__init__()
        self.count, self.deep = count, deep
        self.prompts = nn.Parameter(_init(torch.empty(layers if deep else 1, count, dim), init, fan_in))

    def tokens(self, batch: int, layer: int) -> torch.Tensor:
        return self.prompts[layer if self.deep else 0].unsqueeze(0).expand(batch, -1, -1)


class AttentionPrompts(nn.Module):
    """Prompt tokens of one attention site, turned into its keys/values by the frozen layer."""

    def __init__(self, site: AttentionSite, count: int, init: str, fan_in: int) -> None:
        super().__init__()
        self.prompts = nn.Parameter(_init(torch.empty(count, site.dim), init, fan_in))
        self._project = site.project_kv

    def kv(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self._project(self.prompts)
        return k.unsqueeze(0).expand(batch, -1, -1, -1), v.unsqueeze(0).expand(batch, -1, -1, -1)


class PlaceholderEmbedding(nn.Module):
    """One learned word of textual inversion: ``vector`` (dim,) is the token embedding of ``word``."""

    def __init__(self, word: str, initial: torch.Tensor) -> None:
        super().__init__()
        self.word = word
        self.vector = nn.Parameter(initial.detach().clone())

    def extra_repr(self) -> str:
        return f"word={self.word!r}, dim={self.vector.shape[0]}"


def _textual_inversion(params: Any, surface: Surface) -> AppliedMethod:
    """Bind ``params.placeholder`` on every chosen text tower, started from ``initializer_token``."""
    word, start = params.placeholder, params.initializer_token
    added: list[nn.Module] = []
    names, expected = [], 0
    for tower in surface.select(params.tower, "tokens", "prompt"):
        site = tower.tokens
        where = f"tower '{tower.name}' of backbone '{surface.backbone}'"
        if not isinstance(site, PlaceholderSite):
            raise CompatibilityError(f"method 'prompt': placeholder needs a text tower that can learn new words; {where} cannot")
        if site.in_vocabulary(word):
            raise CompatibilityError(
                f"method 'prompt': the placeholder {word!r} is already a token in the vocabulary of {where}; "
                "choose a new word, e.g. '<my-thing>'"
            )
        initial = site.embed_words(start)
        if initial.shape[0] != 1:
            problem = "is not in the vocabulary" if initial.shape[0] == 0 else f"is {initial.shape[0]} tokens"
            raise CompatibilityError(
                f"method 'prompt': initializer_token {start!r} {problem} in {where}; give a word that is one token (e.g. 'digit')"
            )
        module = PlaceholderEmbedding(word, initial[0])
        attach(surface.root, f"placeholder_{tower.name}", module)
        site.bind_placeholder(word, module.vector)
        added.append(module)
        names.append(tower.name)
        expected += site.dim
    summary = f"textual inversion: {word!r} from {start!r} on {', '.join(names)}; {expected:,} parameters"
    return AppliedMethod("prompt", added, summary, expected_parameters=expected)


def _words(params: Any, site: Any, tower: str, backbone: str) -> torch.Tensor | None:
    """The token embeddings of ``params.init_text`` in ``site``'s vocabulary (CoOp's initialisation)."""
    if params.init_text is None:
        return None
    embed_words = getattr(site, "embed_words", None)
    if embed_words is None:
        raise CompatibilityError(
            f"method 'prompt': init_text needs a tower that embeds words; tower '{tower}' of backbone '{backbone}' does not"
        )
    words = embed_words(params.init_text)
    if words.shape[0] == 0:
        raise CompatibilityError(f"method 'prompt': init_text {params.init_text!r} has no tokens")
    return words


def apply(params: Any, surface: Surface) -> AppliedMethod:
    if params.placeholder is not None:
        return _textual_inversion(params, surface)
    kinds = sites_needed(params)
    towers = surface.select(params.tower, kinds, "prompt")
    added: list[nn.Module] = []
    expected = 0
    routes = []
    for tower in towers:
        fan_in = _patch_fan_in(tower)
        if "tokens" in kinds and tower.tokens is not None:
            site = tower.tokens
            words = _words(params, site, tower.name, surface.backbone)
            count = params.tokens if words is None or params.count is not None else words.shape[0]
            if words is not None and words.shape[0] != count:
                raise CompatibilityError(
                    f"method 'prompt': init_text {params.init_text!r} is {words.shape[0]} tokens in tower "
                    f"'{tower.name}', but count is {count}; set count: {words.shape[0]} or leave count out"
                )
            source = SequencePrompts(count, site.dim, site.num_layers, params.deep, params.init, fan_in)
            if words is not None:
                with torch.no_grad():
                    source.prompts.copy_(words.to(source.prompts)[None])
            attach(surface.root, f"prompt_{tower.name}", source)
            site.attach(source)
            added.append(source)
            expected += (site.num_layers if params.deep else 1) * count * site.dim
            routes.append(f"{tower.name}: tokens")
            continue
        for site in tower.attention:
            if site.project_kv is None:
                raise CompatibilityError(
                    f"method 'prompt': attention site '{site.name}' of backbone '{surface.backbone}' cannot project "
                    "prompt tokens (no project_kv); use method 'prefix' there"
                )
            prompts = AttentionPrompts(site, params.tokens, params.init, fan_in)
            attach(host(site.module), "prompt", prompts)
            site.add_kv(prompts.kv)
            added.append(prompts)
            expected += params.tokens * site.dim
        routes.append(f"{tower.name}: attention ({len(tower.attention)} sites)")
    depth = "deep" if params.deep else "shallow"
    count = added[0].count if params.init_text is not None else params.tokens
    summary = f"{count} {depth} prompts; {'; '.join(routes)}; {expected:,} parameters"
    return AppliedMethod("prompt", added, summary, expected_parameters=expected)
