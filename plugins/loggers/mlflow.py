"""Logger ``mlflow``: the run's parameters and scalars to MLflow (an optional extra:
``pip install 'adaptkit[mlflow]'``). MLflow's own settings apply: ``MLFLOW_TRACKING_URI``
(default ``./mlruns``) and ``MLFLOW_EXPERIMENT_NAME``; the MLflow run is named after the spec."""

from __future__ import annotations

from typing import Any

from adaptkit.errors import RunError
from adaptkit.hookspecs import hookimpl
from adaptkit.records import LoggerRecord, RunInfo


class MlflowLogger:
    def __init__(self, run: RunInfo) -> None:
        try:
            import mlflow
        except ImportError:
            raise RunError("train.loggers: mlflow is an optional extra; pip install 'adaptkit[mlflow]' (or mlflow), "
                           "or leave mlflow out of train.loggers") from None
        self.mlflow = mlflow

    @hookimpl
    def adaptkit_train_start(self, run: RunInfo) -> None:
        name = run.spec.name if run.spec is not None else run.output_dir.name
        self.mlflow.start_run(run_name=name)
        if run.spec is not None:
            train = run.spec.train
            self.mlflow.log_params({"backbone": run.spec.backbone.name, "task": run.spec.task.name,
                                    "methods": ",".join(m.name for m in run.spec.methods) or "none",
                                    "batch_size": train.batch_size, "total_steps": run.total_steps, "seed": run.spec.seed})

    @hookimpl
    def adaptkit_train_step(self, step: int, logs: dict[str, float]) -> None:
        self.mlflow.log_metrics({f"train_{key}": value for key, value in logs.items()}, step=step)

    @hookimpl
    def adaptkit_evaluate(self, step: int, record: dict[str, Any]) -> None:
        self.mlflow.log_metrics({k: v for k, v in record.items() if k not in ("step",)}, step=step)

    @hookimpl
    def adaptkit_train_end(self, status: str) -> None:
        self.mlflow.end_run(status="FINISHED" if status == "finished" else "FAILED")


@hookimpl
def adaptkit_loggers() -> list[LoggerRecord]:
    return [LoggerRecord(name="mlflow", factory=MlflowLogger, summary="parameters and scalars to MLflow (optional extra adaptkit[mlflow])")]
