"""adaptkit merge RUN OUT: fold a run's methods into the base weights, saved for the plain library"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "merge", help="fold a run's LoRA (or other mergeable method) into the base weights and save a plain model",
        description="Merge every method of a run into the base weights and write OUT/ in the backbone library's own "
        "layout and names (timm: model.safetensors for timm.create_model; diffusers: a save_pretrained directory for "
        "UNet2DModel / UNet2DConditionModel.from_pretrained; open_clip: a local-dir directory; stylegan2: "
        "generator.safetensors in rosinality's layout), with adaptkit_native.json saying how to create the model. The classification head goes "
        "where the library keeps a classifier. Plain timm / open_clip / diffusers load the result without adaptkit.",
    )
    p.add_argument("run", help="run directory (or its adapter.safetensors)")
    p.add_argument("out", help="directory to write")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty directory")
    return p


def main(args: argparse.Namespace) -> int:
    from adaptkit.native import load_trained, merge_to_native, prepare_output, save_native

    model = load_trained(args.run)
    result = merge_to_native(model)  # first: a run that cannot merge leaves no empty directory behind
    out = prepare_output(args.out, args.overwrite)
    files = save_native(model, result, out)
    print(f"merged {', '.join(m.name for m in model.adaptkit.methods) or 'nothing'} into the base weights")
    print(f"wrote {out}/: {', '.join(files)}")
    return 0
