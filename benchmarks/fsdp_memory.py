"""FSDP on 2 gloo processes: per-process peak parameter memory against one process, on a real-size model.

The base weights are random, in the library's own layout (``benchmarks/realsize.py``'s
checkpoints: timm's hub layout, open_clip's ``open_clip_config.json`` + safetensors, a
diffusers model folder). Three ways of getting the model ready to train, each in fresh processes:

- ``one process``: ``adaptkit.build`` (LoRA r=8 + head or prompt features), the whole model in one process;
- ``adaptkit fsdp x2``: ``train.strategy: fsdp`` under torchrun: the base is built on the meta
  device and each process reads only its rows of every weight from the file
  (``build(defer_base=True)`` + ``shard_model``, what ``adaptkit run`` does);
- ``plain fsdp x2``: the usual recipe with the plain libraries, every process creating and
  loading the whole model (``realsize.plain_load``: ``timm.create_model('local-dir:DIR')``,
  ``open_clip.create_model('local-dir:DIR')``, ``from_pretrained(DIR)``) and then sharding it
  with FSDP2 (``fully_shard`` per block, then the root); this is also what adaptkit did before
  the meta-device build.

Measured per process: the peak RSS over building and sharding, above the RSS after a warm-up
build of the backbone's tiny digits preset (the process's high-water mark, reset then: what the
parameters and their loading cost, without the imports and the digits data), and the parameter
bytes the process holds when ready. Ratios are the largest process's peak over one process's.

Usage::

    python benchmarks/fsdp_memory.py                          # ViT-B/16 (the run in BENCHMARKS.md)
    python benchmarks/fsdp_memory.py --arch vit_small_patch16_224
    python benchmarks/fsdp_memory.py --model clip_b32         # open_clip ViT-B-32, both towers
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
from realsize import MODELS, lora_params, plain_load, reset_rss_peak, rss_now, rss_peak, spec_for, write_checkpoint  # noqa: E402

#: the models measured here (realsize's), and each backbone's tiny preset for the warm-up build
FAMILIES = {"vit_b16": "vit_tiny_digits", "swin_b": "swin_tiny_digits", "clip_b32": "clip_tiny_digits", "sd_unet": "ddpm_unet_tiny"}


def fsdp_spec(name: str, path: Path) -> dict[str, Any]:
    return {**spec_for(name, path, [lora_params(name, 8)]), "train": {"strategy": "fsdp", "progress": False}}


def plain_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks the plain recipe shards one by one: timm's ``blocks`` / ``layers``, open_clip's
    ``resblocks`` of both towers, a diffusers UNet's down, mid and up blocks."""
    names = ("blocks", "resblocks", "layers", "down_blocks", "up_blocks")
    found = [block for name, module in model.named_modules() if name.rpartition(".")[2] in names
             and isinstance(module, torch.nn.ModuleList) for block in module]
    return found + ([model.mid_block] if getattr(model, "mid_block", None) is not None else [])


def held_bytes(model: torch.nn.Module) -> int:
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in model.parameters())


def child(name: str, mode: str, path: Path, out: Path) -> None:
    """Build (and under torchrun shard) the model; write this process's memory figures to ``out``."""
    import adaptkit
    from adaptkit.distributed import DistInfo, init_distributed, shard_model

    device = torch.device("cpu")
    dist = init_distributed(device)
    # imports (the library, scikit-learn's digits, the plugins) before the baseline: what follows is the model's
    spec = fsdp_spec(name, path)
    tiny = {key: value for key, value in spec["backbone"].items() if key not in ("pretrained", "dtype")}
    adaptkit.build({**spec, "backbone": {**tiny, "model": FAMILIES[name]}})
    reset_rss_peak()
    before = rss_now()
    if mode == "plain":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        model = plain_load(name, path)
        mesh = init_device_mesh("cpu", (dist.world,))
        scalars = {p for p in model.parameters() if p.ndim == 0}  # FSDP2 shards no 0-d parameter (CLIP's logit_scale)
        for block in plain_blocks(model):
            fully_shard(block, mesh=mesh, ignored_params=scalars)
        fully_shard(model, mesh=mesh, ignored_params=scalars)
    else:
        model = adaptkit.build(spec, defer_base=dist.enabled)
        if dist.enabled:
            shard_model(model, device, DistInfo(dist.rank, dist.world, dist.local_rank))
    record = {"peak": rss_peak() - before, "held": held_bytes(model), "world": dist.world,
              "build": getattr(getattr(model, "adaptkit", None), "base_build", "")}
    (out / f"{mode}-{dist.rank}.json").write_text(json.dumps(record))
    if dist.enabled:
        from torch import distributed

        distributed.barrier()
        distributed.destroy_process_group()


def launch(name: str, mode: str, path: Path, out: Path, threads: int) -> list[dict[str, Any]]:
    script = [str(Path(__file__).resolve()), "--model", name, "--child", mode, "--path", str(path), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if mode == "one":
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", *script]
    subprocess.run(command, check=True, env=env)
    return [json.loads(p.read_text()) for p in sorted(out.glob(f"{mode}-*.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(FAMILIES), default="vit_b16", help="one of benchmarks/realsize.py's models")
    parser.add_argument("--arch", help="another timm or open_clip architecture of the same family (e.g. vit_small_patch16_224)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", choices=["one", "fsdp", "plain"])
    parser.add_argument("--path", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.arch:
        MODELS[args.model] = {**MODELS[args.model], "arch": args.arch}
    if args.child:
        child(args.model, args.child, args.path, args.out)
        return
    with tempfile.TemporaryDirectory() as folder:
        path = write_checkpoint(args.model, Path(folder) / "weights")
        out = Path(folder) / "out"
        out.mkdir()
        results = {mode: launch(args.model, mode, path, out, args.threads) for mode in ("one", "fsdp", "plain")}
    mib = 2**20
    one = results["one"][0]
    title = MODELS[args.model].get("arch", MODELS[args.model]["title"])
    print(f"\n{title}: LoRA r=8, random weights in {MODELS[args.model]['library']}'s own layout; CPU, gloo")
    print(f"adaptkit fsdp x2: {results['fsdp'][0]['build']}")
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
