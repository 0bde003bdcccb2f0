"""adaptkit generate RUN [task flags] --num 16 --out grid.png

The core command samples from any run whose task model generates
(:class:`adaptkit.capabilities.Generates`); the flags that say what to sample (prompts,
classes, source images, sampler settings) come from the task (``TaskRecord.generate_options``).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from adaptkit.errors import PluginError
    from adaptkit.registry import registry

    p = sub.add_parser(
        "generate", help="sample images from a trained run whose task generates (PNG grid + single images)",
        description="Sample images from a run directory (or a YAML spec with a pretrained backbone). "
        "Writes the grid to --out and each image to a folder named after it (grid.png -> grid/000.png ...). "
        "What to sample (prompts, classes, images, sampler) is given with the flags of the run's task.",
    )
    p.add_argument("run", help="run directory (spec.yaml + adapter.safetensors) or YAML spec")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides of the run's spec")
    p.add_argument("--num", type=int, default=16, help="images per condition (default 16)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images generated at once (default: all); bounds memory for a large --num")
    p.add_argument("--out", default="samples.png", help="grid PNG path (default samples.png)")
    p.add_argument("--scale", type=int, default=None, help="pixel enlargement of the PNGs (default: at least 64 px high)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--overwrite", action="store_true", help="replace an existing grid and single images")
    flags: dict[str, list[tuple[str, object]]] = {}  # task -> (dest, default) of the flags it added
    for record in registry().records("task"):
        if record.generate_options is None:
            continue
        group = p.add_argument_group(f"task {record.name}", record.summary)
        before = list(p._actions)
        try:
            record.generate_options.add_arguments(group)
        except argparse.ArgumentError as exc:
            raise PluginError(f"task '{record.name}' (plugin {record.provider}): its generate flags clash with "
                              f"another task's or the command's own: {exc}") from None
        flags[record.name] = [(a.dest, a.default) for a in p._actions if a not in before]
    p.set_defaults(_task_flags=flags)
    return p


def main(args: argparse.Namespace) -> int:
    from adaptkit.capabilities import Generates
    from adaptkit.commands.outputs import MAX_IMAGE_SIDE, atomic_png, check_device, check_png_outputs, check_seed
    from adaptkit.errors import CompatibilityError, RunError
    from adaptkit.images import save_grid, save_images
    from adaptkit.registry import registry
    from adaptkit.runner import load_run

    if args.num < 1:
        raise RunError(f"--num must be at least 1, got {args.num}")
    if args.scale is not None and args.scale < 1:
        raise RunError(f"--scale must be at least 1, got {args.scale}")
    if args.batch_size is not None and args.batch_size < 1:
        raise RunError(f"--batch-size must be at least 1, got {args.batch_size}")
    check_seed(args.seed)
    check_device(args.device)

    model = load_run(args.run, args.overrides, device=args.device)
    task = model.adaptkit.spec.task.name
    if not isinstance(model, Generates):
        raise CompatibilityError(f"{args.run}: task '{task}' does not generate images")
    own = {dest for dest, _ in args._task_flags.get(task, [])}
    for other, flags in args._task_flags.items():
        for dest, default in flags:
            if dest not in own and getattr(args, dest) != default:
                raise RunError(f"--{dest.replace('_', '-')} is a flag of task '{other}'; this run's task is '{task}'")
    options = registry().get("task", task).generate_options
    conditions, sources = options.read(args, model) if options is not None else ({}, [])
    out = check_png_outputs(args.out, "--out", args.overwrite, folder=Path(args.out).with_suffix(""), sources=sources)
    size = model.backbone.image_size
    side = max(size) if isinstance(size, (tuple, list)) else size
    if args.scale is not None and side and side * args.scale > MAX_IMAGE_SIDE:
        raise RunError(f"--scale {args.scale}: images of {side * args.scale} pixels; at most {MAX_IMAGE_SIDE} per side")
    from adaptkit.precision import compute_context

    with compute_context(model, next(model.parameters()).device.type):
        images, rows = model.generate(num=args.num, seed=args.seed, batch_size=args.batch_size, **conditions)
    columns = len(images) // len(rows)
    atomic_png(save_grid, out, images, columns=columns, scale=args.scale)
    singles = save_images(images, out.with_suffix(""), scale=args.scale)
    for row in rows:
        print(f"row: {row}")
    print(f"wrote {out} ({len(rows)} x {columns} images) and {len(singles)} images in {out.with_suffix('')}/")
    return 0
