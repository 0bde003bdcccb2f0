"""Benchmark: every adaptation method on a tiny ViT and a tiny Swin, digits 0-4 -> digits 5-9.

Real transfer on real data: each backbone is pretrained (full training) on digits 0-4
of scikit-learn's bundled digits, then adapted to digits 5-9 with a new head by a
linear probe (head only), full fine-tuning, and each method with its recommended
settings (the lr / weight decay its plugin registers). Every adaptation runs for
several seeds; the test split of digits 5-9 holds only 134 images, so accuracy is
also given on validation + test together (268 images).

Columns: trainable parameters (share of the model, head included), test accuracy
(mean +- sd over seeds), val+test accuracy (mean), time of one training step at
batch 64, peak memory of training (weights + AdamW state + the largest transient
allocation inside one profiled step), and the size of the saved adapter file.

    python benchmarks/methods.py                      # the full benchmark (~30 min, 1 thread)
    python benchmarks/methods.py --backbones vit --methods lora prompt --seeds 0
    python benchmarks/methods.py --methods full lora adapter --label-smoothing 0
    python benchmarks/methods.py --backbones vit --setting 'lora lr2e-2={"methods": [{"name": "lora", "rank": 2}], "lr": 0.02}'
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import adaptkit
from adaptkit.builder import count_parameters
from adaptkit.rundir import RunDir

PRESETS = {"vit": "vit_tiny_digits", "swin": "swin_tiny_digits"}

#: the adaptations compared; None for lr/weight_decay means "the method's recommendation"
SETTINGS: dict[str, dict[str, Any]] = {
    "linear probe": {"methods": [], "lr": 3e-2, "weight_decay": 0.0},
    "full": {"methods": [{"name": "full"}]},
    # q, v, out, mlp in/out: under 5% of the model (all six roles at r=2 would be 5.2%)
    "lora": {"methods": [{"name": "lora", "rank": 2, "targets": ["attn.q", "attn.v", "attn.out", "mlp.in", "mlp.out"]}]},
    # the same budget spent on the fused qkv layer as one module (one rank-2 update of q, k and v together)
    "lora qkv": {"methods": [{"name": "lora", "rank": 2, "targets": ["attn.out", "mlp.in", "mlp.out"], "target_modules": [r"attn\.qkv$"]}]},
    "adapter": {"methods": [{"name": "adapter"}]},
    "prefix": {"methods": [{"name": "prefix"}]},
    "prompt": {"methods": [{"name": "prompt"}]},
}


def base_spec(backbone: str, name: str, out: Path) -> dict[str, Any]:
    return {
        "name": name,
        "backbone": {"name": backbone, "model": PRESETS[backbone]},
        "task": {"name": "classification", "label_smoothing": 0.1},
        "output": {"dir": str(out / name), "overwrite": True},
    }


def pretrain(backbone: str, out: Path, epochs: int) -> Path:
    """Full training on digits 0-4; reuses a finished run of the same spec."""
    spec = base_spec(backbone, f"pretrain_{backbone}", out)
    spec.update(
        methods=[{"name": "full"}],
        data={"name": "digits", "classes": [0, 1, 2, 3, 4], "shift": 1},
        train={"epochs": epochs, "lr": 3e-3, "weight_decay": 0.05, "progress": False, "eval_every": 10_000},
    )
    loaded = adaptkit.load_spec(spec)
    previous = RunDir.at(out / loaded.name)
    marker = previous.read_marker() or {}
    if marker.get("status") == "done" and marker.get("spec_fingerprint") == loaded.fingerprint():
        print(f"{backbone}: reusing {previous.path}", flush=True)
        return previous.adapter
    started = time.perf_counter()
    result = adaptkit.run(loaded, log=lambda *_: None)
    print(f"{backbone}: pretrained on digits 0-4 in {time.perf_counter() - started:.0f} s, "
          f"test accuracy {result.metrics['test']['accuracy']:.3f}", flush=True)
    return result.output_dir / "adapter.safetensors"


def adapt_spec(
    backbone: str, method: str, weights: Path, seed: int, steps: int, out: Path, label_smoothing: float = 0.1
) -> dict[str, Any]:
    setting = SETTINGS[method]
    suffix = "" if label_smoothing == 0.1 else f"_ls{label_smoothing:g}"
    spec = base_spec(backbone, f"{backbone}_{method.replace(' ', '_')}{suffix}_s{seed}", out)
    spec["task"]["label_smoothing"] = label_smoothing
    spec["backbone"]["pretrained"] = str(weights)
    train = {"max_steps": steps, "batch_size": 64, "progress": False, "eval_every": steps}
    for key in ("lr", "weight_decay"):
        if key in setting:
            train[key] = setting[key]
    spec.update(seed=seed, methods=setting["methods"], data={"name": "digits", "classes": [5, 6, 7, 8, 9], "shift": 1}, train=train)
    return spec


def step_cost(spec: dict[str, Any], lr: float, repeats: int = 20) -> tuple[float, float]:
    """(ms per training step at batch 64, peak training memory in MB)."""
    from torch.profiler import ProfilerActivity, profile

    model = adaptkit.build(spec, keep_data=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    batch = model.adaptkit.data.train.batch(range(64))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(batch).loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    ms = 1000 * (time.perf_counter() - started) / repeats
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    adam_state = 2 * sum(p.numel() * p.element_size() for p in params)
    return ms, (weights + adam_state + _peak_allocated(prof)) / 2**20


def _peak_allocated(prof: Any) -> int:
    """The most CPU memory allocated at once inside the profiled step (bytes), from its trace."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0]
    return max(totals, default=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--methods", nargs="+", choices=list(SETTINGS), help="default: every setting (or only --setting ones)")
    parser.add_argument("--setting", action="append", default=[], metavar="NAME=JSON",
                        help='an extra setting, e.g. \'ad lr1e-2={"methods": [{"name": "adapter"}], "lr": 0.01}\'')
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=1000, help="adaptation steps at batch 64")
    parser.add_argument("--pretrain-epochs", type=int, default=250)
    parser.add_argument("--out", default="runs/bench_methods")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--label-smoothing", type=float, default=0.1, help="of the adaptation runs (pretraining keeps 0.1)")
    args = parser.parse_args()
    for item in args.setting:
        name, sep, text = item.partition("=")
        if not sep or not name:
            parser.error(f"--setting {item!r}: give NAME=JSON")
        try:
            SETTINGS[name] = json.loads(text)
        except json.JSONDecodeError as exc:
            parser.error(f"--setting {name}: not JSON: {exc}")
    if args.methods is None:
        args.methods = [i.partition("=")[0] for i in args.setting] or list(SETTINGS)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    rows: dict[str, list[dict[str, Any]]] = {}
    started = time.perf_counter()
    for backbone in args.backbones:
        weights = pretrain(backbone, out, args.pretrain_epochs)
        rows[backbone] = []
        for method in args.methods:
            runs = []
            for seed in args.seeds:
                spec = adapt_spec(backbone, method, weights, seed, args.steps, out, args.label_smoothing)
                result = adaptkit.run(spec, log=lambda *_: None)
                summary = json.loads((result.output_dir / "metrics.json").read_text())
                runs.append(summary)
                print(f"  {backbone} {method} seed {seed}: test {summary['test']['accuracy']:.3f} "
                      f"val {summary['val']['accuracy']:.3f}", flush=True)
            loaded = adaptkit.load_spec(adapt_spec(backbone, method, weights, args.seeds[0], args.steps, out, args.label_smoothing))
            from adaptkit.builder import recommended

            lr = recommended(loaded, adaptkit.registry(), "lr", 1e-3)
            ms, peak = step_cost(loaded, lr)
            model = adaptkit.build(loaded)
            trainable, total = count_parameters(model)
            tests = [r["test"]["accuracy"] for r in runs]
            both = [(r["test"]["accuracy"] * r["test"]["count"] + r["val"]["accuracy"] * r["val"]["count"])
                    / (r["test"]["count"] + r["val"]["count"]) for r in runs]
            rows[backbone].append({
                "method": method, "trainable": trainable, "percent": 100 * trainable / total, "lr": lr,
                "test": statistics.mean(tests), "test_sd": statistics.pstdev(tests) if len(tests) > 1 else 0.0,
                "val_test": statistics.mean(both), "ms": ms, "peak_mb": peak,
                "kb": statistics.mean(r["adapter_bytes"] for r in runs) / 1024,
            })
    print(f"\nseeds {args.seeds}, {args.steps} adaptation steps at batch 64, label smoothing {args.label_smoothing:g}, "
          f"{args.threads} thread(s); "
          f"total {(time.perf_counter() - started) / 60:.1f} min\n")
    for backbone, table in rows.items():
        print(f"{backbone} ({PRESETS[backbone]}), digits 0-4 -> 5-9\n")
        print("| method | lr | trainable params (%) | test acc (mean ± sd) | val+test acc | step (ms) | peak memory (MB) | checkpoint (KB) |")
        print("|---|---|---|---|---|---|---|---|")
        for r in table:
            print(f"| {r['method']} | {r['lr']:g} | {r['trainable']:,} ({r['percent']:.2f}%) | {r['test']:.3f} ± {r['test_sd']:.3f} "
                  f"| {r['val_test']:.3f} | {r['ms']:.1f} | {r['peak_mb']:.1f} | {r['kb']:.1f} |")
        print()
    suffix = "" if args.label_smoothing == 0.1 else f"_ls{args.label_smoothing:g}"
    (out / f"results{suffix}.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
