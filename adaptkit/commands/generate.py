"""adaptkit generate RUN [--prompt TEXT | --class NAME | --image PATH] --num 16 --steps 50 --out grid.png"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "generate", help="sample images from a trained diffusion run (PNG grid + single images)",
        description="Sample images from a run directory (or a YAML spec with a pretrained backbone). "
        "Writes the grid to --out and each image to a folder named after it (grid.png -> grid/000.png ...).",
    )
    p.add_argument("run", help="run directory (spec.yaml + adapter.safetensors) or YAML spec")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides of the run's spec")
    p.add_argument("--prompt", action="append", default=[], help="a text prompt (repeatable; one grid row each)")
    p.add_argument("--class", dest="classes", action="append", default=[], help="a class name (repeatable)")
    p.add_argument("--image", action="append", default=[], help="a source image for variations (unclip; repeatable)")
    p.add_argument("--num", type=int, default=16, help="images per prompt / class / source image (default 16)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the task's, 50)")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default=None, help="scheduler (default: the task's, ddim)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the task's)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (0: deterministic)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images denoised at once (default: all); bounds memory for a large --num")
    p.add_argument("--out", default="samples.png", help="grid PNG path (default samples.png)")
    p.add_argument("--scale", type=int, default=None, help="pixel enlargement of the PNGs (default: at least 64 px high)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--overwrite", action="store_true", help="replace an existing grid and single images")
    return p


def main(args: argparse.Namespace) -> int:
    from adaptkit.commands._outputs import (
        MAX_IMAGE_SIDE, atomic_png, check_device, check_finite, check_image_file, check_png_outputs, check_seed,
    )
    from adaptkit.errors import CompatibilityError, RunError
    from adaptkit.images import save_grid, save_images

    if args.num < 1:
        raise RunError(f"--num must be at least 1, got {args.num}")
    if args.steps is not None and args.steps < 1:
        raise RunError(f"--steps must be at least 1, got {args.steps}")
    if args.scale is not None and args.scale < 1:
        raise RunError(f"--scale must be at least 1, got {args.scale}")
    if args.batch_size is not None and args.batch_size < 1:
        raise RunError(f"--batch-size must be at least 1, got {args.batch_size}")
    check_seed(args.seed)
    check_finite(args.guidance, "--guidance", low=0)
    check_finite(args.eta, "--eta", low=0, high=1)
    check_device(args.device)
    for image in args.image:
        if not Path(image).is_file():
            raise RunError(f"--image {image}: file not found" if not Path(image).exists() else f"--image {image}: not a file")
    out = check_png_outputs(args.out, "--out", args.overwrite, folder=Path(args.out).with_suffix(""), sources=args.image)

    from adaptkit.runner import load_run

    model = load_run(args.run, args.overrides, device=args.device)
    generate = getattr(model, "generate", None)
    if generate is None:
        raise CompatibilityError(f"{args.run}: task '{model.adaptkit.spec.task.name}' does not generate images")
    backbone = model.backbone
    size = getattr(backbone, "image_size", None)
    size = (size, size) if isinstance(size, int) else (tuple(size) if size else None)
    if args.scale is not None and size and max(size) * args.scale > MAX_IMAGE_SIDE:
        raise RunError(f"--scale {args.scale}: images of {max(size) * args.scale} pixels; at most {MAX_IMAGE_SIDE} per side")
    for image in args.image:
        note = check_image_file(image, "--image", getattr(backbone, "in_chans", None), size)
        if note:
            print(f"note: {note}")
    from adaptkit.precision import compute_context

    with compute_context(model, next(model.parameters()).device.type):
        images, rows = generate(
            prompts=args.prompt or None, classes=args.classes or None, images=args.image or None, num=args.num,
            seed=args.seed, steps=args.steps, sampler=args.sampler, guidance=args.guidance, eta=args.eta,
            batch_size=args.batch_size,
        )
    columns = len(images) // len(rows)
    atomic_png(save_grid, out, images, columns=columns, scale=args.scale)
    singles = save_images(images, out.with_suffix(""), scale=args.scale)
    for row in rows:
        print(f"row: {row}")
    print(f"wrote {out} ({len(rows)} x {columns} images) and {len(singles)} images in {out.with_suffix('')}/")
    return 0
