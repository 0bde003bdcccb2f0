"""FSDP on 2 gloo processes: per-process peak parameter memory against one process, on a real-size ViT.

The base weights are random, in timm's hub layout (``config.json`` + ``model.safetensors``).
Three ways of getting the model ready to train, each in fresh processes:

- ``one process``: ``adaptkit.build`` (LoRA r=8 + head), the whole model in one process;
- ``adaptkit fsdp x2``: ``train.strategy: fsdp`` under torchrun: the base is built on the meta
  device and each process reads only its rows of every weight from the file
  (``build(defer_base=True)`` + ``shard_model``, what ``adaptkit run`` does);
- ``plain fsdp x2``: the usual recipe with the plain libraries, every process creating and
  loading the whole timm model (``timm.create_model('local-dir:DIR', pretrained=True)``) and
  then sharding it with FSDP2 (``fully_shard`` per block, then the root); this is also what
  adaptkit did before the meta-device build.

Measured per process: the peak RSS over building and sharding, above the RSS after a warm-up
build of a tiny ViT (the process's high-water mark, reset then: what the parameters and their
loading cost, without the imports and the digits data), and the parameter bytes the process holds when ready. Ratios are the largest process's
peak over one process's.

Usage::

    python benchmarks/fsdp_memory.py                          # ViT-B/16 (the run in BENCHMARKS.md)
    python benchmarks/fsdp_memory.py --arch vit_small_patch16_224
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from realsize import TIMM_TARGETS, reset_rss_peak, rss_now, rss_peak  # noqa: E402


def write_weights(arch: str, folder: Path) -> Path:
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    save_for_hf(timm.create_model(arch, pretrained=False), folder, safe_serialization=True)
    return folder


def spec_for(path: Path) -> dict[str, Any]:
    return {"name": "fsdp_memory", "seed": 0, "backbone": {"name": "vit", "pretrained": str(path)},
            "methods": [{"name": "lora", "rank": 8, **TIMM_TARGETS}], "task": {"name": "classification", "num_classes": 10},
            "data": {"name": "digits"}, "train": {"strategy": "fsdp", "progress": False}}


def held_bytes(model: torch.nn.Module) -> int:
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in model.parameters())


def child(mode: str, path: Path, out: Path) -> None:
    """Build (and under torchrun shard) the model; write this process's memory figures to ``out``."""
    import adaptkit
    from adaptkit.distributed import DistInfo, init_distributed, shard_model

    device = torch.device("cpu")
    dist = init_distributed(device)
    # imports (timm, scikit-learn's digits, the plugins) before the baseline: what follows is the model's
    adaptkit.build({**spec_for(path), "backbone": {"name": "vit", "model": "vit_tiny_digits"}})
    reset_rss_peak()
    before = rss_now()
    if mode == "plain":
        import timm
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        model = timm.create_model(f"local-dir:{path}", pretrained=True)
        mesh = init_device_mesh("cpu", (dist.world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        model = adaptkit.build(spec_for(path), defer_base=dist.enabled)
        if dist.enabled:
            shard_model(model, device, DistInfo(dist.rank, dist.world, dist.local_rank))
    record = {"peak": rss_peak() - before, "held": held_bytes(model), "world": dist.world}
    (out / f"{mode}-{dist.rank}.json").write_text(json.dumps(record))
    if dist.enabled:
        from torch import distributed

        distributed.barrier()
        distributed.destroy_process_group()


def launch(mode: str, path: Path, out: Path, threads: int) -> list[dict[str, Any]]:
    script = [str(Path(__file__).resolve()), "--child", mode, "--path", str(path), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if mode == "one":
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", *script]
    subprocess.run(command, check=True, env=env)
    return [json.loads(p.read_text()) for p in sorted(out.glob(f"{mode}-*.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_base_patch16_224")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", choices=["one", "fsdp", "plain"])
    parser.add_argument("--path", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.path, args.out)
        return
    with tempfile.TemporaryDirectory() as folder:
        path = write_weights(args.arch, Path(folder) / "weights")
        out = Path(folder) / "out"
        out.mkdir()
        results = {mode: launch(mode, path, out, args.threads) for mode in ("one", "fsdp", "plain")}
    mib = 2**20
    one = results["one"][0]
    print(f"\n{args.arch}: LoRA r=8 + head, random weights in timm's hub layout; CPU, gloo")
    print(f"{'':<22}{'peak RSS over build (MiB), per process':>42}{'params held (MiB)':>20}{'peak / one process':>20}")
    names = {"one": "one process", "fsdp": "adaptkit fsdp x2", "plain": "plain fsdp x2"}
    for mode, records in results.items():
        peaks = ", ".join(f"{r['peak'] / mib:.0f}" for r in records)
        held = ", ".join(f"{r['held'] / mib:.0f}" for r in records)
        worst = max(r["peak"] for r in records) / one["peak"]
        print(f"{names[mode]:<22}{peaks:>42}{held:>20}{worst:>20.2f}")
    print("goal: adaptkit fsdp x2, peak / one process <= 0.6")


if __name__ == "__main__":
    main()
