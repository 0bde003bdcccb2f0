"""One GPU check of everything that has only been run on CPUs; writes a JSON report.

    python benchmarks/gpu_check.py --json gpu_check.json      # < 8 minutes on one GPU
    python benchmarks/gpu_check.py --quick                     # the same checks on small models (a CPU smoke test)

Checks, each recorded as passed / failed / skipped with its figures:

- every registered backbone x LoRA builds on the device, one training step is finite, and
  merged == unmerged;
- a bf16 autocast training step for every task (the backbones' examples);
- timm ViT-B/16 @224 (batch 32): our LoRA against PEFT's, step time and
  ``torch.cuda.max_memory_allocated``, with and without gradient checkpointing, and with a
  bf16 base;
- our DDIM loop against diffusers' DDIMPipeline (same UNet, seed and steps): time and images;
- the StyleGAN2 CUDA check (``benchmarks/stylegan2_device_check.py``).

Without CUDA every check that needs it is reported as skipped and the script exits 0, so it
can be run anywhere; ``--device cpu --quick`` runs the checks themselves on the CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import adaptkit

HERE = Path(__file__).resolve().parent


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    """Median seconds of ``fn`` over ``reps`` calls after one warm-up, synchronised."""
    fn()
    times = []
    for _ in range(reps):
        synchronize(device)
        started = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


# ----------------------------------------------------------------- the checks
def every_backbone_with_lora(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    from adaptkit.testing import _Suite

    out = {}
    for record in adaptkit.registry().records("backbone"):
        spec = _Suite.spec_for(record, [{"name": "lora", "rank": 4}])
        model = adaptkit.build(spec, keep_data=True).to(device)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in model.adaptkit.data.train.batch(range(4)).items()}
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        torch.manual_seed(0)
        loss = model(batch).loss
        loss.backward()
        optimizer.step()
        model.eval()
        (lora,) = model.adaptkit.methods
        torch.manual_seed(1)
        with torch.no_grad():
            unmerged = model(batch).loss
            lora.merge()
            torch.manual_seed(1)
            merged = model(batch).loss
        difference = float((merged - unmerged).abs())
        out[record.name] = {"loss": loss.item(), "finite": bool(torch.isfinite(loss)), "merged_minus_unmerged": difference,
                            "passed": bool(torch.isfinite(loss)) and difference <= 1e-3 * max(1.0, abs(float(unmerged)))}
    return out


def bf16_step_per_task(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    from adaptkit.testing import _Suite

    out = {}
    for record in adaptkit.registry().records("backbone"):
        spec = _Suite.spec_for(record, [{"name": "lora", "rank": 4}])
        spec["train"] = {"precision": "bf16"}
        model = adaptkit.build(spec, keep_data=True).to(device)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in model.adaptkit.data.train.batch(range(4)).items()}
        model.train()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(batch).loss
        loss.float().backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        finite = bool(torch.isfinite(loss)) and all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
        out[f"{spec['task']['name']} on {record.name}"] = {"loss": loss.item(), "passed": finite}
    return out


def vit_b16_against_peft(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Step time and peak memory of ViT-B/16 LoRA (ours: plain, + gradient checkpointing, + bf16 base) and PEFT's."""
    import peft

    from adaptkit.blocks import checkpoint_blocks
    from adaptkit.native import native_copy
    from adaptkit.precision import compute_context

    arch, image, batch = ("vit_small_patch16_224", 64, 4) if args.quick else ("vit_base_patch16_224", 224, 32)
    lora = {"name": "lora", "rank": 8, "alpha": 16, "targets": ["attn.out", "mlp.in", "mlp.out"], "target_modules": [r"attn\.qkv$"]}

    def spec(dtype: str = "fp32") -> dict[str, Any]:
        return {"seed": 0, "backbone": {"name": "vit", "model": arch, "img_size": image, "dtype": dtype}, "methods": [lora],
                "task": {"name": "classification", "num_classes": 10}, "data": {"name": "digits"}}

    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image, image, generator=gen).to(device)
    labels = torch.randint(0, 10, (batch,), generator=gen).to(device)

    def variant(name: str) -> tuple[Callable[[], None], torch.nn.Module]:
        if name == "peft":
            ours = adaptkit.build(spec())
            plain = native_copy(ours).model
            model = peft.get_peft_model(copy.deepcopy(plain), peft.LoraConfig(
                r=8, lora_alpha=16, target_modules=r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)", modules_to_save=["head"]))
            forward, context = model, (lambda: torch.autocast(device.type, enabled=False))
        else:
            model = adaptkit.build(spec("bf16" if name == "ours_bf16_base" else "fp32"))
            if name == "ours_checkpointed":
                checkpoint_blocks(model)
            forward, context = model.logits, (lambda m=model: compute_context(m, device.type))
        model.to(device).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with context():
                loss = F.cross_entropy(forward(images).float(), labels)
            loss.backward()
            optimizer.step()

        return step, model

    out: dict[str, Any] = {"model": arch, "image": image, "batch": batch}
    for name in ("ours", "peft", "ours_checkpointed", "ours_bf16_base"):
        step, model = variant(name)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        ms = 1000 * seconds(step, device, args.reps)
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
        out[name] = {"step_ms": ms, "max_memory_allocated_mb": peak}
        del step, model
    out["ours/peft step"] = out["ours"]["step_ms"] / out["peft"]["step_ms"]
    if device.type == "cuda":
        out["ours/peft memory"] = out["ours"]["max_memory_allocated_mb"] / out["peft"]["max_memory_allocated_mb"]
        out["checkpointed/ours memory"] = out["ours_checkpointed"]["max_memory_allocated_mb"] / out["ours"]["max_memory_allocated_mb"]
    out["passed"] = True
    return out


def ddim_against_diffusers(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    from diffusers import DDIMPipeline

    from adaptkit_plugins.diffusion.common import SamplerSettings, make_scheduler, sample

    preset, batch = ("ddpm_unet_8", 8) if args.quick else ("ddpm_unet_32", 64)
    model = adaptkit.build({"backbone": {"name": "ddpm_unet", "model": preset}, "task": {"name": "text_to_image"},
                            "data": {"name": "digits"}}).eval().to(device)
    backbone = model.backbone
    settings = SamplerSettings(sampler="ddim", steps=50, guidance=1.0)
    pipeline = DDIMPipeline(unet=backbone.unet, scheduler=make_scheduler(backbone.schedule, settings))
    pipeline.set_progress_bar_config(disable=True)

    def ours() -> torch.Tensor:
        return sample(backbone, {}, batch, settings, torch.Generator().manual_seed(0), device)

    def theirs() -> torch.Tensor:
        return pipeline(batch_size=batch, generator=torch.Generator().manual_seed(0), num_inference_steps=50, eta=0.0,
                        output_type="pt").images

    difference = float(((ours().cpu() / 2 + 0.5).clamp(0, 1) - torch.as_tensor(theirs()).cpu()).abs().max())
    ours_s, theirs_s = seconds(ours, device, args.reps), seconds(theirs, device, args.reps)
    return {"unet": preset, "batch": batch, "ours_s": ours_s, "diffusers_s": theirs_s, "ratio": ours_s / theirs_s,
            "max_image_difference": difference, "passed": difference < 1e-2}


def stylegan2_cuda(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    done = subprocess.run([sys.executable, str(HERE / "stylegan2_device_check.py")], capture_output=True, text=True, timeout=300)
    return {"output": done.stdout.strip().splitlines()[-8:], "passed": done.returncode == 0,
            **({"error": done.stderr.strip().splitlines()[-1][:300]} if done.returncode and done.stderr.strip() else {})}


CHECKS: dict[str, tuple[Callable[[torch.device, argparse.Namespace], dict[str, Any]], bool]] = {
    # name: (check, needs CUDA even with --device cpu)
    "every backbone x LoRA: builds, steps, merged == unmerged": (every_backbone_with_lora, False),
    "bf16 autocast step for every task": (bf16_step_per_task, False),
    "ViT-B/16 LoRA against PEFT (time, max_memory_allocated; checkpointing; bf16 base)": (vit_b16_against_peft, False),
    "our DDIM loop against diffusers' DDIMPipeline": (ddim_against_diffusers, False),
    "StyleGAN2 CUDA check": (stylegan2_cuda, True),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default; every check is skipped without it) or cpu")
    parser.add_argument("--quick", action="store_true", help="small models (ViT-S at 64 px, the 8x8 UNet): a smoke test")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", default="gpu_check.json")
    parser.add_argument("--only", nargs="*", help="run only the checks whose names contain one of these words")
    args = parser.parse_args()
    import logging

    logging.disable(logging.WARNING)
    device = torch.device(args.device)
    cuda = torch.cuda.is_available()
    report: dict[str, Any] = {
        "torch": torch.__version__, "python": platform.python_version(), "cuda": cuda,
        "device_name": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "quick": args.quick, "checks": {},
    }
    started = time.perf_counter()
    for name, (check, needs_cuda) in CHECKS.items():
        if args.only and not any(word in name for word in args.only):
            continue
        if (device.type == "cuda" or needs_cuda) and not cuda:
            report["checks"][name] = {"status": "skipped", "why": "no CUDA device here"}
            print(f"skipped  {name}: no CUDA device here")
            continue
        began = time.perf_counter()
        try:
            result = check(device, args)
            status = "passed" if _all_passed(result) else "failed"
        except Exception as exc:  # one failing check must not hide the others' figures
            result, status = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}, "failed"
        report["checks"][name] = {"status": status, "seconds": round(time.perf_counter() - began, 1), **result}
        print(f"{status:8} {name} ({time.perf_counter() - began:.0f} s)")
    report["seconds"] = round(time.perf_counter() - started, 1)
    Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.json} ({report['seconds']} s)")
    return 1 if any(c["status"] == "failed" for c in report["checks"].values()) else 0


def _all_passed(result: dict[str, Any]) -> bool:
    flags = [v["passed"] for v in result.values() if isinstance(v, dict) and "passed" in v]
    if "passed" in result:
        flags.append(result["passed"])
    return all(flags)


if __name__ == "__main__":
    raise SystemExit(main())
