"""Prefix tuning on attention sites (imports torch)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adaptkit.method import AppliedMethod
from adaptkit.surface import AttentionSite, Surface
from adaptkit_plugins.methods.common import attach, host, pick


class PrefixKV(nn.Module):
    """The prefix of one attention site: keys and values (heads, length, head_dim), and an optional gate."""

    def __init__(self, site: AttentionSite, length: int, std: float, gate: bool, encoder: "PrefixEncoder | None", slot: int) -> None:
        super().__init__()
        self.heads, self.head_dim, self.length = site.num_heads, site.head_dim, length
        shape = (site.num_heads, length, site.head_dim)
        self._encoder = [encoder]  # shared, owned by the model root (a list: not a child here)
        self.slot = slot
        if encoder is None:
            self.key = nn.Parameter(torch.randn(shape) * std)
            self.value = nn.Parameter(torch.randn(shape) * std)
        self.gate = nn.Parameter(torch.zeros(site.num_heads)) if gate else None

    def kv(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        encoder = self._encoder[0]
        if encoder is None:
            key, value = self.key, self.value
        else:
            key, value = encoder.site_kv(self.slot, self.heads, self.head_dim)
        return key.unsqueeze(0).expand(batch, -1, -1, -1), value.unsqueeze(0).expand(batch, -1, -1, -1)


class PrefixEncoder(nn.Module):
    """Li & Liang's reparameterisation: embedding (length, hidden) -> MLP -> every site's keys and values."""

    def __init__(self, length: int, hidden: int, widths: list[int], std: float) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(length, hidden) * std)
        self.inner = nn.Linear(hidden, hidden)
        self.outer = nn.Linear(hidden, 2 * sum(widths))
        starts = [0]
        for width in widths:
            starts.append(starts[-1] + 2 * width)
        self.starts = starts

    def site_kv(self, slot: int, heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, stop = self.starts[slot], self.starts[slot + 1]
        hidden = torch.tanh(self.inner(self.embedding))
        # only this site's rows of the output layer: each site costs (length x hidden x 2 width)
        out = F.linear(hidden, self.outer.weight[start:stop], self.outer.bias[start:stop])
        out = out.reshape(-1, 2, heads, head_dim).permute(1, 2, 0, 3)  # (2, heads, length, head_dim)
        return out[0], out[1]


def apply(params: Any, surface: Surface) -> AppliedMethod:
    towers = surface.select(params.tower, "attention", "prefix")
    added: list[nn.Module] = []
    expected = 0
    sites_done = 0
    for tower in towers:
        sites = pick(tower.attention, params.layers, "attention sites", "prefix", f"tower '{tower.name}' of backbone '{surface.backbone}'")
        encoder = None
        if params.reparameterize:
            widths = [s.num_heads * s.head_dim for s in sites]
            encoder = PrefixEncoder(params.length, params.hidden, widths, params.init_std)
            attach(surface.root, f"prefix_encoder_{tower.name}", encoder)
            added.append(encoder)
            total = 2 * sum(widths)
            expected += params.length * params.hidden + params.hidden * params.hidden + params.hidden + params.hidden * total + total
        for slot, site in enumerate(sites):
            prefix = PrefixKV(site, params.length, params.init_std, params.gate, encoder, slot)
            attach(host(site.module), "prefix", prefix)
            site.add_kv(prefix.kv, gate=prefix.gate)
            added.append(prefix)
            if encoder is None:
                expected += 2 * params.length * site.num_heads * site.head_dim
            if params.gate:
                expected += site.num_heads
            sites_done += 1
    kind = "gated " if params.gate else ""
    via = ", MLP-reparameterised" if params.reparameterize else ""
    summary = f"{kind}prefix of {params.length} at {sites_done} attention sites{via}, {expected:,} parameters"
    return AppliedMethod("prefix", added, summary, expected_parameters=expected, identity_at_init=params.gate or params.length == 0)
