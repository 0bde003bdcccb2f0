"""adaptkit import PEFT_DIR OUT [--spec BASE.yaml] [key=value ...]: a PEFT LoRA directory as an adaptkit run"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "import", help="turn a Hugging Face PEFT LoRA directory (or another format's LoRA, e.g. diffusers') into an adaptkit run directory",
        description="Read a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors) made for a plain "
        "timm / open_clip / diffusers model, and write OUT as a run directory (spec.yaml, adapter.safetensors) that "
        "computes the same outputs. --spec names the base model: a YAML spec whose backbone (with its pretrained "
        "weights), task and data the adapter belongs to; its methods are replaced by the imported LoRA. Directories "
        "written by `adaptkit export` carry their spec and need no --spec. Other formats' LoRA files are read by the "
        "plugin that registers the format (diffusers: a folder holding pytorch_lora_weights.safetensors, or the file itself).",
    )
    p.add_argument("peft_dir", help="PEFT adapter directory (or another format's LoRA directory or file)")
    p.add_argument("out", help="run directory to write")
    p.add_argument("--spec", help="YAML spec of the base model (backbone, task, data)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides of the spec")
    p.add_argument("--method", help="the low-rank method plugin to hold the factors (default: the only one registered)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT's files (a directory holding a run is replaced whole)")
    return p


def main(args: argparse.Namespace) -> int:
    import adaptkit
    from adaptkit.errors import SpecError
    from pathlib import Path

    from adaptkit.commands.outputs import check_output_dir, staged_output
    from adaptkit.native import save_run
    from adaptkit.registry import registry

    base = None
    if args.spec:
        base = adaptkit.load_spec(args.spec, args.overrides)
    elif args.overrides:
        raise SpecError("overrides need --spec (the base spec they change)")
    sources = [args.peft_dir, *([args.spec] if args.spec else [])]
    check_output_dir(args.out, "OUT", args.overwrite, sources=sources)
    reg = registry()
    readers = [r for r in reg.export_formats() if r.read is not None and r.recognises is not None]
    record = next((r for r in readers if r.recognises(Path(args.peft_dir))), None)
    if record is None:  # the default format's reader says what it misses (no adapter_config.json, ...)
        record = next((r for r in readers if r.name == reg.default_export_format), None)
        if record is None:
            raise SpecError(f"{args.peft_dir}: no registered format reads it (readers: {', '.join(r.name for r in readers) or 'none'})")
    model = record.read(Path(args.peft_dir), base, method=args.method)
    with staged_output(args.out, "OUT", args.overwrite, sources=sources) as staging:
        files = save_run(model, staging, "imported", {"source": str(args.peft_dir)})
    out = Path(args.out)
    # the LoRA, and a second method when modules_to_save holds whole backbone modules (a class embedding)
    print(f"imported {args.peft_dir}: {'; '.join(m.summary for m in model.adaptkit.methods)}")
    print(f"wrote {out}/: {', '.join(files)}")
    return 0
