"""Real data at size: time to the first step, memory against dataset size, loader throughput
against timm's ``create_loader`` (image folder) and webdataset's ``WebLoader`` (tar shards).

    python benchmarks/data.py                      # 20,000 JPEGs at 256 px (made once, ~2 min)
    python benchmarks/data.py --images 4000 --batches 20

The images are scikit-learn's real 8x8 digits, upscaled to 256 px with a per-image colour
tint and noise (so JPEG decoding does real work). Every figure comes from this run: the
peers read the same files with the same transform, in the same process, alternately.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def make_images(folder: Path, count: int, size: int = 256, classes: int = 10) -> Path:
    """``count`` JPEGs in ``folder/<digit>/`` (made once; reused when already there)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    done = folder / f".complete-{count}"
    if done.exists():
        return folder
    digits = load_digits()
    rng = np.random.default_rng(0)
    for c in range(classes):
        (folder / str(c)).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        k = i % len(digits.target)
        gray = digits.images[k] / 16.0
        big = np.asarray(Image.fromarray((gray * 255).astype("uint8")).resize((size, size), Image.BICUBIC), dtype=np.float32) / 255
        tint = rng.random(3) * 0.6 + 0.2
        rgb = big[..., None] * tint + rng.normal(0, 0.04, (size, size, 3))
        Image.fromarray((rgb.clip(0, 1) * 255).astype("uint8")).save(folder / str(digits.target[k]) / f"{i:06d}.jpg", quality=90)
    done.touch()
    return folder


def make_shards(folder: Path, shards: Path, per_shard: int = 1000) -> str:
    """The same JPEGs as webdataset-layout tar shards (``key.jpg`` + ``key.cls``)."""
    files = sorted(folder.glob("*/*.jpg"))
    shards.mkdir(parents=True, exist_ok=True)
    count = -(-len(files) // per_shard)
    pattern = str(shards / ("train-{%06d..%06d}.tar" % (0, count - 1)))
    if (shards / f".complete-{len(files)}").exists():
        return pattern
    for s in range(count):
        with tarfile.open(shards / f"train-{s:06d}.tar", "w") as tar:
            for path in files[s * per_shard : (s + 1) * per_shard]:
                key = path.stem
                tar.add(path, arcname=f"{key}.jpg")
                label = path.parent.name.encode()
                info = tarfile.TarInfo(f"{key}.cls")
                info.size = len(label)
                tar.addfile(info, io.BytesIO(label))
    (shards / f".complete-{len(files)}").touch()
    return pattern


def subset_folder(source: Path, target: Path, count: int) -> Path:
    """A folder with the first ``count`` images of ``source`` (hard links)."""
    if target.exists() and len(list(target.glob("*/*.jpg"))) == count:
        return target
    files = sorted(source.glob("*/*.jpg"), key=lambda p: p.name)[:count]  # names are global indices: every class
    for path in files:
        (target / path.parent.name).mkdir(parents=True, exist_ok=True)
        if not (target / path.parent.name / path.name).exists():
            os.link(path, target / path.parent.name / path.name)
    return target


# ----------------------------------------------------------------- whole runs
def spec_for(data: dict, out: Path, steps: int = 5) -> dict:
    return {
        "name": "bench_data", "seed": 0,
        # the 2-block ViT-B/16 of the issue, adapted at 224 px
        "backbone": {"name": "vit", "model": "vit_base_patch16_224", "kwargs": {"depth": 2}},
        "methods": [{"name": "lora", "rank": 4}],
        "task": {"name": "classification"},
        "data": {**data, "workers": 2},
        "train": {"max_steps": steps, "batch_size": 32, "eval_every": 10_000, "progress": True, "threads": 2},
        "output": {"dir": str(out), "overwrite": True},
    }


def timed_run(spec: dict, work: Path) -> dict:
    """Run ``adaptkit run`` in a subprocess; seconds to the first step, peak RSS of the
    training process and of its whole process tree (workers included)."""
    import psutil

    yaml_path = work / "spec.yaml"
    import yaml

    yaml_path.write_text(yaml.safe_dump(spec))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "adaptkit.cli", "run", str(yaml_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    handle = psutil.Process(proc.pid)
    first_step = None
    peak_main = peak_tree = 0
    import threading

    def watch() -> None:
        nonlocal peak_main, peak_tree
        while proc.poll() is None:
            try:
                main = handle.memory_info().rss
                tree = main + sum(c.memory_info().rss for c in handle.children(recursive=True))
            except psutil.Error:
                break
            peak_main, peak_tree = max(peak_main, main), max(peak_tree, tree)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    buffer = ""
    output = []
    while True:
        chunk = proc.stdout.read(1)
        if not chunk:
            break
        buffer += chunk
        if first_step is None and "| 1/" in buffer:
            first_step = time.perf_counter() - start
        if chunk in "\r\n":
            output.append(buffer)
            buffer = ""
    proc.wait()
    watcher.join(timeout=1)
    if proc.returncode != 0:
        raise SystemExit("adaptkit run failed:\n" + "".join(output)[-3000:])
    return {"first_step_s": first_step, "total_s": time.perf_counter() - start, "peak_rss_mb": peak_main / 2**20,
            "peak_tree_rss_mb": peak_tree / 2**20}


# ----------------------------------------------------------------- loaders side by side
def throughput(make_iter, batches: int, batch_size: int) -> float:
    """Images/s over ``batches`` batches after two warm-up batches (workers started)."""
    iterator = make_iter()
    for _ in range(2):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


def loaders(folder: Path, pattern: str | None, batches: int, batch_size: int, rounds: int) -> list[tuple[str, float, float]]:
    import torch
    from timm.data import create_dataset, create_loader, resolve_data_config

    import adaptkit
    from adaptkit.data import LoaderOptions, PlannedLoader
    from adaptkit.train import TrainPlan
    from adaptkit.distributed import DistInfo

    torch.set_num_threads(1)
    spec = spec_for({"name": "image_folder", "root": str(folder), "augment": "none", "split": [0.98, 0.01, 0.01]}, Path("/tmp/unused"))
    model = adaptkit.build(spec, keep_data=True)
    cfg = resolve_data_config({}, model=model.backbone.net)
    total = batches + 2

    def ours(dataset):
        plan = TrainPlan(len(dataset), batch_size, 1, max(1, len(dataset) // batch_size), 0, total, 0, DistInfo(), 0)
        return lambda: iter(PlannedLoader(dataset, plan, LoaderOptions(workers=2, persistent_workers=False)))

    def timm_folder():
        dataset = create_dataset("", root=str(folder), split="", is_training=True)
        loader = create_loader(dataset, input_size=cfg["input_size"], batch_size=batch_size, is_training=False,
                               use_prefetcher=False, interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"],
                               crop_pct=cfg["crop_pct"], num_workers=2, persistent_workers=False)
        return iter(loader)

    rows = []
    pairs = [("image folder", ours(model.adaptkit.data.train), timm_folder, "timm create_loader")]
    if pattern is not None:
        import webdataset as wds

        shards_spec = {**spec["data"], "name": "shards", "train": pattern}
        shards_spec.pop("root")
        try:
            shard_model = adaptkit.build({**spec, "data": shards_spec}, keep_data=True)
        except Exception as exc:  # the shards source may be absent in an older checkout
            print(f"shards: skipped ({type(exc).__name__}: {str(exc)[:120]})")
            shard_model = None
        if shard_model is not None:
            transform = shard_model.adaptkit.data.val.transform

            def webdataset_loader():
                urls = sorted(str(p) for p in Path(pattern).parent.glob("train-*.tar"))
                pipeline = (wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil")
                            .to_tuple("jpg", "cls").map_tuple(transform, int).batched(batch_size, partial=False))
                return iter(wds.WebLoader(pipeline, batch_size=None, num_workers=2))

            pairs.append(("tar shards", ours(shard_model.adaptkit.data.train), webdataset_loader, "webdataset WebLoader"))
    for name, our_iter, peer_iter, peer in pairs:
        mine, theirs = [], []
        for _ in range(rounds):  # alternate, so drifting machine load hits both
            mine.append(throughput(our_iter, batches, batch_size))
            theirs.append(throughput(peer_iter, batches, batch_size))
        rows.append((name, statistics.median(mine), statistics.median(theirs), peer))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--small", type=int, default=1_000)
    parser.add_argument("--work", default="/tmp/adaptkit_bench_data")
    parser.add_argument("--batches", type=int, default=30, help="batches timed per loader and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-runs", action="store_true", help="only the loader comparison")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    big = make_images(work / f"folder_{args.images}", args.images)
    small = subset_folder(big, work / f"folder_{args.small}", args.small)
    pattern = make_shards(big, work / f"shards_{args.images}")
    print(f"data ready in {time.perf_counter() - t0:.0f} s: {args.images} JPEGs at 256 px, {len(list(Path(pattern).parent.glob('*.tar')))} shards")

    if not args.skip_runs:
        print("\n| images | time to first step (s) | whole run of 5 steps (s) | peak RSS, training process (MB) | peak RSS, with workers (MB) |")
        print("|---|---|---|---|---|")
        runs = {}
        for count, folder in ((args.small, small), (args.images, big)):
            runs[count] = timed_run(spec_for({"name": "image_folder", "root": str(folder)}, work / f"run_{count}"), work)
            r = runs[count]
            print(f"| {count:,} | {r['first_step_s']:.1f} | {r['total_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['peak_tree_rss_mb']:.0f} |")
        ratio = runs[args.images]["peak_rss_mb"] / runs[args.small]["peak_rss_mb"]
        print(f"\npeak RSS {args.images:,} / {args.small:,} images: {ratio:.3f} (goal: within 1.10)")

    print("\n| data | ours, images/s | peer, images/s | ours / peer | peer |")
    print("|---|---|---|---|---|")
    for name, mine, theirs, peer in loaders(big, pattern, args.batches, 64, args.rounds):
        print(f"| {name} | {mine:.0f} | {theirs:.0f} | {mine / theirs:.2f} | {peer} |")


if __name__ == "__main__":
    main()
