"""adaptkit export RUN OUT --format NAME: a trained run in another library's format (``peft`` by default;
plugins add formats through the ``adaptkit_export_formats`` hook)"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from adaptkit.registry import registry

    reg = registry()
    formats = reg.export_formats()
    p = sub.add_parser(
        "export", help="write a run's adaptation in another library's format (default: a Hugging Face PEFT LoRA directory)",
        description="Write a run's trained adaptation in the format --format names. Formats: "
        + "; ".join(f"{record.name}: {record.summary}" for record in formats),
    )
    p.add_argument("run", help="run directory (or its adapter.safetensors)")
    p.add_argument("out", help="directory to write")
    default = reg.default_export_format or None
    p.add_argument("--format", choices=[record.name for record in formats], default=default, required=default is None,
                   help=f"output format (default: {default})")
    p.add_argument("--include-base", action="store_true", help="also write the base weights with the library's names (base_model.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT's files (a directory holding a run is replaced whole)")
    return p


def main(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from adaptkit.commands.outputs import check_output_dir, staged_output
    from adaptkit.native import load_trained
    from adaptkit.registry import registry

    record = registry().export_format(args.format)
    check_output_dir(args.out, "OUT", args.overwrite, sources=[args.run])
    model = load_trained(args.run)
    with staged_output(args.out, "OUT", args.overwrite, sources=[args.run]) as staging:
        files = record.write(model, staging, include_base=args.include_base)
    out = Path(args.out)
    print(f"wrote {out}/: {', '.join(files)}")
    described = out / "adaptkit.json"
    for note in (json.loads(described.read_text()).get("notes", []) if described.is_file() else []):
        print(f"note: {note}")
    return 0
