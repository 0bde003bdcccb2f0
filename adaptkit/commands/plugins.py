"""adaptkit plugins [--json] [KIND] [PATTERN]"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("plugins", help="list registered backbones, methods, tasks, data sources, loggers and presets")
    p.add_argument("kind", nargs="?", choices=["backbone", "method", "task", "data", "logger", "preset"], help="only this kind")
    p.add_argument("pattern", nargs="?", default="*", help="fnmatch pattern on names, e.g. 'vi*'")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return "None" if annotation is type(None) else annotation.__name__
    return str(annotation).replace("typing.", "")


def describe_params(params: Any) -> list[dict[str, Any]]:
    out = []
    for name, field in params.model_fields.items():
        if name == "name":
            continue
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        out.append({
            "name": name,
            "type": _type_name(field.annotation),
            "default": list(default) if isinstance(default, tuple) else default if isinstance(default, (int, float, str, bool, list, dict, type(None))) else repr(default),
            "required": field.is_required(),
            "help": field.description or "",
        })
    return out


def main(args: argparse.Namespace) -> int:
    import fnmatch

    from adaptkit.registry import KINDS, registry

    reg = registry()
    kinds = [args.kind] if args.kind in KINDS else ([] if args.kind else list(KINDS))
    listing: dict[str, Any] = {}
    for kind in kinds:
        listing[kind] = [
            {"name": r.name, "provider": r.provider, "source": reg.source(r.provider), "summary": r.summary,
             "params": describe_params(r.params)}
            for r in reg.find(kind, args.pattern)
        ]
    if args.kind in (None, "logger"):
        listing["logger"] = [
            {"name": r.name, "provider": r.provider, "source": reg.source(r.provider), "summary": r.summary,
             "default": r.name in reg.default_loggers, "params": []}
            for r in reg.loggers() if fnmatch.fnmatch(r.name, args.pattern)
        ]
    if args.kind in (None, "preset"):
        listing["preset"] = [
            {"name": p.name, "backbone": p.backbone, "summary": p.summary, "provider": p.provider}
            for p in reg.presets() if fnmatch.fnmatch(p.name, args.pattern)
        ]
    failures = [str(f) for f in reg.failures]
    if args.json:
        print(json.dumps({**listing, "failures": failures}, indent=2, default=str))
    else:
        for kind, items in listing.items():
            print({"backbone": "backbones:", "method": "methods:", "task": "tasks:", "data": "data sources:", "logger": "loggers (train.loggers):",
                   "preset": "presets:"}[kind])
            for item in items:
                if kind == "preset":
                    print(f"  {item['name']:<22} backbone {item['backbone']:<10} {item['summary']}")
                    continue
                print(f"  {item['name']:<16} {item['summary']}  [{item['provider']}, {item['source']}]")
                for param in item["params"]:
                    default = "required" if param["required"] else f"= {param['default']!r}"
                    print(f"      {param['name']}: {param['type']} {default}")
        for failure in failures:
            print(f"warning: {failure}", file=sys.stderr)
    return 0
