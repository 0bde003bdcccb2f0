"""LoRA layers (imports torch).

One :class:`LoraDelta` is attached to each adapted layer as a child module named
``lora`` (the base layer's own parameter names do not change) and adds its update
through a forward hook. Several roles inside one fused layer (q and v of ``qkv``)
share the delta: one matmul computes every part's low-rank projection, and each
part's update lands on its own rows of the output.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adaptkit.errors import CompatibilityError
from adaptkit.method import AppliedMethod
from adaptkit.surface import LayerSite, Surface


class LoraDelta(nn.Module):
    """Low-rank update of one Linear or Conv2d layer, over one or more row ranges.

    ``lora_a``: (parts * r, in[, kh, kw]); ``lora_b``: (sum of part sizes, r). Part
    ``i`` uses rows ``i*r:(i+1)*r`` of A and its own row block of B.
    """

    def __init__(self, layer: nn.Module, parts: list[tuple[int, int] | None], rank: int, scale: float, dropout: float, init: str) -> None:
        super().__init__()
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            raise CompatibilityError("LoRA on grouped convolutions is not supported")
        out_total = layer.weight.shape[0]
        self.ranges = [p if p is not None else (0, out_total) for p in parts]
        self.rank, self.scale = rank, scale
        self.conv = isinstance(layer, nn.Conv2d)
        factory = {"device": layer.weight.device, "dtype": layer.weight.dtype}
        a_shape = (len(self.ranges) * rank, *layer.weight.shape[1:])
        self.lora_a = nn.Parameter(torch.empty(a_shape, **factory))
        self.lora_b = nn.Parameter(torch.zeros(sum(b - a for a, b in self.ranges), rank, **factory))
        if init == "gaussian":
            nn.init.normal_(self.lora_a, std=1 / rank)
        else:
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.whole = len(self.ranges) == 1 and self.ranges[0] == (0, out_total)
        self.merged = False
        self.enabled = True
        self._layer = [layer]  # a plain list: the layer is our parent, not our child
        self._handle = layer.register_forward_hook(self._hook)

    # -- forward -------------------------------------------------------------
    def _project(self, x: torch.Tensor) -> torch.Tensor:
        layer = self._layer[0]
        x = self.dropout(x)
        if self.conv:
            return F.conv2d(x, self.lora_a, None, layer.stride, layer.padding, layer.dilation)
        return F.linear(x, self.lora_a)

    def _expand(self, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.conv:
            return F.conv2d(h, b[:, :, None, None])
        return F.linear(h, b)

    def _hook(self, module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.enabled:
            return out
        h = self._project(args[0].to(self.lora_a.dtype))
        if self.whole:
            return out + self._expand(h, self.lora_b).to(out.dtype) * self.scale
        r, offset = self.rank, 0
        pieces, cursor = [], 0
        channel = 1 if self.conv else -1
        for i, (start, stop) in enumerate(self.ranges):
            size = stop - start
            part_h = h.narrow(channel, i * r, r)
            delta = self._expand(part_h, self.lora_b[offset : offset + size]).to(out.dtype) * self.scale
            offset += size
            if start > cursor:
                pieces.append(out.narrow(channel, cursor, start - cursor))
            pieces.append(out.narrow(channel, start, size) + delta)
            cursor = stop
        if cursor < out.shape[channel]:
            pieces.append(out.narrow(channel, cursor, out.shape[channel] - cursor))
        return torch.cat(pieces, dim=channel)

    # -- merging -------------------------------------------------------------
    def delta_weight(self, part: int) -> torch.Tensor:
        """The dense update (alpha/r) B_i A_i of part ``part``, shaped like its weight rows."""
        start, stop = self.ranges[part]
        offset = sum(b - a for a, b in self.ranges[:part])
        a = self.lora_a[part * self.rank : (part + 1) * self.rank]
        b = self.lora_b[offset : offset + stop - start]
        return (b @ a.flatten(1)).reshape(stop - start, *a.shape[1:]) * self.scale

    @torch.no_grad()
    def merge(self, sign: float = 1.0) -> None:
        weight = self._layer[0].weight
        for i, (start, stop) in enumerate(self.ranges):
            weight[start:stop] += sign * self.delta_weight(i).to(weight.dtype)
        self.merged = sign > 0

    def remove(self) -> None:
        """Detach the hook (after merging, to leave a plain layer)."""
        self._handle.remove()


class AppliedLora(AppliedMethod):
    mergeable = True

    def __init__(self, deltas: dict[str, LoraDelta], summary: str, expected: int) -> None:
        super().__init__("lora", list(deltas.values()), summary, expected_parameters=expected, identity_at_init=True)
        self.deltas = deltas

    def merge(self) -> None:
        for delta in self.deltas.values():
            if not delta.merged:
                delta.merge(1.0)
        self.merged = True

    def unmerge(self) -> None:
        for delta in self.deltas.values():
            if delta.merged:
                delta.merge(-1.0)
        self.merged = False

    def set_enabled(self, enabled: bool) -> None:
        for delta in self.deltas.values():
            delta.enabled = enabled


def apply(params: Any, surface: Surface) -> AppliedLora:
    towers = surface.select(params.tower, "layers", "lora")
    available = set().union(*(t.roles() for t in towers))
    roles = params.roles(available)
    sites: list[LayerSite] = surface.layer_sites(towers, roles, params.target_modules, method="lora")
    if not sites:
        raise CompatibilityError(f"method 'lora': no layers of backbone '{surface.backbone}' match targets {roles}")
    groups: dict[str, list[LayerSite]] = {}
    for site in sites:
        if not isinstance(site.module, (nn.Linear, nn.Conv2d)):
            raise CompatibilityError(f"method 'lora': {site.name} is a {type(site.module).__name__}; LoRA adapts Linear and Conv2d layers")
        groups.setdefault(site.name, []).append(site)
    alpha = params.alpha if params.alpha is not None else 2.0 * params.rank
    scale = alpha / (math.sqrt(params.rank) if params.use_rslora else params.rank)
    deltas: dict[str, LoraDelta] = {}
    expected = 0  # the formula: r x (fan-in per part + output rows) per adapted layer
    for name, group in groups.items():
        layer = group[0].module
        parts = [None] if any(s.rows is None for s in group) else sorted(s.rows for s in group)
        rows = layer.weight.shape[0] if parts == [None] else sum(s.out_size for s in group)
        expected += params.rank * (len(parts) * layer.weight[0].numel() + rows)
        delta = LoraDelta(layer, parts, params.rank, scale, params.dropout, params.init)
        child = "lora"
        index = 1
        while hasattr(layer, child):
            child, index = f"lora_{index}", index + 1
        layer.add_module(child, delta)
        deltas[name] = delta
    count = sum(p.numel() for d in deltas.values() for p in d.parameters())
    return AppliedLora(deltas, f"rank {params.rank} on {len(deltas)} layers ({', '.join(roles) or 'regex'}), {count:,} parameters", expected)
