"""adaptkit combine OUT RUN RUN... [--how cat|svd|linear] [--weights W...]: several LoRA runs as one adapter"""

from __future__ import annotations

import argparse
import re
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "combine", help="combine LoRA runs trained on one base into one adapter (cat, svd or linear)",
        description="Load the runs as named adapters on their common base and write their weighted combination "
        "as a run directory (a LoRA spec + adapter) that adaptkit merge / export take. cat: exact sum, rank = the "
        "sum of ranks; svd: exact sum truncated to --rank by SVD; linear: factor-wise sum at one shared rank.",
    )
    p.add_argument("out", help="run directory to write")
    p.add_argument("runs", nargs="+", help="run directories (or adapter files) trained on the same base")
    p.add_argument("--how", choices=["cat", "svd", "linear"], default="cat", help="combination (default: cat)")
    p.add_argument("--weights", type=float, nargs="+", help="one weight per run (default: 1 each)")
    p.add_argument("--rank", type=int, help="rank of the svd combination (default: the largest input rank)")
    p.add_argument("--head", default="weighted", help="task head: 'weighted' (weighted mean) or the 1-based number of a run")
    p.add_argument("--evaluate", action="store_true", help="print each run's and the combination's test metrics")
    p.add_argument("--overwrite", action="store_true", help="replace OUT's files (a directory holding a run is replaced whole)")
    return p


def main(args: argparse.Namespace) -> int:
    from adaptkit.adapters import AdapterSet
    from adaptkit.errors import CompatibilityError
    from adaptkit.commands.outputs import check_finite, check_output_dir, staged_output
    from adaptkit.rundir import RunDir

    weights = args.weights or [1.0] * len(args.runs)
    if len(weights) != len(args.runs):
        raise CompatibilityError(f"--weights: {len(weights)} weights for {len(args.runs)} runs")
    for weight in weights:
        check_finite(weight, "--weights")
    if not any(weights):
        raise CompatibilityError("--weights: all weights are 0; the combination would be no adapter at all")
    check_output_dir(args.out, "OUT", args.overwrite, sources=args.runs)
    if args.rank is not None and args.rank <= 0:
        raise CompatibilityError("--rank must be > 0")
    names = []
    for index, run in enumerate(args.runs, 1):
        stem = re.sub(r"[^A-Za-z0-9_-]", "_", run.rstrip("/").split("/")[-1].removesuffix(".safetensors")) or "run"
        names.append(stem if stem not in names else f"{stem}_{index}")
    head = args.head
    if head != "weighted":
        if not head.isdigit() or not 1 <= int(head) <= len(names):
            raise CompatibilityError(f"--head: 'weighted' or a run number from 1 to {len(names)}, got '{head}'")
        head = names[int(head) - 1]
    spec, _ = RunDir.trained(args.runs[0]).spec_and_adapter()
    adapters = AdapterSet(spec)
    for name, run in zip(names, args.runs):
        adapters.load(name, run)
    mix = adapters.combine("combined", dict(zip(names, weights)), how=args.how, rank=args.rank, head=head)
    with staged_output(args.out, "OUT", args.overwrite, sources=args.runs) as staging:
        files = adapters.save("combined", staging)
    out = Path(args.out)
    (method,) = mix.methods
    print(f"{args.how} of {', '.join(f'{w:g} x {n}' for n, w in zip(names, weights))}: {method.summary}")
    if args.evaluate:
        _evaluate(adapters, [*names, "combined"])
    print(f"wrote {out}/: {', '.join(files)}")
    return 0


def _evaluate(adapters: object, names: list[str]) -> None:
    import torch

    from adaptkit.train import evaluate

    model = adapters.model  # type: ignore[attr-defined]
    data = model.adaptkit.data
    split = data.test if data is not None and data.test is not None and len(data.test) else None
    if split is None:
        print("no test split to evaluate")
        return
    size = adapters.base_spec.train.eval_batch_size or adapters.base_spec.train.batch_size  # type: ignore[attr-defined]
    for name in names:
        adapters.use(name)  # type: ignore[attr-defined]
        metrics = evaluate(model, split, size, torch.device("cpu"))
        shown = ", ".join(f"{k} {v:.4f}" for k, v in model.scalar_metrics(metrics).items() if k != "count")
        print(f"  {name}: test {shown}")
