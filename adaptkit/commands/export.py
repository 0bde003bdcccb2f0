"""adaptkit export RUN OUT --format peft: a trained run's LoRA as a Hugging Face PEFT directory"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "export", help="write a run's LoRA as a Hugging Face PEFT adapter directory",
        description="Write a run's low-rank updates (and its classification head, as modules_to_save) as a PEFT "
        "LoRA directory: peft.PeftModel.from_pretrained(<plain timm/open_clip/diffusers model>, OUT) computes what "
        "the run's model computes.",
    )
    p.add_argument("run", help="run directory (or its adapter.safetensors)")
    p.add_argument("out", help="directory to write")
    p.add_argument("--format", choices=["peft"], default="peft", help="output format (default: peft)")
    p.add_argument("--include-base", action="store_true", help="also write the base weights with the library's names (base_model.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT's files (a directory holding a run is replaced whole)")
    return p


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from adaptkit.commands.outputs import check_output_dir, staged_output
    from adaptkit.native import load_trained
    from adaptkit.peft_format import export_peft

    check_output_dir(args.out, "OUT", args.overwrite, sources=[args.run])
    model = load_trained(args.run)
    with staged_output(args.out, "OUT", args.overwrite, sources=[args.run]) as staging:
        files = export_peft(model, staging, include_base=args.include_base)
    out = Path(args.out)
    print(f"wrote {out}/: {', '.join(files)}")
    import json

    for note in json.loads((out / "adaptkit.json").read_text()).get("notes", []):
        print(f"note: {note}")
    return 0
