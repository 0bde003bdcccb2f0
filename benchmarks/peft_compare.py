"""adaptkit's LoRA against Hugging Face PEFT's, in one process, on the same models.

Models: timm ViT-S/16 at 224x224 (preset ``vit_small_16``) and open_clip ViT-S-16 with its
image tower at 112x112 (a CPU-sized config; classification uses the image tower), both
randomly initialised (no network here; speed does not depend on the weights). Both
libraries adapt the same layers with the same rank: the whole fused q/k/v projection, the
attention output projection and both MLP layers of every block (for open_clip, PEFT's
LoRA on ``nn.MultiheadAttention`` covers in_proj + out_proj), rank 8, alpha 16, plus a
trainable classification head (PEFT: ``modules_to_save``; open_clip has no classifier, so
there the head sits outside the model for both).

Measured, one thread, the variants of a repetition run back to back in a rotating order
and each figure is the median over repetitions (paired ratios: per repetition), in CPU
time of the process (the computation's own time: on a shared machine wall time also
counts other jobs; wall-time ratios are printed too):

- training step (forward, cross-entropy, backward, AdamW step) of our LoRA over PEFT's,
  and of a full fine-tuning step over our LoRA step;
- inference (eval, no grad) of our LoRA and PEFT's, unmerged and merged (ours merged in
  place: the hooks are gone; PEFT: ``merge_adapter``), over the plain base model;
- peak training memory (weights + AdamW state + the largest net allocation inside one
  profiled step) and checkpoint size (our adapter file, PEFT's adapter_model.safetensors).

Usage::

    python benchmarks/peft_compare.py                       # both models, defaults below
    python benchmarks/peft_compare.py --models vit --reps 5 # quicker
    python benchmarks/peft_compare.py --cli                 # also time `adaptkit plugins` / `validate`
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import adaptkit
from adaptkit.native import native_copy

ROOT = Path(__file__).resolve().parents[1]

MODELS = {
    "vit": {
        "title": "timm ViT-S/16, 224x224",
        "backbone": {"name": "vit", "model": "vit_small_16"},
        "data": {"name": "digits", "channels": 3},
        "ours": {"targets": ["attn.out", "mlp.in", "mlp.out"], "target_modules": [r"attn\.qkv$"]},
        "peft_targets": r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)",
        "image": 224,
    },
    "clip": {
        "title": "open_clip ViT-S-16, image tower at 112x112",
        "backbone": {"name": "clip", "model": "ViT-S-16", "image_size": 112},
        "data": {"name": "digits", "channels": 3},
        "ours": {"targets": ["attn.out", "mlp.in", "mlp.out"], "target_modules": [r"visual\..*attn\.in_proj$"], "tower": "vision"},
        "peft_targets": r"visual\.transformer\.resblocks\.\d+\.(attn|mlp\.c_fc|mlp\.c_proj)",
        "image": 112,
    },
}


def spec_for(model: str, methods: list[dict[str, Any]]) -> dict[str, Any]:
    cfg = MODELS[model]
    return {"name": f"bench_{model}", "seed": 0, "backbone": cfg["backbone"], "methods": methods,
            "task": {"name": "classification", "num_classes": 10}, "data": cfg["data"]}


class Variant:
    """One model to time: ``forward(images)`` gives logits; ``params`` are what a step trains."""

    def __init__(self, name: str, forward: Callable[[torch.Tensor], torch.Tensor], modules: list[torch.nn.Module]) -> None:
        self.name, self.forward, self.modules = name, forward, modules
        self.params = [p for m in modules for p in m.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4) if self.params else None

    def train(self, mode: bool) -> None:
        for m in self.modules:
            m.train(mode)

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(self.forward(images), labels).backward()
        self.optimizer.step()

    @torch.inference_mode()
    def infer(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward(images)


def randomise_lora(module: torch.nn.Module, seed: int) -> None:
    """Non-zero LoRA factors (B starts at zero); values do not change speed, only make outputs comparable."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)


def build_variants(model: str, rank: int) -> tuple[dict[str, Variant], dict[str, Any]]:
    import peft

    cfg = MODELS[model]
    lora = {"name": "lora", "rank": rank, "alpha": 2 * rank, **cfg["ours"]}
    ours = adaptkit.build(spec_for(model, [lora]))
    randomise_lora(ours, 0)
    ours_merged = adaptkit.build(spec_for(model, [lora]))  # same seed: same base weights
    ours_merged.load_state_dict(ours.state_dict())
    for method in ours_merged.adaptkit.methods:
        method.merge()
    full = adaptkit.build(spec_for(model, [{"name": "full"}]))
    plain = native_copy(ours).model  # plain timm / open_clip with the same base weights (and head, for timm)
    is_clip = model == "clip"
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=cfg["peft_targets"],
                             modules_to_save=None if is_clip else ["head"])
    theirs = peft.get_peft_model(copy.deepcopy(plain), config)
    randomise_lora(theirs, 0)
    theirs_merged = copy.deepcopy(theirs)
    theirs_merged.merge_adapter()
    base_backbone = ours.backbone

    if is_clip:  # open_clip has no classifier: one head outside the model, for every variant
        head = copy.deepcopy(ours.head)
        peft_head = copy.deepcopy(ours.head)

        def native(net: Any, h: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
            return lambda x: h(net.encode_image(base_backbone.normalise_images(x)))

        variants = {
            "base": Variant("base", native(plain, head), [plain, head]),
            "peft": Variant("peft", native(theirs, peft_head), [theirs, peft_head]),
            "peft_merged": Variant("peft_merged", native(theirs_merged, peft_head), [theirs_merged, peft_head]),
        }
    else:
        variants = {
            "base": Variant("base", plain, [plain]),
            "peft": Variant("peft", theirs, [theirs]),
            "peft_merged": Variant("peft_merged", theirs_merged, [theirs_merged]),
        }
    variants.update({
        "ours": Variant("ours", ours.logits, [ours]),
        "ours_merged": Variant("ours_merged", ours_merged.logits, [ours_merged]),
        "full": Variant("full", full.logits, [full]),
    })
    images = torch.randn(8, 3, cfg["image"], cfg["image"], generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ours.eval(), theirs.eval(), ours_merged.eval(), theirs_merged.eval()
        reference = variants["ours"].infer(images[:2])
        agreement = {
            "ours merged vs unmerged": (variants["ours_merged"].infer(images[:2]) - reference).abs().max().item(),
            "peft vs ours": (variants["peft"].infer(images[:2]) - reference).abs().max().item(),
        }
    sizes = checkpoint_sizes(ours, theirs)
    counts = {"ours": sum(p.numel() for p in variants["ours"].params), "peft": sum(p.numel() for p in variants["peft"].params),
              "full": sum(p.numel() for p in variants["full"].params)}
    return variants, {"agreement": agreement, "sizes": sizes, "trainable": counts}


def checkpoint_sizes(ours: torch.nn.Module, theirs: Any) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as folder:
        path = adaptkit.save_adapter(ours, Path(folder) / "adapter.safetensors")
        theirs.save_pretrained(Path(folder) / "peft")
        return {"ours": path.stat().st_size, "peft": (Path(folder) / "peft" / "adapter_model.safetensors").stat().st_size}


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) of one call.

    CPU time leaves out the time the OS gives other jobs on a shared machine (with one
    thread it is the computation's own time); wall time includes it.
    """
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def measure(variants: dict[str, Variant], names: list[str], action: str, images: torch.Tensor, labels: torch.Tensor,
            reps: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(CPU, wall) seconds per call of each variant, per repetition; the order rotates every repetition."""
    for name in names:
        variants[name].train(action == "train")
        for _ in range(2):  # warm-up
            _run(variants[name], action, images, labels)
    cpu: dict[str, list[float]] = {n: [] for n in names}
    wall: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            c, w = timed(lambda v=variants[name]: _run(v, action, images, labels))
            cpu[name].append(c)
            wall[name].append(w)
    return cpu, wall


def _run(variant: Variant, action: str, images: torch.Tensor, labels: torch.Tensor) -> None:
    if action == "train":
        variant.step(images, labels)
    else:
        variant.infer(images)


def peak_memory(variant: Variant, images: torch.Tensor, labels: torch.Tensor) -> float:
    """MB: weights + AdamW state + the largest net allocation inside one profiled training step."""
    from torch.profiler import ProfilerActivity, profile

    variant.train(True)
    variant.step(images, labels)  # AdamW state exists from here on
    variant.optimizer.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        variant.step(images, labels)
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0), key=lambda e: e["ts"])
    # the allocator's total before the step's first allocation, and its highest point during the step
    start = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"] if memory else 0
    peak = max((e["args"]["Total Allocated"] for e in memory), default=start) - start
    seen: set[int] = set()
    weights = 0
    for module in variant.modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                weights += p.numel() * p.element_size()
    state = sum(t.numel() * t.element_size() for s in variant.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    return (weights + state + peak) / 2**20


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4) if len(values) >= 4 else [min(values), 0, max(values)]
    return f"{q[0]:.3f}-{q[2]:.3f}"


def run_model(model: str, args: argparse.Namespace) -> dict[str, Any]:
    variants, facts = build_variants(model, args.rank)
    cfg = MODELS[model]
    gen = torch.Generator().manual_seed(2)
    images = torch.randn(args.batch, 3, cfg["image"], cfg["image"], generator=gen)
    labels = torch.randint(0, 10, (args.batch,), generator=gen)
    train_cpu, train_wall = measure(variants, ["ours", "peft", "full"], "train", images, labels, args.reps)
    infer_cpu, infer_wall = measure(variants, ["base", "ours", "peft", "ours_merged", "peft_merged"], "infer", images, labels, args.reps)
    memory = {n: peak_memory(variants[n], images, labels) for n in ("ours", "peft", "full")}

    def ratios(train: dict[str, list[float]], infer: dict[str, list[float]]) -> dict[str, list[float]]:
        def paired(times: dict[str, list[float]], a: str, b: str) -> list[float]:
            return [x / y for x, y in zip(times[a], times[b])]

        return {
            "train ours/peft": paired(train, "ours", "peft"),
            "train full/ours": paired(train, "full", "ours"),
            **{f"infer {n}/base": paired(infer, n, "base") for n in ("ours", "peft", "ours_merged", "peft_merged")},
        }

    return {
        "model": cfg["title"], "facts": facts, "memory_mb": memory,
        "train_ms": {n: 1000 * median(t) for n, t in train_cpu.items()},
        "infer_ms": {n: 1000 * median(t) for n, t in infer_cpu.items()},
        "train_wall_ms": {n: 1000 * median(t) for n, t in train_wall.items()},
        "ratios": ratios(train_cpu, infer_cpu),
        "wall_ratios": ratios(train_wall, infer_wall),
    }


def cli_times(reps: int = 5) -> dict[str, list[float]]:
    """Seconds of `adaptkit plugins` and `adaptkit validate examples/*.yaml` in fresh processes."""
    examples = sorted(str(p) for p in (ROOT / "examples").glob("*.yaml"))
    commands = {"adaptkit plugins": ["plugins"], "adaptkit validate examples/*.yaml": ["validate", *examples]}
    out: dict[str, list[float]] = {k: [] for k in commands}
    for _ in range(reps):
        for name, argv in commands.items():
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "adaptkit.cli", *argv], check=True, capture_output=True, cwd=ROOT)
            out[name].append(time.perf_counter() - started)
    return out


def print_tables(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"\nrank {args.rank}, alpha {2 * args.rank}, batch {args.batch}, {args.reps} repetitions, {torch.get_num_threads()} thread(s)\n")
    keys = ("train ours/peft", "train full/ours", "infer ours/base", "infer peft/base", "infer ours_merged/base", "infer peft_merged/base")
    for label, field in (("CPU time", "ratios"), ("wall time", "wall_ratios")):
        print(f"{label}: | model | our step / PEFT step | full step / our step | ours unmerged / base | PEFT unmerged / base | ours merged / base | PEFT merged / base |")
        print("|---|---|---|---|---|---|---|")
        for result in results.values():
            r = result[field]
            print(f"| {result['model']} | " + " | ".join(f"{median(r[k]):.3f} ({spread(r[k])})" for k in keys) + " |")
        print()
    print("(median of per-repetition ratios; in brackets the interquartile range; the ms below are CPU time)\n")
    print("| model | step ms: ours / PEFT / full | inference ms: base / ours / PEFT / ours merged / PEFT merged | trainable: ours / PEFT / full | peak training MB: ours / PEFT / full | checkpoint KB: ours / PEFT |")
    print("|---|---|---|---|---|---|")
    for result in results.values():
        t, i, m, c, s = result["train_ms"], result["infer_ms"], result["memory_mb"], result["facts"]["trainable"], result["facts"]["sizes"]
        print(f"| {result['model']} | {t['ours']:.0f} / {t['peft']:.0f} / {t['full']:.0f} | "
              f"{i['base']:.0f} / {i['ours']:.0f} / {i['peft']:.0f} / {i['ours_merged']:.0f} / {i['peft_merged']:.0f} | "
              f"{c['ours']:,} / {c['peft']:,} / {c['full']:,} | {m['ours']:.0f} / {m['peft']:.0f} / {m['full']:.0f} | "
              f"{s['ours'] / 1024:.0f} / {s['peft'] / 1024:.0f} |")
    for result in results.values():
        shown = ", ".join(f"{k} {v:.1e}" for k, v in result["facts"]["agreement"].items())
        print(f"\n{result['model']}: largest output difference: {shown}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cli", action="store_true", help="also time `adaptkit plugins` and `adaptkit validate`")
    parser.add_argument("--json", help="write the raw numbers here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import logging

    logging.disable(logging.WARNING)
    started = time.time()
    results = {model: run_model(model, args) for model in args.models}
    print_tables(results, args)
    if args.cli:
        times = cli_times()
        print("\n| command | median s (min-max of 5) |\n|---|---|")
        for name, values in times.items():
            print(f"| `{name}` | {median(values):.2f} ({min(values):.2f}-{max(values):.2f}) |")
    print(f"\ntotal {time.time() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
