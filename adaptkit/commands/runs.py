"""adaptkit runs [DIR]: past runs with their key metrics"""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("runs", help="list past runs under a directory with their key metrics")
    p.add_argument("dir", nargs="?", default="runs", help="directory holding runs (default: runs)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def main(args: argparse.Namespace) -> int:
    from adaptkit.runs import find_runs

    runs = find_runs(args.dir)
    if args.json:
        print(json.dumps([{"path": str(r.path), "name": r.name, "status": r.status, "started": r.started,
                           "components": r.components, "metrics": r.key_metrics()} for r in runs], indent=2))
        return 0
    if not runs:
        print(f"no runs under {args.dir}")
        return 0
    for run in runs:
        metrics = "  ".join(f"{k} {v:.4g}" for k, v in run.key_metrics().items() if isinstance(v, (int, float)))
        print(f"{run.started or '-':<19}  {run.status:<8} {str(run.path):<40} {run.components}")
        if metrics:
            print(f"{'':<30}{metrics}")
    return 0
