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
