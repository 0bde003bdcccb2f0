"""Real-size models, side by side with the plain libraries and HF PEFT: one table per model, measured in one run.

Each model gets random weights written in its library's own on-disk layout (timm's
``save_for_hf`` hub directory, open_clip's ``open_clip_config.json`` + safetensors, a
diffusers ``save_pretrained`` folder, a rosinality ``.pt``), which adaptkit loads by
``pretrained: DIR`` alone and the plain library by its own loader. Measured:

- build + load: ``adaptkit.build`` (backbone, task, data, fingerprint from the cache) against
  the library's own create + load (``timm.create_model('local-dir:DIR', pretrained=True)``,
  ``open_clip.create_model('local-dir:DIR')``, ``from_pretrained(DIR)``, rosinality's
  ``Generator`` + ``load_state_dict``); the first, uncached build (it hashes the weights) too;
- training step (forward, loss, backward, AdamW) of our LoRA against PEFT's LoRA on the same
  native model and the same layers, and against our full fine-tuning step: in one process,
  the variants alternating, median of ``--reps`` paired ratios of CPU time;
- peak memory of a training step in a fresh process for LoRA, full fine-tuning, LoRA +
  gradient checkpointing and LoRA + bf16 base: RSS on CPU (the process's high-water mark,
  reset after the build: ``step`` = what the steps add over the built model), or
  ``torch.cuda.max_memory_allocated`` on CUDA;
- the adapter file: ours and PEFT's.

Usage::

    python benchmarks/realsize.py --models vit_b16                 # the CPU-sized run in BENCHMARKS.md
    python benchmarks/realsize.py --device cuda --json out.json    # every model, on a GPU
    python benchmarks/realsize.py --models sd_unet --skip-full     # the SD 1.5 UNet where AdamW over 860M parameters does not fit
"""

from __future__ import annotations

import argparse
import json
import os
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peft_compare import randomise_lora, timed  # noqa: E402  (the same timing as the ViT-S comparison)

TIMM_TARGETS = {"targets": ["attn.out", "mlp.in", "mlp.out"], "target_modules": [r"attn\.qkv$"]}
UNET_SD15 = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768, "attention_head_dim": 8,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

MODELS: dict[str, dict[str, Any]] = {
    "vit_b16": {"title": "timm ViT-B/16 @224, batch 8", "library": "timm", "arch": "vit_base_patch16_224", "backbone": "vit",
                "batch": 8, "ours": TIMM_TARGETS, "peft": r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"},
    "swin_b": {"title": "timm Swin-B @224, batch 8", "library": "timm", "arch": "swin_base_patch4_window7_224", "backbone": "swin",
               "batch": 8, "ours": TIMM_TARGETS, "peft": r"layers\.\d+\.blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"},
    "clip_b32": {"title": "open_clip ViT-B-32 (both towers), batch 8", "library": "open_clip", "arch": "ViT-B-32", "backbone": "clip",
                 "batch": 8, "ours": {"targets": ["attn.out", "mlp.in", "mlp.out"], "target_modules": [r"attn\.in_proj$"], "tower": "both"},
                 "peft": r"(visual\.)?transformer\.resblocks\.\d+\.(attn|mlp\.c_fc|mlp\.c_proj)"},
    "sd_unet": {"title": "diffusers UNet2DConditionModel, Stable Diffusion 1.5 config, 64x64 latents, batch 1", "library": "diffusers",
                "batch": 1, "ours": {"targets": ["attn.q", "attn.k", "attn.v", "attn.out"]},
                "peft": r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)$"},
    # EqualLinear is an nn.Linear (its equalized-lr scale is a forward pre-hook), so PEFT's own lora.Linear wraps it;
    # PEFT full-matches a string target against the whole module name
    "stylegan2_256": {"title": "StyleGAN2 (rosinality layout) 256x256, batch 4", "library": "stylegan2", "batch": 4, "size": 256,
                      "ours": {"targets": ["modulation"]}, "peft": r".*\.modulation"},
}
MEMORY_CONFIGS = ("lora", "full", "lora_gc", "lora_bf16")


# ----------------------------------------------------------------- checkpoints in the libraries' layouts
def write_checkpoint(name: str, folder: Path) -> Path:
    """Random weights of ``name`` in its library's own layout under ``folder``; the path ``pretrained`` takes."""
    cfg = MODELS[name]
    torch.manual_seed(0)
    if cfg["library"] == "timm":
        import timm
        from timm.models import save_for_hf

        save_for_hf(timm.create_model(cfg["arch"], pretrained=False), folder, safe_serialization=True)
        return folder
    if cfg["library"] == "open_clip":
        import open_clip
        from open_clip.push_to_hf_hub import save_config_for_hf
        from safetensors.torch import save_file

        net = open_clip.create_model(cfg["arch"], pretrained=None)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(net.state_dict(), str(folder / "open_clip_model.safetensors"))
        save_config_for_hf(net, folder / "open_clip_config.json", model_config=open_clip.get_model_config(cfg["arch"]))
        return folder
    if cfg["library"] == "diffusers":
        import diffusers

        diffusers.UNet2DConditionModel(**UNET_SD15).save_pretrained(folder)
        return folder
    from adaptkit_plugins.stylegan.generator import save_generator
    from adaptkit_plugins.stylegan.networks import Generator, default_channels

    folder.mkdir(parents=True, exist_ok=True)
    size = cfg["size"]
    generator = Generator(size=size, style_dim=512, n_mlp=8, channels={k: v for k, v in default_channels(2).items() if k <= size},
                          img_channels=3, lr_mlp=0.01)
    return save_generator(generator, folder / f"stylegan2-{size}.pt", latent_avg=torch.zeros(512))


def plain_load(name: str, path: Path) -> torch.nn.Module:
    """The library's own create + load of the checkpoint."""
    library = MODELS[name]["library"]
    if library == "timm":
        import timm

        return timm.create_model(f"local-dir:{path}", pretrained=True)
    if library == "open_clip":
        import open_clip

        return open_clip.create_model(f"local-dir:{path}")
    if library == "diffusers":
        import diffusers

        return diffusers.UNet2DConditionModel.from_pretrained(path)
    from adaptkit_plugins.stylegan.generator import config_of_state
    from adaptkit_plugins.stylegan.networks import Generator

    state = torch.load(path, map_location="cpu", weights_only=True)["g_ema"]
    config = config_of_state(state)
    generator = Generator(size=config["size"], style_dim=config["style_dim"], n_mlp=config["n_mlp"], channels=config["channels"],
                          img_channels=config["img_channels"], lr_mlp=0.01)
    generator.load_state_dict(state, strict=False)
    return generator


def spec_for(name: str, path: Path, methods: list[dict[str, Any]], dtype: str = "fp32") -> dict[str, Any]:
    cfg = MODELS[name]
    library = cfg["library"]
    if library == "timm":
        backbone, task, data = {"name": cfg["backbone"]}, {"name": "classification", "num_classes": 10}, {"name": "digits"}
    elif library == "open_clip":
        backbone, task, data = {"name": "clip"}, {"name": "zero_shot"}, {"name": "digits", "classes": [0, 1]}
    elif library == "diffusers":
        backbone = {"name": "ddpm_unet", "conditioning": "class", "num_classes": 10}
        task, data = {"name": "text_to_image", "preview": 0}, {"name": "digits"}
    else:
        backbone, task, data = {"name": "stylegan2"}, {"name": "stylegan2"}, {"name": "digits"}
    return {"name": f"realsize_{name}", "seed": 0, "backbone": {**backbone, "pretrained": str(path), "dtype": dtype},
            "methods": methods, "task": task, "data": data}


def lora_params(name: str, rank: int) -> dict[str, Any]:
    return {"name": "lora", "rank": rank, "alpha": 2 * rank, "dropout": 0.0, **MODELS[name]["ours"]}


# ----------------------------------------------------------------- one training step, the same for every variant
def make_batch(name: str, device: torch.device) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    batch = MODELS[name]["batch"]
    library = MODELS[name]["library"]
    if library in ("timm", "open_clip"):
        out = {"images": torch.randn(batch, 3, 224, 224, generator=gen), "labels": torch.randint(0, 10, (batch,), generator=gen)}
        if library == "open_clip":
            out["text"] = torch.randint(1, 49000, (batch, 77), generator=gen)
    elif library == "diffusers":
        out = {"x": torch.randn(batch, 4, 64, 64, generator=gen), "t": torch.randint(0, 1000, (batch,), generator=gen),
               "context": torch.randn(batch, 77, 768, generator=gen), "noise": torch.randn(batch, 4, 64, 64, generator=gen)}
    else:
        out = {"z": torch.randn(batch, 512, generator=gen)}
    return {k: v.to(device) for k, v in out.items()}


def loss_fn(name: str, model: Any, ours: bool) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """The step's loss for our built model (``ours``) or a native / PEFT-wrapped one."""
    library = MODELS[name]["library"]
    if library == "timm":
        forward = model.logits if ours else model
        return lambda b: F.cross_entropy(forward(b["images"]), b["labels"])
    if library == "open_clip":
        net = model.backbone.net if ours else model

        def clip_loss(b: dict[str, torch.Tensor]) -> torch.Tensor:
            image = F.normalize(net.encode_image(b["images"]), dim=-1)
            text = F.normalize(net.encode_text(b["text"]), dim=-1)
            logits = 100 * image @ text.T
            target = torch.arange(len(logits), device=logits.device)
            return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

        return clip_loss
    if library == "diffusers":
        if ours:
            return lambda b: F.mse_loss(model.backbone.predict_noise(b["x"], b["t"], {"context": b["context"]}), b["noise"])
        return lambda b: F.mse_loss(model(b["x"], b["t"], encoder_hidden_states=b["context"]).sample, b["noise"])
    generator = model.backbone.generator if ours else model
    return lambda b: generator.synthesis(generator.mapping(b["z"])).square().mean()


def trained_part(name: str, model: torch.nn.Module) -> torch.nn.Module:
    """The part of our built model that a step trains: the generator of the StyleGAN task (whose
    discriminator, trainable too, takes no part in this step), else the whole model."""
    return model.backbone.generator if MODELS[name]["library"] == "stylegan2" else model


class Variant:
    """One model to time: a loss over a batch, and the parameters a step trains."""

    def __init__(self, loss: Callable[[dict[str, torch.Tensor]], torch.Tensor], modules: list[torch.nn.Module]) -> None:
        self.loss, self.modules = loss, modules
        self.params = [p for m in modules for p in m.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5)

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss(batch).backward()
        self.optimizer.step()


def build_variants(name: str, path: Path, rank: int, device: torch.device, with_full: bool = True) -> tuple[dict[str, Variant], dict[str, Any]]:
    import peft

    from adaptkit.native import native_copy

    ours = adaptkit.build(spec_for(name, path, [lora_params(name, rank)])).to(device)
    randomise_lora(ours, 0)
    full = adaptkit.build(spec_for(name, path, [{"name": "full"}])).to(device) if with_full else None
    plain = native_copy(ours).model.to(device)  # a model of its own: PEFT wraps it in place
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=MODELS[name]["peft"],
                             modules_to_save=["head"] if MODELS[name]["library"] == "timm" else None)
    theirs = peft.get_peft_model(plain, config)
    randomise_lora(theirs, 0)
    variants = {"ours": Variant(loss_fn(name, ours, True), [trained_part(name, ours)]),
                "peft": Variant(loss_fn(name, theirs, False), [theirs])}
    if full is not None:
        variants["full"] = Variant(loss_fn(name, full, True), [trained_part(name, full)])
    with tempfile.TemporaryDirectory() as folder:
        sizes = {"ours": adaptkit.save_adapter(ours, Path(folder) / "adapter.safetensors").stat().st_size}
        theirs.save_pretrained(Path(folder) / "peft")
        sizes["peft"] = (Path(folder) / "peft" / "adapter_model.safetensors").stat().st_size
    counts = {k: sum(p.numel() for p in v.params) for k, v in variants.items()}
    total = sum(p.numel() for p in ours.parameters())
    return variants, {"adapter_bytes": sizes, "trainable": counts, "total_params": total}


def time_steps(variants: dict[str, Variant], batch: dict[str, torch.Tensor], reps: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per step of each variant, per repetition (CPU time on CPU, synchronised wall time on CUDA)."""
    for variant in variants.values():
        for module in variant.modules:
            module.train()
        variant.step(batch)  # warm-up (AdamW state exists from here)
    names = list(variants)
    out: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        for n in names[rep % len(names):] + names[: rep % len(names)]:
            if device.type == "cuda":
                torch.cuda.synchronize()
                started = time.perf_counter()
                variants[n].step(batch)
                torch.cuda.synchronize()
                out[n].append(time.perf_counter() - started)
            else:
                out[n].append(timed(lambda v=variants[n]: v.step(batch))[0])
    return out


def time_builds(name: str, path: Path, reps: int) -> dict[str, Any]:
    """Seconds (CPU, wall) of our base build and the library's create + load, alternating; the uncached build once."""
    spec = spec_for(name, path, [])
    with tempfile.TemporaryDirectory() as cache:  # an empty fingerprint cache: the first build hashes the weights
        previous = os.environ.get("ADAPTKIT_CACHE_DIR")
        os.environ["ADAPTKIT_CACHE_DIR"] = cache
        try:
            cold = timed(lambda: adaptkit.build(spec))
            ours, plain = [], []
            for rep in range(reps):
                pair = [("ours", lambda: adaptkit.build(spec)), ("plain", lambda: plain_load(name, path))]
                for label, fn in pair if rep % 2 == 0 else pair[::-1]:
                    (ours if label == "ours" else plain).append(timed(fn))
        finally:
            if previous is None:
                os.environ.pop("ADAPTKIT_CACHE_DIR", None)
            else:
                os.environ["ADAPTKIT_CACHE_DIR"] = previous
    return {"cold": cold, "ours": ours, "plain": plain}


# ----------------------------------------------------------------- peak memory, one fresh process per configuration
def rss_now() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_peak() -> int:
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM (the peak RSS) to the current RSS
        return True
    except OSError:
        return False


def memory_child(name: str, path: Path, config: str, rank: int, device: torch.device, steps: int = 2) -> dict[str, Any]:
    """Build one configuration, run ``steps`` training steps; bytes: built model, peak, what the steps add."""
    from adaptkit.blocks import checkpoint_blocks
    from adaptkit.precision import compute_context

    methods = [{"name": "full"}] if config == "full" else [lora_params(name, rank)]
    model = adaptkit.build(spec_for(name, path, methods, dtype="bf16" if config == "lora_bf16" else "fp32")).to(device)
    if config == "lora_gc":
        checkpoint_blocks(model)
    variant = Variant(loss_fn(name, model, True), [trained_part(name, model)])
    batch = make_batch(name, device)
    model.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        reset_rss_peak()
        before = rss_now()
    for _ in range(steps):
        with compute_context(model, device.type):
            variant.step(batch)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else rss_peak()
    return {"built": before, "peak": peak, "step": peak - before}


def measure_memory(name: str, path: Path, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out = {}
    for config in MEMORY_CONFIGS:
        if config == "full" and args.skip_full:
            continue
        done = subprocess.run([sys.executable, __file__, "--child", name, str(path), config, "--rank", str(args.rank),
                               "--device", args.device, "--threads", str(torch.get_num_threads()), "--min-free-gb", str(args.min_free_gb)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            out[config] = {"error": done.stderr.strip().splitlines()[-1][:300] if done.stderr.strip() else f"exit {done.returncode}"}
        else:
            out[config] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def available_bytes() -> int:
    with open("/proc/meminfo") as handle:
        line = next(line for line in handle if line.startswith("MemAvailable:"))
    return int(line.split()[1]) * 1024


def guard_memory(min_free_gb: float, every_s: float = 0.2) -> None:
    """Exit this process (status 75) as soon as the machine's available memory falls below
    ``min_free_gb``: on a shared machine a too-large configuration fails its row instead of
    pushing everyone's jobs into the out-of-memory killer."""
    import threading

    def watch() -> None:
        while True:
            free = available_bytes()
            if free < min_free_gb * 2**30:
                print(f"stopped: the machine's available memory fell to {free / 2**30:.1f} GB (< --min-free-gb {min_free_gb})",
                      file=sys.stderr, flush=True)
                os._exit(75)
            time.sleep(every_s)

    threading.Thread(target=watch, daemon=True).start()


# ----------------------------------------------------------------- one model, one table
def run_model(name: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    device = torch.device(args.device)
    path = write_checkpoint(name, folder / name)
    builds = time_builds(name, path, args.build_reps)
    variants, facts = build_variants(name, path, args.rank, device, with_full=not args.skip_full)
    steps = time_steps(variants, make_batch(name, device), args.reps, device)
    del variants
    memory = measure_memory(name, path, args)
    return {"model": MODELS[name]["title"], "builds": builds, "steps": steps, "memory": memory, **facts}


def ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def print_table(result: dict[str, Any]) -> None:
    b, s, m = result["builds"], result["steps"], result["memory"]
    mb = lambda v: f"{v / 2**20:,.0f}"  # noqa: E731
    ours_build, plain_build = statistics.median(c for c, _ in b["ours"]), statistics.median(c for c, _ in b["plain"])
    rows = [
        ("build + load, CPU s: ours (cached fingerprint) / plain library", f"{ours_build:.2f} / {plain_build:.2f}",
         f"{ratio([c for c, _ in b['ours']], [c for c, _ in b['plain']]):.2f}x", "<= 1.2x"),
        ("build + load, wall s: ours / plain library", f"{statistics.median(w for _, w in b['ours']):.2f} / "
         f"{statistics.median(w for _, w in b['plain']):.2f}",
         f"{ratio([w for _, w in b['ours']], [w for _, w in b['plain']]):.2f}x", ""),
        ("first build (hashes the weights), CPU / wall s", f"{b['cold'][0]:.2f} / {b['cold'][1]:.2f}", "", ""),
        ("LoRA step, ms: ours / PEFT", f"{1000 * statistics.median(s['ours']):.0f} / {1000 * statistics.median(s['peft']):.0f}",
         f"{ratio(s['ours'], s['peft']):.2f}", "<= 0.95"),
    ]
    if "full" in s:
        rows.append(("LoRA step / full fine-tuning step, ms", f"{1000 * statistics.median(s['ours']):.0f} / "
                     f"{1000 * statistics.median(s['full']):.0f}", f"{ratio(s['ours'], s['full']):.2f}", "<= 0.75"))
    else:
        rows.append(("full fine-tuning", "not run (--skip-full)", "", "<= 0.75, <= 0.6"))
    ok = {k: v for k, v in m.items() if "error" not in v}
    if "lora" in ok and "full" in ok:
        rows.append(("peak training memory MB: LoRA / full", f"{mb(ok['lora']['peak'])} / {mb(ok['full']['peak'])}",
                     f"{ok['lora']['peak'] / ok['full']['peak']:.2f}", "<= 0.6"))
        rows.append(("memory the steps add MB: LoRA / full", f"{mb(ok['lora']['step'])} / {mb(ok['full']['step'])}",
                     f"{ok['lora']['step'] / max(1, ok['full']['step']):.2f}", ""))
    if "lora" in ok and "lora_gc" in ok:
        rows.append(("memory the steps add MB: LoRA / LoRA + gradient checkpointing", f"{mb(ok['lora']['step'])} / {mb(ok['lora_gc']['step'])}",
                     f"{100 * (ok['lora_gc']['step'] / max(1, ok['lora']['step']) - 1):+.0f}%", "-50% or better"))
    if "lora" in ok and "lora_bf16" in ok:
        rows.append(("peak MB: LoRA / LoRA + bf16 base (built model MB)", f"{mb(ok['lora']['peak'])} / {mb(ok['lora_bf16']['peak'])} "
                     f"({mb(ok['lora']['built'])} / {mb(ok['lora_bf16']['built'])})", f"{ok['lora_bf16']['peak'] / ok['lora']['peak']:.2f}", ""))
    for config, value in m.items():
        if "error" in value:
            rows.append((f"memory of {config}", "failed", value["error"], ""))
    sizes = result["adapter_bytes"]
    gan = " (ours holds the GAN task's discriminator too)" if "stylegan" in result["model"].lower() else ""
    rows.append((f"adapter file KB: ours / PEFT{gan}", f"{sizes['ours'] / 1024:,.0f} / {sizes['peft'] / 1024:,.0f}", "", ""))
    t = result["trainable"]
    rows.append(("parameters the step trains: ours / PEFT / full", " / ".join(f"{t[k]:,}" for k in ("ours", "peft", "full") if k in t), "", ""))
    print(f"\n### {result['model']}\n\n| measure | figures | ratio | goal |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--build-reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the raw numbers here")
    parser.add_argument("--skip-full", action="store_true",
                        help="leave full fine-tuning out (its step and its memory): for models whose AdamW state would not fit")
    parser.add_argument("--min-free-gb", type=float, default=2.0,
                        help="stop a process (a failed row, not a machine out of memory) when the machine's available memory falls below this")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "PATH", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import logging

    logging.disable(logging.WARNING)
    guard_memory(args.min_free_gb)
    if args.child:
        name, path, config = args.child
        print(json.dumps(memory_child(name, Path(path), config, args.rank, torch.device(args.device))))
        return
    print(f"device {args.device}, {torch.get_num_threads()} thread(s), LoRA rank {args.rank}, {args.reps} repetitions, torch {torch.__version__}")
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            results[name] = run_model(name, args, Path(folder))
            print_table(results[name])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
