"""adaptkit merge RUN OUT: fold a run's methods into the base weights, saved for the plain library"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "merge", help="fold a run's LoRA (or other mergeable method) into the base weights and save a plain model",
        description="Merge every method of a run into the base weights and write OUT/ in the backbone library's own "
        "layout and names (timm: model.safetensors for timm.create_model; diffusers: a save_pretrained directory for "
        "UNet2DModel / UNet2DConditionModel.from_pretrained; open_clip: a local-dir directory; StyleGAN2: "
        "generator.safetensors in rosinality's layout), with adaptkit_native.json saying how to create the model. The classification head goes "
        "where the library keeps a classifier. Plain timm / open_clip / diffusers load the result without adaptkit.",
    )
    p.add_argument("run", help="run directory (or its adapter.safetensors)")
    p.add_argument("out", help="directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace OUT's files (a directory holding a run is replaced whole)")
    return p


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from adaptkit.commands.outputs import check_output_dir, staged_output
    from adaptkit.native import load_trained, merge_to_native, save_native

    check_output_dir(args.out, "OUT", args.overwrite, sources=[args.run])
    model = load_trained(args.run)
    result = merge_to_native(model)  # first: a run that cannot merge leaves nothing behind
    with staged_output(args.out, "OUT", args.overwrite, sources=[args.run]) as staging:
        files = save_native(model, result, staging)
    out = Path(args.out)
    print(f"merged {', '.join(m.name for m in model.adaptkit.methods) or 'nothing'} into the base weights")
    print(f"wrote {out}/: {', '.join(files)}")
    return 0
