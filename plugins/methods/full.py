"""Method ``full``: fine-tune every weight, or only chosen roles / modules."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field

from adaptkit.compat import require
from adaptkit.hookspecs import hookimpl
from adaptkit.params import ComponentParams
from adaptkit.records import MethodRecord


class FullParams(ComponentParams):
    """Full fine-tuning (also: training from scratch). Restrict it with roles or regexes."""

    name: Literal["full"] = "full"
    targets: list[str] | None = Field(None, description="only layers with these roles (e.g. [attn.q, mlp.in]); default: every weight")
    target_modules: list[str] = Field(default_factory=list, description="also (or only) modules whose qualified name matches these regexes")
    freeze_embeddings: bool = Field(False, description="keep patch/token/position embeddings frozen")
    tower: str | list[str] = Field("all", description="which towers: all, or names such as vision / text")


def check_full(params: FullParams, backbone: str, towers: Any) -> list[str]:
    if params.targets:
        return require("full", backbone, towers, params.tower, "layers", params.targets)
    return require("full", backbone, towers, params.tower, None)


def apply_full(params: FullParams, surface: Any, ctx: Any) -> Any:
    from adaptkit_plugins.methods._full_impl import apply

    return apply(params, surface)


def full_for_modules(names: list[str]) -> FullParams:
    """Full fine-tuning of exactly the named modules (qualified names), e.g. for PEFT's modules_to_save."""
    if not names:
        raise ValueError("no modules to train")
    return FullParams(target_modules=[f"^{re.escape(name)}$" for name in names])


@hookimpl
def adaptkit_methods() -> list[MethodRecord]:
    return [
        MethodRecord(
            name="full",
            params=FullParams,
            factory=apply_full,
            summary="full fine-tuning: every weight, or only the given roles/modules; optional frozen embeddings",
            check=check_full,
            recommended={"lr": 1e-3, "weight_decay": 0.05},
            for_modules=full_for_modules,
        )
    ]
