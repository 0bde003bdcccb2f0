"""(IA)^3 vectors as forward hooks on role-tagged layers (imports torch)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from adaptkit.errors import CompatibilityError
from adaptkit.method import AppliedMethod


class OutputScale(nn.Module):
    """Multiplies output rows ``start:stop`` of a layer by a learned vector (ones at start)."""

    def __init__(self, layer: nn.Module, rows: tuple[int, int]) -> None:
        super().__init__()
        self.rows = rows
        self.scale = nn.Parameter(torch.ones(rows[1] - rows[0]))
        self.merged = False
        self.channel = 1 if isinstance(layer, nn.Conv2d) else -1
        self._layer = [layer]
        layer.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return out
        start, stop = self.rows
        shape = [1] * out.ndim
        shape[self.channel] = stop - start
        size = out.shape[self.channel]
        parts = [out.narrow(self.channel, 0, start), out.narrow(self.channel, start, stop - start) * self.scale.view(shape),
                 out.narrow(self.channel, stop, size - stop)]
        return torch.cat(parts, dim=self.channel)

    @torch.no_grad()
    def merge(self, sign: float) -> None:
        layer = self._layer[0]
        start, stop = self.rows
        factor = self.scale if sign > 0 else 1 / self.scale
        layer.weight[start:stop] *= factor.view(-1, *[1] * (layer.weight.ndim - 1))
        if layer.bias is not None:
            layer.bias[start:stop] *= factor
        self.merged = sign > 0


class InputScale(nn.Module):
    """Multiplies a layer's input channels by a learned vector (ones at start)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(layer.weight.shape[1]))
        self.merged = False
        self.channel = 1 if isinstance(layer, nn.Conv2d) else -1
        self._layer = [layer]
        layer.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[Any, ...]) -> Any:
        if self.merged:
            return None
        x = args[0]
        shape = [1] * x.ndim
        shape[self.channel] = -1
        return (x * self.scale.view(shape), *args[1:])

    @torch.no_grad()
    def merge(self, sign: float) -> None:
        layer = self._layer[0]
        factor = self.scale if sign > 0 else 1 / self.scale
        layer.weight *= factor.view(1, -1, *[1] * (layer.weight.ndim - 2))
        self.merged = sign > 0


class AppliedIa3(AppliedMethod):
    mergeable = True

    def __init__(self, scales: list[nn.Module]) -> None:
        super().__init__("ia3", scales, f"{sum(s.scale.numel() for s in scales):,} scaling parameters")
        self.expected_parameters = sum(s.scale.numel() for s in scales)

    def merge(self) -> None:
        for scale in self.added:
            if not scale.merged:
                scale.merge(1.0)
        self.merged = True

    def unmerge(self) -> None:
        for scale in self.added:
            if scale.merged:
                scale.merge(-1.0)
        self.merged = False


def _attach(layer: nn.Module, name: str, module: nn.Module) -> None:
    index, child = 0, name
    while hasattr(layer, child):
        index += 1
        child = f"{name}_{index}"
    layer.add_module(child, module)


def apply(params: Any, surface: Any) -> AppliedIa3:
    towers = surface.select(params.tower, "layers", "ia3")
    available = set().union(*(t.roles() for t in towers))
    outputs = [r for r in params.scale_outputs if r in available]
    inputs = [r for r in params.scale_inputs if r in available]
    if not outputs and not inputs:
        raise CompatibilityError(f"method 'ia3': backbone '{surface.backbone}' has none of the roles {params.scale_outputs + params.scale_inputs}")
    scales: list[nn.Module] = []
    for site in surface.layer_sites(towers, outputs):
        rows = site.rows or (0, site.module.weight.shape[0])
        scale = OutputScale(site.module, rows)
        _attach(site.module, "ia3_out", scale)
        scales.append(scale)
    for site in surface.layer_sites(towers, inputs):
        scale = InputScale(site.module)
        _attach(site.module, "ia3_in", scale)
        scales.append(scale)
    return AppliedIa3(scales)
