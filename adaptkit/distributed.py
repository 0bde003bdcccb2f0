"""torch.distributed set-up for runs launched with torchrun (imports torch)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def resolve_device(name: str, dist: DistInfo | None = None) -> torch.device:
    """``auto`` -> cuda (this process's local GPU under torchrun) when present, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            from adaptkit.errors import RunError

            raise RunError(f"train.device is '{name}' but no CUDA device is available; use train.device=cpu or auto")
        if device.index is None:
            device = torch.device("cuda", (dist.local_rank if dist else 0) % torch.cuda.device_count())
    return device


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun set up (gloo on CPU, nccl on GPU); a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def broadcast_flag(info: DistInfo, flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank."""
    if not info.enabled:
        return flag
    import torch.distributed as dist

    tensor = torch.tensor([1 if flag else 0])
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


# ----------------------------------------------------------------- FSDP (train.strategy: fsdp)
def fsdp_available() -> bool:
    """Whether this torch has the FSDP2 API (``torch.distributed.fsdp.fully_shard``)."""
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def shard_model(model: torch.nn.Module, device: torch.device, info: DistInfo) -> int:
    """Shard ``model`` in place with FSDP2 over all processes: one unit per block the
    model's adaptation surface lists (every tower's ``blocks``), plus the root for the
    rest (embeddings, norms, heads). Frozen and trainable parameters may share a unit; frozen
    scalars (CLIP's logit_scale) stay whole, since FSDP2 shards no 0-d parameter.
    A model built with its base on the meta device (``build(defer_base=True)``) is sharded
    there and each process then reads only its rows of every base weight from the files.
    Returns the number of block units."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from adaptkit.blocks import surface_blocks
    from adaptkit.deferred import fill_shards, is_deferred, keep_real, sources
    from adaptkit.errors import RunError

    if not fsdp_available():  # pragma: no cover - depends on the torch build
        raise RunError("train.strategy is 'fsdp' but this torch has no torch.distributed.fsdp.fully_shard; use strategy ddp")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    deferred = is_deferred(model)
    if deferred:  # base weights on the meta device: shard everything there, then fill in each process's rows
        kept, found = keep_real(model), sources(model)
        model.to("meta")
    mesh = init_device_mesh(device.type, (info.world,))
    # FSDP2 cannot shard a 0-d parameter (CLIP's logit_scale): a frozen one stays whole on every process
    scalars = {p for p in model.parameters() if p.ndim == 0}
    trained = sorted(name for name, p in model.named_parameters() if p in scalars and p.requires_grad)
    if trained:
        raise RunError(f"train.strategy is 'fsdp' but {trained[0]} is a trained scalar, which FSDP cannot shard; "
                       "use train.strategy=ddp, or leave it frozen")
    blocks = surface_blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh, ignored_params=scalars)
    fully_shard(model, mesh=mesh, ignored_params=scalars)
    if deferred:
        model.to_empty(device=device)
        fill_shards(model, kept, found, info.rank, info.world)
    return len(blocks)


def local_numel(model: torch.nn.Module) -> int:
    """How many parameter values this process holds (its shards of sharded parameters)."""
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded (DTensor) one, gathered on every process; others as they are.
    Collective for a DTensor: every process must call it, in the same order."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def like(saved: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``saved`` (a whole tensor) placed as ``reference`` is: sharded the same way when it is a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(reference, DTensor):
        return distribute_tensor(saved.to(reference.device, reference.dtype), reference.device_mesh, reference.placements)
    return saved.to(reference.device)


class unsharded_root:
    """Gather the FSDP root's own parameters for calls that bypass ``forward`` (a task's
    ``evaluate``); the blocks still gather and free theirs on each call. A no-op otherwise."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        if _is_fsdp(self.model):
            self.model.unshard()

    def __exit__(self, *args: object) -> None:
        if _is_fsdp(self.model):
            self.model.reshard()


def _is_fsdp(module: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, FSDPModule)
