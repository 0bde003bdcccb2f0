"""What training does to each block of a model's surface: gradient checkpointing, torch.compile.

The blocks are the residual blocks every tower of the surface lists (``Tower.blocks``),
outermost first where one holds another: the same units FSDP shards
(:func:`adaptkit.distributed.shard_model`). Working per block keeps module names,
parameters and every method's hooks where they are, so adapters, prefixes and prompts
work unchanged, and saving, merging and sharding see the same model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def surface_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules of every block the model's surface lists, in forward order, without
    duplicates and without a block that sits inside another listed block."""
    blocks: list[nn.Module] = []
    surface = getattr(model, "surface", None)
    for tower in (surface.towers.values() if surface is not None else ()):
        for site in tower.blocks:
            try:
                module = model.get_submodule(site.name)
            except AttributeError:
                continue
            if all(module is not seen for seen in blocks):
                blocks.append(module)
    inner = {id(m) for outer in blocks for m in outer.modules() if m is not outer}
    return [m for m in blocks if id(m) not in inner]


class _Checkpointed:
    """A block's forward that, while training with gradients, keeps only the block's
    inputs and recomputes its activations in backward (``torch.utils.checkpoint``,
    non-reentrant: keyword arguments, parameters inside the block, DDP and FSDP all
    work, and the random state is restored so dropout draws the same masks)."""

    def __init__(self, block: nn.Module, forward: Any) -> None:
        self.block, self.forward = block, forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.block.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self.forward, *args, use_reentrant=False, **kwargs)
        return self.forward(*args, **kwargs)


def checkpoint_blocks(model: nn.Module) -> int:
    """Recompute every surface block in backward instead of keeping its activations
    (``train.gradient_checkpointing``); returns the number of blocks. The loss and the
    gradients stay those of the plain model. Applying it twice changes nothing."""
    blocks = surface_blocks(model)
    for block in blocks:
        if not isinstance(block.__dict__.get("forward"), _Checkpointed):
            block.forward = _Checkpointed(block, block.forward)
    return len(blocks)


def compile_blocks(model: nn.Module, backend: str = "inductor") -> int:
    """``torch.compile`` every surface block in place (``train.compile``); returns the number
    of blocks. Per block rather than the whole model: method hooks, prompts and the task's
    Python around the blocks stay eager, FSDP shards the same modules, and a graph break
    stays inside one block. Compilation happens at the first call."""
    blocks = surface_blocks(model)
    for block in blocks:
        block.compile(backend=backend, dynamic=False)
    return len(blocks)
