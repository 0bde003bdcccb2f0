"""adaptkit report RUN [--out FILE]: a self-contained HTML page of a run"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("report", help="write a self-contained HTML page with a run's spec, metrics, curves and images")
    p.add_argument("run", help="run directory")
    p.add_argument("--out", help="HTML file to write (default: RUN/report.html)")
    return p


def main(args: argparse.Namespace) -> int:
    from adaptkit.report import write_report

    path = write_report(args.run, args.out)
    print(f"wrote {path}")
    return 0
