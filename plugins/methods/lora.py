"""Method ``lora``: low-rank updates W + (alpha / r) * B A on chosen layers (Hu et al., 2021)."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Literal

from pydantic import Field, field_validator

from adaptkit.compat import require
from adaptkit.hookspecs import hookimpl
from adaptkit.params import ComponentParams
from adaptkit.records import MethodRecord

#: roles LoRA adapts when ``targets`` is left unset (those the backbone has)
DEFAULT_TARGETS = ("attn.q", "attn.k", "attn.v", "attn.out", "mlp.in", "mlp.out")


class LoraParams(ComponentParams):
    """Low-rank adaptation of Linear and Conv2d layers, by role or module regex."""

    name: Literal["lora"] = "lora"
    rank: int = Field(8, gt=0, le=4096, description="rank r of the update")
    alpha: float | None = Field(None, gt=0, description="scale numerator: the update is (alpha / r) B A; default 2 * rank")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA branch's input")
    targets: list[str] | None = Field(
        None,
        description="roles to adapt, e.g. [attn.q, attn.v] (q/v slices of a fused qkv); "
        "default: attn.q/k/v/out and mlp.in/out where present",
    )
    target_modules: list[str] = Field(default_factory=list, description="also adapt whole modules whose qualified name matches these regexes")
    rank_pattern: dict[str, int] = Field(
        default_factory=dict,
        description="per-layer ranks: {regex: rank}; the first regex found in a layer's qualified name sets its rank",
    )
    alpha_pattern: dict[str, float] = Field(
        default_factory=dict,
        description="per-layer alphas: {regex: alpha}, as rank_pattern (default alpha: the layer's 2 * rank when alpha is unset)",
    )
    tower: str | list[str] = Field("all", description="which towers: all, or names such as vision / text / unet")
    use_rslora: bool = Field(False, description="scale by alpha / sqrt(r) (rank-stabilised LoRA)")
    init: Literal["kaiming", "gaussian"] = Field("kaiming", description="initialisation of A (B starts at zero)")

    @field_validator("target_modules")
    @classmethod
    def _regexes(cls, value: list[str]) -> list[str]:
        for pattern in value:
            _compile(pattern)
        return value

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _pattern_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        for pattern, number in value.items():
            _compile(pattern)
            if number <= 0:
                raise ValueError(f"'{pattern}': must be > 0, got {number}")
        return value

    def roles(self, available: set[str] | frozenset[str]) -> list[str]:
        """The roles to adapt: the explicit targets, or the defaults the backbone has."""
        if self.targets is not None:
            return list(self.targets)
        return [r for r in DEFAULT_TARGETS if r in available]

    def rank_for(self, layer: str) -> int:
        """The rank of the layer with qualified name ``layer``."""
        return int(_lookup(self.rank_pattern, layer, self.rank))

    def alpha_for(self, layer: str) -> float:
        """The alpha of the layer with qualified name ``layer``."""
        default = self.alpha if self.alpha is not None else 2.0 * self.rank_for(layer)
        return float(_lookup(self.alpha_pattern, layer, default))


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"'{pattern}' is not a valid regular expression ({exc})") from None


def _lookup(patterns: dict[str, Any], layer: str, default: Any) -> Any:
    for pattern, value in patterns.items():
        if re.search(pattern, layer):
            return value
    return default


def check_lora(params: LoraParams, backbone: str, towers: Any) -> list[str]:
    from adaptkit.compat import tower_names

    names = tower_names(params.tower, towers) or []
    available = set().union(*(towers[n].roles for n in names)) if names else set()
    roles = params.roles(available)
    problems = require("lora", backbone, towers, params.tower, "layers", roles)
    if not problems and not roles and not params.target_modules:
        problems.append(f"method 'lora': backbone '{backbone}' has none of the default roles; give targets or target_modules")
    return problems


def apply_lora(params: LoraParams, surface: Any, ctx: Any) -> Any:
    from adaptkit_plugins.methods._lora_impl import apply

    return apply(params, surface)


def lora_for_layers(layers: dict[str, tuple[int, float]], dropout: float = 0.0, use_rslora: bool = False) -> LoraParams:
    """LoRA params that adapt exactly the named layers (whole layers), each with its (rank, alpha).

    The most common rank and alpha become ``rank`` / ``alpha``; the others go into
    ``rank_pattern`` / ``alpha_pattern`` with anchored regexes. Used by PEFT imports
    and adapter combinations, which thereby become ordinary LoRA specs.
    """
    if not layers:
        raise ValueError("no layers to adapt")
    rank = Counter(r for r, _ in layers.values()).most_common(1)[0][0]
    alpha = Counter(a for _, a in layers.values()).most_common(1)[0][0]
    exact = {name: f"^{re.escape(name)}$" for name in layers}
    return LoraParams(
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        targets=[],
        target_modules=list(exact.values()),
        rank_pattern={exact[n]: r for n, (r, _) in layers.items() if r != rank},
        alpha_pattern={exact[n]: a for n, (_, a) in layers.items() if a != alpha},
        use_rslora=use_rslora,
    )


@hookimpl
def adaptkit_methods() -> list[MethodRecord]:
    return [
        MethodRecord(
            name="lora",
            params=LoraParams,
            factory=apply_lora,
            summary="low-rank updates of Linear/Conv2d layers by role (q/v slices of fused qkv too); mergeable",
            check=check_lora,
            recommended={"lr": 1e-2, "weight_decay": 0.0},
            example={"rank": 2},
            for_layers=lora_for_layers,
        )
    ]
