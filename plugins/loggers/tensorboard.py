"""Logger ``tensorboard``: the run's scalars as TensorBoard events in ``<run>/tensorboard/``
(``torch.utils.tensorboard``; needs the ``tensorboard`` package). View them with
``tensorboard --logdir runs/``."""

from __future__ import annotations

from typing import Any

from adaptkit.errors import RunError
from adaptkit.hookspecs import hookimpl
from adaptkit.records import LoggerRecord, RunInfo


class TensorBoardLogger:
    def __init__(self, run: RunInfo) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise RunError(f"train.loggers: tensorboard needs the tensorboard package ({exc}); "
                           "pip install tensorboard, or leave tensorboard out of train.loggers") from None
        self.writer = SummaryWriter(log_dir=str(run.output_dir / "tensorboard"), purge_step=run.start_step + 1)

    @hookimpl
    def adaptkit_train_step(self, step: int, logs: dict[str, float]) -> None:
        for key, value in logs.items():
            self.writer.add_scalar(f"train/{key}", value, step)

    @hookimpl
    def adaptkit_evaluate(self, step: int, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key.startswith("val_"):
                self.writer.add_scalar(f"val/{key[len('val_'):]}", value, step)
        self.writer.add_scalar("train/mean_loss", record["train_loss"], step)

    @hookimpl
    def adaptkit_train_end(self) -> None:
        self.writer.close()


@hookimpl
def adaptkit_loggers() -> list[LoggerRecord]:
    return [LoggerRecord(name="tensorboard", factory=TensorBoardLogger, summary="TensorBoard events in <run>/tensorboard/")]
