"""adaptkit schema: JSON Schema of RunSpec with every registered plugin's params"""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("schema", help="print the JSON Schema of run specs (for editor completion)")
    p.add_argument("-o", "--output", help="write to this file instead of standard output")
    return p


def main(args: argparse.Namespace) -> int:
    from adaptkit.spec import json_schema

    text = json.dumps(json_schema(), indent=2)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(text + "\n")
    else:
        print(text)
    return 0
