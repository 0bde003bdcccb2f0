"""Bottleneck adapters on block sites (imports torch)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from adaptkit.errors import CompatibilityError
from adaptkit.method import AppliedMethod
from adaptkit.surface import Surface
from adaptkit_plugins.methods._common import attach, host, pick

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU}


class Adapter(nn.Module):
    """``h + scale * up(act(down(h)))`` over channel axis ``channel_dim`` of ``h``."""

    def __init__(self, dim: int, bottleneck: int, activation: str, scale: float, channel_dim: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = _ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale, self.channel_dim = scale, channel_dim
        self.enabled = True

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h if self.channel_dim in (-1, h.ndim - 1) else h.movedim(self.channel_dim, -1)
        delta = self.up(self.act(self.down(x.to(self.down.weight.dtype)))) * self.scale
        if x is not h:
            delta = delta.movedim(-1, self.channel_dim)
        return h + delta.to(h.dtype)

    def hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        if not self.enabled:
            return output
        if isinstance(output, tuple):  # some attention modules return (output, weights)
            return (self(output[0]), *output[1:])
        return self(output)


class AppliedAdapter(AppliedMethod):
    switchable = True

    def __init__(self, adapters: list[Adapter], handles: list[Any], summary: str, expected: int) -> None:
        super().__init__("adapter", list(adapters), summary, expected_parameters=expected, identity_at_init=True)
        self.handles = handles

    def set_enabled(self, enabled: bool) -> None:
        for adapter in self.added:
            adapter.enabled = enabled


def apply(params: Any, surface: Surface) -> AppliedAdapter:
    towers = surface.select(params.tower, "blocks", "adapter")
    slots = ("attn", "mlp") if params.placement == "houlsby" else ("mlp",)
    adapters: list[Adapter] = []
    handles = []
    expected = 0
    for tower in towers:
        blocks = pick(tower.blocks, params.layers, "blocks", "adapter", f"tower '{tower.name}' of backbone '{surface.backbone}'")
        for block in blocks:
            block_module = surface.root.get_submodule(block.name) if surface.root is not None else None
            for slot in slots:
                target = getattr(block, f"{slot}_output")
                if target is None:
                    continue
                size = params.size(block.dim)
                adapter = Adapter(block.dim, size, params.activation, params.scale, block.channel_dim)
                attach(host(block_module, target), f"adapter_{slot}", adapter)
                handles.append(target.register_forward_hook(adapter.hook))
                adapters.append(adapter)
                expected += 2 * block.dim * size + size + block.dim
    if not adapters:
        where = " or ".join(f"{s} outputs" for s in slots)
        raise CompatibilityError(
            f"method 'adapter' ({params.placement}) needs blocks with {where}, but backbone '{surface.backbone}' offers none"
        )
    return AppliedAdapter(adapters, handles, f"{len(adapters)} {params.placement} adapters, {expected:,} parameters", expected)
