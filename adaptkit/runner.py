"""``adaptkit.run(spec)``: build, train, evaluate and save a run's files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptkit.rundir import RunDir, RunTransaction, write_json
from adaptkit.spec import RunSpec, load_spec


@dataclass
class RunResult:
    """What a run produced: final ``metrics`` and the ``output_dir`` holding its files."""

    metrics: dict[str, Any]
    output_dir: Path
    files: list[str] = field(default_factory=list)
    model: Any = None


def output_dir_for(spec: RunSpec) -> Path:
    return Path(spec.output.dir or Path("runs") / (spec.name or "run"))


def method_names(spec: RunSpec, trainable: int) -> str:
    """The spec's methods for a header line; without any, what trains instead (the task's own parameters, or nothing)."""
    if spec.methods:
        return ", ".join(m.name for m in spec.methods)
    return "no method: the task's own parameters" if trainable else "no method: nothing trains"


def run(spec: RunSpec | dict[str, Any] | str | Path, overrides: list[str] | None = None, overwrite: bool = False, log: Any = print) -> RunResult:
    """Build, train, evaluate and save what a spec describes.

    Example::

        result = adaptkit.run("examples/quickstart.yaml", ["train.epochs=5"])
        result.metrics["test"]["accuracy"], result.output_dir

    Writes into the output directory: ``spec.yaml``, ``run.json``, ``metrics.jsonl``
    (one line per evaluation), ``metrics.json`` (final), ``curves.png``,
    ``adapter.safetensors`` (only the trained tensors) and the task's own files.
    """
    import torch

    from adaptkit.distributed import barrier, init_distributed, resolve_device
    from adaptkit.registry import registry as default_registry

    reg = default_registry()
    spec = load_spec(spec, overrides, registry=reg) if not (isinstance(spec, RunSpec) and not overrides) else spec
    if spec.train.threads:
        torch.set_num_threads(spec.train.threads)
    device = resolve_device(spec.train.device)
    dist = init_distributed(device)
    device = resolve_device(spec.train.device, dist)
    say = log if dist.main else (lambda *_: None)

    out = output_dir_for(spec)
    # the old run stays as it was until this one has finished (see adaptkit.rundir)
    with RunTransaction(out, spec.fingerprint(), resume=spec.train.resume, overwrite=overwrite or spec.output.overwrite,
                      main=dist.main) as rundir:
        barrier(dist)
        files, final, model, trainable, total = _run_in(rundir, spec, reg, device, dist, say)
    barrier(dist)
    metrics = {**{k: v for k, v in final.items()}, "trainable_params": trainable, "total_params": total,
               "trainable_percent": 100 * trainable / max(1, total)}
    return RunResult(metrics=metrics, output_dir=out, files=files, model=model)


def _run_in(rundir: RunTransaction, spec: RunSpec, reg: Any, device: Any, dist: Any, say: Any) -> tuple[list[str], dict[str, Any], Any, int, int]:
    """Build, train, evaluate and save into ``rundir.work``; returns (files, final metrics, model, trainable, total)."""
    from adaptkit import __version__
    from adaptkit.builder import build, count_parameters, recommended
    from adaptkit.checkpoint import save_adapter
    from adaptkit.data import InputConfig, LoaderOptions
    from adaptkit.deferred import fill_whole
    from adaptkit.distributed import unsharded_root
    from adaptkit.plots import plot_curves
    from adaptkit.task import TaskModel
    from adaptkit.train import STATE_FILE, Trainer, check_resumable, evaluate

    # build before marking the directory as a run: a spec that cannot build (missing weights,
    # bad data) leaves no half-started run behind that a second try would have to --overwrite
    # under fsdp the base may wait on the meta device, for each process to read only its shard
    model = build(spec, registry=reg, keep_data=True, defer_base=spec.train.strategy == "fsdp" and dist.enabled)
    out = rundir.work
    # a damaged checkpoint: refused before run.json changes; what was read is restored from, not read again
    saved = check_resumable(out / STATE_FILE) if spec.train.resume else None
    data = model.adaptkit.data
    preprocess = data.info.extra.get("preprocess")
    rundir.start(spec.to_yaml(), {"name": spec.name, "adaptkit_version": __version__,
                                  **({"preprocess": preprocess} if preprocess else {}),
                                  **({"augment": data.info.extra["augment"]} if "augment" in data.info.extra else {})})
    trainable, total = count_parameters(model)
    loader = LoaderOptions.of(spec.data, device)
    lr = recommended(spec, reg, "lr", 1e-3)
    weight_decay = recommended(spec, reg, "weight_decay", 0.0 if spec.methods else 0.01)
    say(
        f"adaptkit {__version__}: {spec.backbone.name} + [{method_names(spec, trainable)}]"
        f" -> {spec.task.name} on {spec.data.name} | trainable {trainable:,} / {total:,} ({100 * trainable / max(1, total):.2f}%)"
        f" | lr {lr:g} wd {weight_decay:g} | device {device}{f' x{dist.world}' if dist.enabled else ''} | {rundir.out}"
    )

    if preprocess:
        say(f"data: {len(data.train) if data.train is not None else 0:,} training samples | preprocess {InputConfig(**preprocess).describe()}"
            f" | augment {data.info.extra.get('augment', 'none')} | workers {loader.workers}")

    history: list[dict[str, Any]] = []
    train_seconds = 0.0
    resumed_from = 0
    skipped: dict[str, int] = {}
    trainer = None
    trained = None
    if trainable:
        trainer = Trainer(model, data, spec.train, seed=spec.seed, lr=lr, weight_decay=weight_decay, output_dir=out,
                          device=device, dist=dist, spec_fingerprint=spec.fingerprint(), log=say, loader=loader,
                          spec=spec, registry=reg, saved=saved)
        fitted = trainer.fit()
        history, train_seconds, resumed_from, trained = fitted.history, fitted.seconds, fitted.resumed_from, fitted.trained
        skipped["train"] = fitted.skipped
    else:
        say("nothing to train (no method adds or unfreezes parameters): evaluating only")
        fill_whole(model)
        model.to(device)

    from adaptkit.precision import compute_context

    eval_bs = spec.train.eval_batch_size or spec.train.batch_size
    final: dict[str, Any] = {}
    for split in ("val", "test"):
        dataset = getattr(data, split)
        if dataset is not None and len(dataset):
            kept = trainer.eval_loader(split) if trainer is not None else None
            with unsharded_root(model):  # under fsdp every process evaluates with the model still sharded
                final[split] = evaluate(model, dataset, eval_bs, device, lambda: compute_context(model, device.type, spec.train.precision),
                                        options=loader, loader=kept)
            skipped[split] = int(final[split].pop("skipped", 0)) if isinstance(final[split], dict) else 0
    files: list[str] = []
    if trainer is not None and trainer.fsdp and not dist.main:
        # a task's files may come from running the model (samples), which every process of a sharded model runs together
        write_sharded_artifacts(model, final)
    if dist.main:
        save_adapter(model, rundir.run.adapter, state=trained)
        files.append(rundir.run.adapter.name)
        with unsharded_root(model):
            for split, metrics in final.items():
                files += model.write_artifacts(metrics, out, split)
        summary = {
            "val": TaskModel.scalar_metrics(final.get("val", {})),
            "test": TaskModel.scalar_metrics(final.get("test", {})),
            "trainable_params": trainable,
            "total_params": total,
            "trainable_percent": 100 * trainable / max(1, total),
            "steps": len(history) and history[-1]["step"],
            "train_seconds": round(train_seconds, 2),
            "resumed_from_step": resumed_from,
            "adapter_bytes": rundir.run.adapter.stat().st_size,
            "data_skipped": skipped,
        }
        write_json(out / "metrics.json", summary)
        files.append("metrics.json")
        if plot_curves(history, out / "curves.png", model.primary_metric):
            files.append("curves.png")
        rundir.finish({"key_metrics": {f"{s}_{model.primary_metric}": summary[s].get(model.primary_metric) for s in ("val", "test")}})
        for split in ("val", "test"):
            shown = ", ".join(f"{k} {int(v)}" if k == "count" else f"{k} {v:.4f}" for k, v in summary[split].items())
            if shown:
                say(f"{split}: {shown}")
        say(f"wrote {rundir.out}/: {', '.join(files)}")
    return files, final, model, trainable, total




def write_sharded_artifacts(model: Any, final: dict[str, Any]) -> None:
    """What a process other than rank 0 does while rank 0 writes a sharded model's artifacts:
    the same calls, into a scratch directory that is then removed."""
    import tempfile

    from adaptkit.distributed import unsharded_root

    with tempfile.TemporaryDirectory() as scratch, unsharded_root(model):
        for split, metrics in final.items():
            model.write_artifacts(metrics, Path(scratch), split)


def load_run(path: str | Path, overrides: list[str] | None = None, device: str = "cpu") -> Any:
    """The trained model of a run directory (its spec.yaml plus adapter.safetensors), or
    the untrained model of a YAML spec (e.g. one whose backbone is pretrained).

    Example::

        model = adaptkit.runner.load_run("runs/ddpm_digits")
    """
    from adaptkit.builder import build
    from adaptkit.checkpoint import load_adapter
    from adaptkit.distributed import resolve_device
    source = RunDir.locate(path, need_adapter=True)
    model = build(source.load_spec(overrides))
    if source.adapter is not None:
        load_adapter(model, source.adapter)
    model.eval()
    return model.to(resolve_device(device))
