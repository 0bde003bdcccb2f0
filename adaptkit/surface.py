"""The adaptation surface: where a backbone can be adapted (see design.md).

A backbone describes its model as named :class:`Tower` objects (``vision``, ``text``,
``unet``, ...). Each tower lists, in forward order, the sites a method may use:

- ``layers``: Linear/Conv2d layers tagged with a role (``attn.q``, ``mlp.in``, ...);
  a role may be a slice of output rows of a fused layer (q inside ``qkv``);
- ``blocks``: residual blocks, with the modules whose outputs are the attention and
  MLP sub-layer outputs (before the residual add), for bottleneck adapters;
- ``attention``: attention calls that accept extra key/value vectors (prefix tuning);
- ``tokens``: a place where extra tokens join the sequence (prompt tuning);
- ``text``: the text the tower is fed, rewritten by templates.

Methods only ever talk to these objects, which is what lets any method compose with
any backbone. Names are qualified module names inside the built model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from adaptkit.errors import CompatibilityError
from adaptkit.records import SITE_KINDS
from adaptkit.towers import resolve_towers

if TYPE_CHECKING:
    import torch


@dataclass
class LayerSite:
    """A Linear or Conv2d layer with a role; ``rows`` = (start, stop) of its outputs for fused layers."""

    name: str
    role: str
    module: Any
    rows: tuple[int, int] | None = None

    @property
    def out_size(self) -> int:
        if self.rows is not None:
            return self.rows[1] - self.rows[0]
        weight = self.module.weight
        return int(weight.shape[0])

    @property
    def in_size(self) -> int:
        return int(self.module.weight.shape[1])


@dataclass
class BlockSite:
    """A residual block. ``attn_output``/``mlp_output`` are modules whose *outputs* are
    the attention and MLP sub-layer outputs before the residual add (either may be None);
    ``mlp_input`` and ``norms`` are optional extras for methods that need them."""

    name: str
    dim: int
    attn_output: Any = None
    mlp_output: Any = None
    #: channel axis of the sub-layer outputs: -1 for (..., C) tokens, 1 for (B, C, H, W) maps
    channel_dim: int = -1
    #: module whose *input* is the MLP sub-layer's input (parallel adapters read it); None if unknown
    mlp_input: Any = None
    #: the block's own normalisation layers, each of width ``dim`` (e.g. the LayerNorms before
    #: attention and MLP), which adapters may train too (Houlsby et al.); empty if unknown
    norms: list[Any] = field(default_factory=list)


KVProvider = Callable[[int], tuple[Any, Any]]


@dataclass(eq=False)
class AttentionSite:
    """An attention call that can take extra keys and values.

    The backbone supplies ``install(site)``, which makes the attention module consult
    :meth:`extra_kv` on every call (it is run once, when the first provider arrives,
    so unadapted models keep their native fast path), and ``project_kv(tokens)``,
    which maps extra *tokens* (P, dim) through the layer's own (frozen) norm and k/v
    projections to (k, v) of shape (heads, P, head_dim).
    """

    name: str
    module: Any
    dim: int
    num_heads: int
    head_dim: int
    install: Callable[["AttentionSite"], None]
    project_kv: Callable[[Any], tuple[Any, Any]] | None = None
    providers: list[KVProvider] = field(default_factory=list)
    #: whether the installed forward also honours gated providers (it adds
    #: :func:`adaptkit.sites.gated_attention` to its output)
    supports_gate: bool = False
    gated: list[tuple[KVProvider, Any]] = field(default_factory=list)
    _installed: bool = False

    def add_kv(self, provider: KVProvider, gate: Any = None) -> None:
        """Register ``provider(batch) -> (k, v)``, each (batch, heads, P, head_dim).

        Plain providers join the layer's own keys and values in one softmax. With a
        ``gate`` (a tensor of shape (heads,) or ()), the keys and values get a softmax
        of their own and ``gate * attention`` is added to the output instead
        (zero-init attention, as in LLaMA-Adapter): a gate that starts at zero leaves
        the model's output exactly as it was.
        """
        if gate is not None and not self.supports_gate:
            raise CompatibilityError(
                f"attention site '{self.name}' cannot take gated keys/values (its backbone does not support them)"
            )
        if not self._installed:
            self.install(self)
            self._installed = True
        if gate is None:
            self.providers.append(provider)
        else:
            self.gated.append((provider, gate))

    def extra_kv(self, batch: int) -> tuple[Any, Any] | None:
        """The extra (k, v) of every provider, concatenated along the sequence axis, or None."""
        if not self.providers:
            return None
        import torch

        pairs = [provider(batch) for provider in self.providers]
        if len(pairs) == 1:
            return pairs[0]
        return torch.cat([k for k, _ in pairs], dim=2), torch.cat([v for _, v in pairs], dim=2)


class PromptSource:
    """Something that supplies prompt tokens to a :class:`TokenSite`.

    ``count`` tokens; ``deep`` means fresh tokens before every block (VPT-deep);
    ``tokens(batch, layer)`` returns (batch, count, dim) for block ``layer`` (0 = entry).
    """

    count: int
    deep: bool

    def tokens(self, batch: int, layer: int) -> Any:  # pragma: no cover - interface
        raise NotImplementedError


class TokenSite:
    """Where extra tokens join a tower's sequence. Backbones subclass this."""

    dim: int
    num_layers: int

    def attach(self, source: PromptSource) -> None:  # pragma: no cover - interface
        raise NotImplementedError


@runtime_checkable
class PlaceholderSite(Protocol):
    """A text token site that learns new words: textual inversion (Gal et al., 2022).

    The ``prompt`` method with ``placeholder: "<my-thing>"`` asks the text tower's
    :class:`TokenSite` for this capability with ``isinstance``. Members:

    - ``in_vocabulary(word) -> bool``: the tower's tokenizer already has ``word`` as one
      token (a placeholder must be new: diffusers refuses such a token too);
    - ``embed_words(text) -> Tensor (n, dim)``: the token embeddings of ``text``'s words,
      without start/end tokens (the placeholder's initial value comes from these);
    - ``bind_placeholder(word, vector)``: from now on every text that contains ``word``
      is encoded with the learned ``vector`` (dim,) as that word's single token
      embedding, wherever the word occurs; the base vocabulary and weights are untouched.
    """

    def in_vocabulary(self, word: str) -> bool: ...

    def embed_words(self, text: str) -> torch.Tensor: ...

    def bind_placeholder(self, word: str, vector: torch.nn.Parameter) -> None: ...


class TextSite:
    """The text a tower is fed. Methods add ``transforms``, applied in order.

    A transform maps one text to one text (``"7" -> "a photo of a 7."``), or to a
    list of variants (a template ensemble); a tower that encodes text averages the
    normalised embeddings of every variant of an input (see :meth:`expand`).
    """

    def __init__(self) -> None:
        self.transforms: list[Callable[[str], str | list[str]]] = []

    def add(self, transform: Callable[[str], str | list[str]]) -> None:
        self.transforms.append(transform)

    def expand(self, text: str) -> list[str]:
        """Every variant of ``text`` after all transforms (one unless a transform is an ensemble).

        Example: with templates ``["a {label}.", "the {label}."]``,
        ``site.expand("7") == ["a 7.", "the 7."]``.
        """
        variants = [text]
        for transform in self.transforms:
            out: list[str] = []
            for variant in variants:
                result = transform(variant)
                out += [result] if isinstance(result, str) else list(result)
            variants = out
        return variants

    def apply(self, texts: Sequence[str]) -> list[str]:
        """One rewritten text per input; an error if a transform yields several variants."""
        out = []
        for text in texts:
            variants = self.expand(text)
            if len(variants) != 1:
                raise CompatibilityError(
                    f"the text {text!r} becomes {len(variants)} variants (a template ensemble); "
                    "encode it with the backbone's encode_text, which averages their embeddings"
                )
            out.append(variants[0])
        return out


@dataclass
class Tower:
    """One named tower of a backbone and its sites, in forward order."""

    name: str
    dim: int
    modality: str = "image"
    layers: list[LayerSite] = field(default_factory=list)
    blocks: list[BlockSite] = field(default_factory=list)
    attention: list[AttentionSite] = field(default_factory=list)
    tokens: TokenSite | None = None
    text: TextSite | None = None
    #: qualified names of the embedding parameters (patch/token/position embeddings)
    embeddings: list[str] = field(default_factory=list)
    #: qualified-name prefixes of every parameter that belongs to the tower
    param_prefixes: list[str] = field(default_factory=list)
    #: every Linear/Conv2d of the tower by qualified name (for ``target_modules`` regexes)
    modules: dict[str, Any] = field(default_factory=dict)

    def has(self, site_kind: str) -> bool:
        value = getattr(self, site_kind)
        return bool(value) if isinstance(value, list) else value is not None

    def roles(self) -> set[str]:
        return {site.role for site in self.layers}

    def prefixed(self, prefix: str) -> "Tower":
        """A copy whose names are qualified by ``prefix`` (e.g. ``backbone.``)."""
        return replace(
            self,
            layers=[replace(s, name=prefix + s.name) for s in self.layers],
            blocks=[replace(s, name=prefix + s.name) for s in self.blocks],
            attention=list(self.attention),
            embeddings=[prefix + n for n in self.embeddings],
            param_prefixes=[prefix + p for p in self.param_prefixes],
            modules={prefix + n: m for n, m in self.modules.items()},
        )


@dataclass
class Surface:
    """All towers of a built model; what methods are applied to."""

    backbone: str
    towers: dict[str, Tower]
    #: the built model the names are qualified in (set by the task model)
    root: Any = None

    def tower_parameters(self, tower: Tower) -> dict[str, Any]:
        """Every parameter of ``tower`` by qualified name."""
        if self.root is None:
            raise CompatibilityError("this surface is not attached to a built model")
        return {
            name: p for name, p in self.root.named_parameters()
            if any(name.startswith(prefix) for prefix in tower.param_prefixes)
        }

    def select(self, tower: str | Sequence[str] | None, site_kind: str | Sequence[str] | None, method: str) -> list[Tower]:
        """Towers named by a method's ``tower`` option that offer ``site_kind`` (or any of several
        kinds; None: any tower), by :func:`adaptkit.towers.resolve_towers`, the rule validation uses.

        ``"all"``/``"both"``/None means every tower offering the site. Raises
        :class:`CompatibilityError` naming the method, backbone and missing site.
        """
        kinds = None if site_kind is None else [site_kind] if isinstance(site_kind, str) else list(site_kind)
        offers = {name: [k for k in SITE_KINDS if t.has(k)] for name, t in self.towers.items()}
        return [self.towers[name] for name in resolve_towers(tower, offers, kinds, method, self.backbone)]

    def layer_sites(
        self,
        towers: Iterable[Tower],
        roles: Sequence[str] | None,
        patterns: Sequence[str] = (),
        method: str = "",
    ) -> list[LayerSite]:
        """Layer sites with one of ``roles`` or whose name matches a regex in ``patterns``.

        A role no chosen tower has is an error naming the method, backbone and role;
        so is a pattern that matches nothing.
        """
        towers = list(towers)
        found: list[LayerSite] = []
        if roles:
            available = set().union(*(t.roles() for t in towers)) if towers else set()
            for role in roles:
                if role not in available:
                    from adaptkit.errors import did_you_mean

                    raise CompatibilityError(
                        f"method '{method}': backbone '{self.backbone}' has no layers with role '{role}'"
                        f"{did_you_mean(role, available)}; roles: {', '.join(sorted(available))}"
                    )
            found += [s for t in towers for s in t.layers if s.role in roles]
        for pattern in patterns:
            regex = re.compile(pattern)
            # a pattern selects whole modules, not row slices
            whole = {n: LayerSite(n, "module", m) for t in towers for n, m in t.modules.items() if regex.search(n)}
            if not whole:
                raise CompatibilityError(
                    f"method '{method}': target_modules pattern '{pattern}' matches no layer of backbone '{self.backbone}'"
                )
            found += list(whole.values())
        seen: set[tuple[str, Any]] = set()
        unique = []
        for s in found:
            key = (s.name, s.rows)
            if key not in seen:
                seen.add(key)
                unique.append(s)
        return unique
