"""Method ``adapter``: bottleneck adapters inside residual blocks (Houlsby et al., 2019; Pfeiffer et al., 2021).

Each adapter maps a sub-layer's output ``h`` to ``h + scale * up(act(down(h)))``,
before the block's residual add. The up-projection starts at zero, so training starts
from the base model's function. Placement ``houlsby`` puts one after the attention and
one after the MLP of every block; ``pfeiffer`` only after the MLP; ``parallel`` adds
``scale * up(act(down(x)))`` of the MLP's input ``x`` to the MLP's output (He et al.,
2022, "Towards a Unified View of Parameter-Efficient Transfer Learning", use scale 4).
By default the adapted blocks' norms train too (Houlsby et al. do; on the digits
benchmark it is worth 4-5 points, see BENCHMARKS.md). Works on token sequences (..., C)
and on convolutional feature maps (B, C, H, W) alike.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from adaptkit.compat import require
from adaptkit.hookspecs import hookimpl
from adaptkit.params import ComponentParams
from adaptkit.records import MethodRecord


class AdapterParams(ComponentParams):
    """Bottleneck adapters (down-projection, nonlinearity, zero-initialised up-projection, skip)."""

    name: Literal["adapter"] = "adapter"
    placement: Literal["houlsby", "pfeiffer", "parallel"] = Field(
        "houlsby",
        description="houlsby: after attention and after MLP; pfeiffer: after the MLP only; "
        "parallel: beside the MLP, reading its input (He et al., 2022)",
    )
    reduction_factor: int = Field(16, gt=0, description="bottleneck = block width // reduction_factor (at least 1)")
    bottleneck: int | None = Field(None, gt=0, description="a fixed bottleneck size for every block (overrides reduction_factor)")
    activation: Literal["gelu", "relu", "tanh", "silu"] = Field("gelu", description="nonlinearity between the projections")
    scale: float = Field(1.0, gt=0, description="multiplier of the adapter's output")
    train_norms: bool | Literal["auto"] = Field(
        "auto",
        description="also train the norms of the adapted blocks, as Houlsby et al. do: auto = where the backbone "
        "lists them (BlockSite.norms), true = required (an error where it lists none), false = never",
    )
    layers: list[int] | None = Field(None, description="only these blocks of each tower (0 = first, -1 = last); default all")
    tower: str | list[str] = Field("all", description="which towers: all, or names such as vision / text / unet")

    @model_validator(mode="after")
    def _check_layers(self) -> "AdapterParams":
        if self.layers is not None and not self.layers:
            raise ValueError("layers: give at least one index, or leave it unset for every block")
        return self

    def size(self, width: int) -> int:
        """The bottleneck of an adapter on a sub-layer of ``width`` channels."""
        return self.bottleneck if self.bottleneck is not None else max(1, width // self.reduction_factor)


def check_adapter(params: AdapterParams, backbone: str, towers: Any) -> list[str]:
    return require("adapter", backbone, towers, params.tower, "blocks")


def apply_adapter(params: AdapterParams, surface: Any, ctx: Any) -> Any:
    from adaptkit_plugins.methods._adapter_impl import apply

    return apply(params, surface)


@hookimpl
def adaptkit_methods() -> list[MethodRecord]:
    return [
        MethodRecord(
            name="adapter",
            params=AdapterParams,
            factory=apply_adapter,
            summary="bottleneck adapters after attention and/or MLP sub-layers (Houlsby, Pfeiffer); zero-init, starts as the base",
            check=check_adapter,
            recommended={"lr": 2e-2, "weight_decay": 0.0},
            example={"reduction_factor": 8},
        )
    ]
