"""Method ``prefix``: learned keys and values prepended at every attention site (Li & Liang, 2021).

Every attention call of the chosen towers gets ``length`` extra key/value vectors of
its own (per layer, per head). On Swin they join every window's keys and values.
``reparameterize`` trains them through an MLP from a small embedding, as Li & Liang
do for stability. A plain prefix takes a share of every softmax, so it changes the
model's output from the first step; ``gate: true`` gives the prefix a softmax of its
own scaled by a per-head gate that starts at zero (zero-init attention, LLaMA-Adapter),
so training starts exactly at the base model.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from adaptkit.compat import require
from adaptkit.hookspecs import hookimpl
from adaptkit.params import ComponentParams
from adaptkit.records import MethodRecord


class PrefixParams(ComponentParams):
    """Prefix tuning: trainable key/value vectors at every attention site."""

    name: Literal["prefix"] = "prefix"
    length: int = Field(8, ge=0, description="prefix vectors per attention call (0 leaves the model unchanged)")
    reparameterize: bool = Field(False, description="train the prefixes through an MLP from a small embedding (Li & Liang)")
    hidden: int = Field(64, gt=0, description="width of the reparameterisation embedding and MLP")
    init_std: float = Field(0.5, ge=0, description="standard deviation of the initial keys and values (or embedding)")
    gate: bool = Field(False, description="own softmax times a zero-initialised per-head gate: start exactly at the base model")
    layers: list[int] | None = Field(None, description="only these attention sites of each tower (0 = first, -1 = last); default all")
    tower: str | list[str] = Field("all", description="which towers: all, or names such as vision / text / unet")

    @model_validator(mode="after")
    def _check_layers(self) -> "PrefixParams":
        if self.layers is not None and not self.layers:
            raise ValueError("layers: give at least one index, or leave it unset for every attention site")
        return self


def check_prefix(params: PrefixParams, backbone: str, towers: Any) -> list[str]:
    return require("prefix", backbone, towers, params.tower, "attention")


def apply_prefix(params: PrefixParams, surface: Any, ctx: Any) -> Any:
    from adaptkit_plugins.methods._prefix_impl import apply

    return apply(params, surface)


@hookimpl
def adaptkit_methods() -> list[MethodRecord]:
    return [
        MethodRecord(
            name="prefix",
            params=PrefixParams,
            factory=apply_prefix,
            summary="prefix tuning: learned keys/values at every attention site (MLP reparameterisation, zero-init gate)",
            check=check_prefix,
            recommended={"lr": 3e-2, "weight_decay": 0.0},
            example={"length": 4},
        )
    ]
