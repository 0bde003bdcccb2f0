"""LoRA layers (imports torch).

One :class:`LoraDelta` is attached to each adapted layer as a child module named
``lora`` (the base layer's own parameter names do not change) and adds its update
through a forward hook. Several roles inside one fused layer (q and v of ``qkv``)
share the delta: one matmul computes every part's low-rank projection, and each
part's update is accumulated into its own rows of the layer's output by one GEMM
(``addmm_``: no concatenation, no copy of the output, no separate addition).

The hook is only registered while it has work to do: merging the delta into the
weight, or switching it off, removes it, so a merged model runs at the base
model's speed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adaptkit.deferred import new_parameter_device
from adaptkit.errors import CompatibilityError
from adaptkit.method import AppliedMethod, LowRankUpdate
from adaptkit.surface import LayerSite, Surface
from adaptkit_plugins.methods.common import attach


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
        factory = {"device": new_parameter_device(layer.weight), "dtype": layer.weight.dtype}
        a_shape = (len(self.ranges) * rank, *layer.weight.shape[1:])
        self.lora_a = nn.Parameter(torch.empty(a_shape, **factory))
        self.lora_b = nn.Parameter(torch.zeros(sum(b - a for a, b in self.ranges), rank, **factory))
        if init == "gaussian":
            nn.init.normal_(self.lora_a, std=1 / rank)
        else:
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.dropout_p = float(dropout)
        self.whole = len(self.ranges) == 1 and self.ranges[0] == (0, out_total)
        # (offset into B, start row, size) of every part
        self._blocks: list[tuple[int, int, int]] = []
        offset = 0
        for start, stop in self.ranges:
            self._blocks.append((offset, start, stop - start))
            offset += stop - start
        self.merged = False
        self._enabled = True
        self._layer = [layer]  # a plain list: the layer is our parent, not our child
        self._handle: Any = None
        self._sync_hook()

    # -- state ---------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        if not value and self.merged:  # switched off: its update leaves the weights too
            self.merge(-1.0)
        self._enabled = bool(value)
        self._sync_hook()

    def _sync_hook(self) -> None:
        """Register the forward hook exactly while the update must be added at run time."""
        wanted = self._enabled and not self.merged
        if wanted and self._handle is None:
            self._handle = self._layer[0].register_forward_hook(self._hook)
        elif not wanted and self._handle is not None:
            self._handle.remove()
            self._handle = None

    # -- forward -------------------------------------------------------------
    def _hook(self, module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        x = args[0]
        a, b, scale = self.lora_a, self.lora_b, self.scale
        if x.dtype != a.dtype:
            x = x.to(a.dtype)
        if self.dropout_p:
            x = self.dropout(x)
        if self.conv:
            h = self._layer[0]._conv_forward(x, a, None)  # the layer's stride, padding (and its mode), dilation
            return self._add(out, h, b, scale, 1)
        h = F.linear(x, a)
        if not (out.dtype == h.dtype == b.dtype) or not out.is_contiguous():  # autocast, unusual layouts: the general way
            return self._add(out, h, b, scale, -1)
        # out += scale * h @ B^T as one accumulating GEMM into the layer's own output: no copy of it
        flat_out, flat_h = out.view(-1, out.shape[-1]), h.reshape(-1, h.shape[-1])
        if self.whole:
            flat_out.addmm_(flat_h, b.t(), alpha=scale)
            return out
        r = self.rank
        for i, (offset, start, size) in enumerate(self._blocks):
            flat_out.narrow(1, start, size).addmm_(flat_h.narrow(1, i * r, r), b.narrow(0, offset, size).t(), alpha=scale)
        return out

    def _add(self, out: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scale: float, channel: int) -> torch.Tensor:
        """out[rows of each part] += scale * B_part h_part, along ``channel`` (1 for conv maps)."""
        r = self.rank
        for i, (offset, start, size) in enumerate(self._blocks):
            part_h = h.narrow(channel, i * r, r)
            part_b = b.narrow(0, offset, size)
            delta = F.conv2d(part_h, part_b[:, :, None, None]) if self.conv else F.linear(part_h, part_b)
            out.narrow(channel, start, size).add_(delta.to(out.dtype), alpha=scale)
        return out

    # -- merging -------------------------------------------------------------
    def delta_weight(self, part: int) -> torch.Tensor:
        """The dense update (alpha/r) B_i A_i of part ``part``, shaped like its weight rows."""
        offset, _, size = self._blocks[part]
        a = self.lora_a[part * self.rank : (part + 1) * self.rank]
        b = self.lora_b[offset : offset + size]
        return (b @ a.flatten(1)).reshape(size, *a.shape[1:]) * self.scale

    @torch.no_grad()
    def merge(self, sign: float = 1.0) -> None:
        weight = self._layer[0].weight
        for i, (_, start, size) in enumerate(self._blocks):
            weight[start : start + size] += sign * self.delta_weight(i).to(weight.dtype)
        self.merged = sign > 0
        self._sync_hook()

    def updates(self, layer: str) -> list[LowRankUpdate]:
        """Every part as a :class:`LowRankUpdate` whose ``a`` and ``b`` are views of our parameters."""
        r = self.rank
        return [
            LowRankUpdate(
                layer=layer, module=self._layer[0], rows=None if self.whole else (start, start + size),
                a=self.lora_a[i * r : (i + 1) * r], b=self.lora_b[offset : offset + size],
                scale=self.scale, dropout=self.dropout_p,
            )
            for i, (offset, start, size) in enumerate(self._blocks)
        ]


class AppliedLora(AppliedMethod):
    mergeable = True
    switchable = True

    def __init__(self, deltas: dict[str, LoraDelta], summary: str, expected: int) -> None:
        super().__init__("lora", list(deltas.values()), summary, expected_parameters=expected, identity_at_init=True)
        self.deltas = deltas

    def merge(self) -> None:
        for delta in self.deltas.values():
            if not delta.merged and delta.enabled:  # a switched-off delta adds nothing, merged or not
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

    def low_rank_updates(self) -> list[LowRankUpdate]:
        return [update for name, delta in self.deltas.items() for update in delta.updates(name)]


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
    deltas: dict[str, LoraDelta] = {}
    expected = 0  # the formula: r x (fan-in per part + output rows) per adapted layer
    for name, group in groups.items():
        layer = group[0].module
        rank, alpha = params.rank_for(name), params.alpha_for(name)
        scale = alpha / (math.sqrt(rank) if params.use_rslora else rank)
        parts = [None] if any(s.rows is None for s in group) else sorted(s.rows for s in group)
        rows = layer.weight.shape[0] if parts == [None] else sum(s.out_size for s in group)
        expected += rank * (len(parts) * layer.weight[0].numel() + rows)
        delta = LoraDelta(layer, parts, rank, scale, params.dropout, params.init)
        attach(layer, "lora", delta)
        deltas[name] = delta
    count = sum(p.numel() for d in deltas.values() for p in d.parameters())
    ranks = sorted({d.rank for d in deltas.values()})
    shown = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
    return AppliedLora(deltas, f"{shown} on {len(deltas)} layers ({', '.join(roles) or 'regex'}), {count:,} parameters", expected)
