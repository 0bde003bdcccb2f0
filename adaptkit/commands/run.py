"""adaptkit run FILE [key.path=value ...]"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("run", help="train and evaluate the run a YAML spec describes",
                       description="Train and evaluate a YAML spec. Overrides: key.path=value, e.g. train.lr=1e-3 methods.0.rank=4.")
    p.add_argument("file", help="YAML spec")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides")
    p.add_argument("--overwrite", action="store_true", help="replace an output directory that holds another run")
    p.add_argument("--dry-run", action="store_true", help="validate and build the model, print the plan, train nothing")
    return p


def main(args: argparse.Namespace) -> int:
    import adaptkit

    spec = adaptkit.load_spec(args.file, args.overrides)
    if args.dry_run:
        from adaptkit.builder import build, count_parameters
        from adaptkit.runner import method_names

        model = build(spec)
        trainable, total = count_parameters(model)
        print(f"{args.file}: {spec.backbone.name} + [{method_names(spec, trainable)}] -> {spec.task.name} on {spec.data.name}")
        print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(1, total):.2f}%)")
        return 0
    result = adaptkit.run(spec, overwrite=args.overwrite)
    return 0 if result.metrics is not None else 1
