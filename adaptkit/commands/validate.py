"""adaptkit validate FILE... (never imports torch or a model library)"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("validate", help="check YAML specs without building anything")
    p.add_argument("files", nargs="+", help="YAML specs")
    p.add_argument("overrides", nargs="*", default=[], help=argparse.SUPPRESS)
    return p


def main(args: argparse.Namespace) -> int:
    from adaptkit.compat import check_spec
    from adaptkit.errors import AdaptkitError, CompatibilityError, SpecError
    from adaptkit.registry import registry

    reg = registry()
    # an argument naming an existing file is a file (`a=b.yaml` too); other key=value ones are overrides
    files = [f for f in args.files if "=" not in f or Path(f).is_file()]
    overrides = [f for f in args.files if f not in files] + list(args.overrides)
    if not files:
        raise SpecError(f"no spec file to validate (got only overrides: {' '.join(overrides)}); "
                        "give a YAML file first, e.g. adaptkit validate spec.yaml train.lr=1e-3")
    failed = 0
    for path in files:
        try:
            spec = __import__("adaptkit").load_spec(path, overrides, registry=reg)
            problems = check_spec(spec, reg)
            if problems:
                raise CompatibilityError(f"{path}: " + "; ".join(problems))
        except AdaptkitError as exc:
            failed += 1
            print(f"error: {exc}", file=sys.stderr)
            continue
        methods = ", ".join(m.name for m in spec.methods) or "none"
        print(f"ok: {path} (backbone {spec.backbone.name}; methods {methods}; task {spec.task.name}; data {spec.data.name})")
    return 2 if failed else 0
