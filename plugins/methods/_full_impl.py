"""Applying ``full`` fine-tuning (imports torch)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from adaptkit.method import AppliedMethod
from adaptkit.surface import LayerSite, Surface
from adaptkit_plugins.methods.common import attach


class RowDelta(nn.Module):
    """A trainable full-rank update of some output rows of a frozen fused layer.

    Full fine-tuning of ``attn.q`` inside a fused ``qkv`` cannot unfreeze a slice of a
    parameter, so the slice's update lives here, added to the layer's output (and
    folded into the weight by :meth:`merge`).
    """

    def __init__(self, layer: nn.Module, rows: tuple[int, int]) -> None:
        super().__init__()
        self.rows = rows
        start, stop = rows
        self.weight = nn.Parameter(torch.zeros_like(layer.weight[start:stop]))
        self.bias = nn.Parameter(torch.zeros_like(layer.bias[start:stop])) if getattr(layer, "bias", None) is not None else None
        self.merged = False
        self._handle = layer.register_forward_hook(self._hook)
        self._layer = [layer]  # not a submodule: avoid a cycle in the module tree

    def _hook(self, module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return out
        x = args[0]
        start, stop = self.rows
        if isinstance(module, nn.Conv2d):
            delta = module._conv_forward(x, self.weight, self.bias)
            return torch.cat([out[:, :start], out[:, start:stop] + delta, out[:, stop:]], dim=1)
        delta = nn.functional.linear(x, self.weight, self.bias)
        return torch.cat([out[..., :start], out[..., start:stop] + delta, out[..., stop:]], dim=-1)

    @torch.no_grad()
    def merge(self, sign: float = 1.0) -> None:
        layer = self._layer[0]
        start, stop = self.rows
        layer.weight[start:stop] += sign * self.weight
        if self.bias is not None:
            layer.bias[start:stop] += sign * self.bias
        self.merged = sign > 0


class AppliedFull(AppliedMethod):
    mergeable = True

    def __init__(self, deltas: list[RowDelta], summary: str, expected: int) -> None:
        super().__init__("full", list(deltas), summary, expected_parameters=expected, identity_at_init=True)
        self.deltas = deltas

    def merge(self) -> None:
        for delta in self.deltas:
            if not delta.merged:
                delta.merge(1.0)
        self.merged = True

    def unmerge(self) -> None:
        for delta in self.deltas:
            if delta.merged:
                delta.merge(-1.0)
        self.merged = False


def apply(params: Any, surface: Surface) -> AppliedFull:
    towers = surface.select(params.tower, None, "full")
    deltas: list[RowDelta] = []
    frozen_before = {id(p) for p in surface.root.parameters() if not p.requires_grad}
    embeddings = {id(p) for t in towers for n, p in surface.tower_parameters(t).items() if n in t.embeddings}
    expected = 0  # the formula: whole frozen layers/towers unfrozen, plus rows x (fan-in + bias) per fused slice
    if params.targets or params.target_modules:
        sites: list[LayerSite] = surface.layer_sites(towers, params.targets, params.target_modules, method="full")
        slices: dict[int, list[LayerSite]] = {}
        for site in sites:
            slices.setdefault(id(site.module), []).append(site)
        for group in slices.values():
            module = group[0].module
            covered = sum(s.out_size for s in group if s.rows is not None)
            if any(s.rows is None for s in group) or covered >= module.weight.shape[0]:
                for p in module.parameters(recurse=False):
                    if id(p) in frozen_before and not (params.freeze_embeddings and id(p) in embeddings):
                        expected += p.numel()
                    p.requires_grad_(True)
                continue
            for site in group:
                rows = site.out_size
                has_bias = getattr(module, "bias", None) is not None
                expected += rows * module.weight[0].numel() + (rows if has_bias else 0)
                delta = RowDelta(module, site.rows)
                attach(module, "full_delta", delta)
                deltas.append(delta)
    else:
        for tower in towers:
            for p in surface.tower_parameters(tower).values():
                if id(p) in frozen_before and not (params.freeze_embeddings and id(p) in embeddings):
                    expected += p.numel()
                p.requires_grad_(True)
    if params.freeze_embeddings:
        for tower in towers:
            owned = surface.tower_parameters(tower)
            for name in tower.embeddings:
                if name in owned and owned[name].requires_grad and id(owned[name]) in frozen_before:
                    owned[name].requires_grad_(False)
    unfrozen = sum(p.numel() for p in surface.root.parameters() if p.requires_grad and id(p) in frozen_before)
    summary = f"{unfrozen:,} weights unfrozen" + (f", {len(deltas)} fused-row updates" if deltas else "")
    return AppliedFull(deltas, summary, expected)
