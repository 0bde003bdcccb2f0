"""Bottleneck adapters on block sites (imports torch)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from adaptkit.errors import CompatibilityError
from adaptkit.method import AppliedMethod
from adaptkit.surface import BlockSite, Surface
from adaptkit_plugins.methods.common import attach, host, pick

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU}


class Adapter(nn.Module):
    """``h + scale * up(act(down(h)))`` over channel axis ``channel_dim`` of ``h``.

    Sequential placements wrap a sub-layer's output ``h`` (:meth:`hook`); the parallel
    one adds ``scale * up(act(down(x)))`` of the sub-layer's *input* ``x`` to its output
    (:meth:`parallel_input`, :meth:`parallel_output`).
    """

    def __init__(self, dim: int, bottleneck: int, activation: str, scale: float, channel_dim: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = _ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale, self.channel_dim = scale, channel_dim
        self.enabled = True
        self._input: torch.Tensor | None = None

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        """``scale * up(act(down(h)))`` in ``h``'s layout and dtype."""
        x = h if self.channel_dim in (-1, h.ndim - 1) else h.movedim(self.channel_dim, -1)
        delta = self.up(self.act(self.down(x.to(self.down.weight.dtype)))) * self.scale
        if x is not h:
            delta = delta.movedim(-1, self.channel_dim)
        return delta.to(h.dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.delta(h)

    def hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        if not self.enabled:
            return output
        if isinstance(output, tuple):  # some attention modules return (output, weights)
            return (self(output[0]), *output[1:])
        return self(output)

    def parallel_input(self, module: nn.Module, args: Any) -> None:
        self._input = args[0] if self.enabled else None

    def parallel_output(self, module: nn.Module, args: Any, output: Any) -> Any:
        x, self._input = self._input, None  # drop the reference: no activation outlives the call
        if x is None:
            return output
        if isinstance(output, tuple):
            return (output[0] + self.delta(x), *output[1:])
        return output + self.delta(x)


class AppliedAdapter(AppliedMethod):
    switchable = True

    def __init__(self, adapters: list[Adapter], handles: list[Any], summary: str, expected: int) -> None:
        super().__init__("adapter", list(adapters), summary, expected_parameters=expected, identity_at_init=True)
        self.handles = handles

    def set_enabled(self, enabled: bool) -> None:
        """Switch the adapter modules off and on (norms trained with ``train_norms`` stay as trained)."""
        for adapter in self.added:
            adapter.enabled = enabled


def _unfreeze_norms(block: BlockSite) -> int:
    """Make ``block``'s norms trainable; the number of parameters this adds, by the block's width."""
    count = 0
    for norm in block.norms:
        for tensor in (getattr(norm, "weight", None), getattr(norm, "bias", None)):
            if tensor is not None and not tensor.requires_grad:  # already trained by another method: not ours
                tensor.requires_grad_(True)
                count += block.dim
    return count


def apply(params: Any, surface: Surface) -> AppliedAdapter:
    towers = surface.select(params.tower, "blocks", "adapter")
    slots = {"houlsby": ("attn", "mlp"), "pfeiffer": ("mlp",), "parallel": ("mlp",)}[params.placement]
    chosen = [
        block for tower in towers
        for block in pick(tower.blocks, params.layers, "blocks", "adapter", f"tower '{tower.name}' of backbone '{surface.backbone}'")
    ]
    unlisted = [block.name for block in chosen if not block.norms]
    if params.train_norms is True and unlisted:  # checked before anything is attached
        raise CompatibilityError(
            f"method 'adapter' (train_norms) needs the norms of block '{unlisted[0]}', but backbone "
            f"'{surface.backbone}' does not list them (BlockSite.norms); set train_norms: auto or false"
        )
    adapters: list[Adapter] = []
    handles = []
    expected = 0
    for block in chosen:
        block_module = surface.root.get_submodule(block.name) if surface.root is not None else None
        placed = False
        for slot in slots:
            target = getattr(block, f"{slot}_output")
            source = block.mlp_input if params.placement == "parallel" else target
            if target is None or source is None:
                continue
            size = params.size(block.dim)
            adapter = Adapter(block.dim, size, params.activation, params.scale, block.channel_dim)
            attach(host(block_module, target), f"adapter_{slot}", adapter)
            if params.placement == "parallel":
                handles.append(source.register_forward_pre_hook(adapter.parallel_input))
                handles.append(target.register_forward_hook(adapter.parallel_output))
            else:
                handles.append(target.register_forward_hook(adapter.hook))
            adapters.append(adapter)
            expected += 2 * block.dim * size + size + block.dim
            placed = True
        if placed and params.train_norms is not False:
            expected += _unfreeze_norms(block)
    if not adapters:
        where = "MLP inputs and outputs" if params.placement == "parallel" else " or ".join(f"{s} outputs" for s in slots)
        raise CompatibilityError(
            f"method 'adapter' ({params.placement}) needs blocks with {where}, but backbone '{surface.backbone}' offers none"
        )
    return AppliedAdapter(adapters, handles, f"{len(adapters)} {params.placement} adapters, {expected:,} parameters", expected)
