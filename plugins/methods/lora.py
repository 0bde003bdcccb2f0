"""Method ``lora``: low-rank updates W + (alpha / r) * B A on chosen layers (Hu et al., 2021)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

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
    tower: str | list[str] = Field("all", description="which towers: all, or names such as vision / text / unet")
    use_rslora: bool = Field(False, description="scale by alpha / sqrt(r) (rank-stabilised LoRA)")
    init: Literal["kaiming", "gaussian"] = Field("kaiming", description="initialisation of A (B starts at zero)")

    def roles(self, available: set[str] | frozenset[str]) -> list[str]:
        """The roles to adapt: the explicit targets, or the defaults the backbone has."""
        if self.targets is not None:
            return list(self.targets)
        return [r for r in DEFAULT_TARGETS if r in available]


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
        )
    ]
