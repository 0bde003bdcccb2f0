"""Logger ``progress_bar``: the terminal's progress bar (tqdm) with loss, learning rate and
samples per second, and a line per evaluation. ``train.progress: false`` turns it off."""

from __future__ import annotations

from typing import Any

from adaptkit.hookspecs import hookimpl
from adaptkit.records import LoggerRecord, RunInfo


class ProgressBar:
    def __init__(self, run: RunInfo) -> None:
        self.bar: Any = None
        self.key = f"val_{run.primary_metric}"

    @hookimpl
    def adaptkit_train_start(self, run: RunInfo) -> None:
        if run.train is not None and not run.train.progress:
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=run.total_steps, initial=run.start_step, desc="train", unit="step", dynamic_ncols=True, leave=True)

    @hookimpl
    def adaptkit_train_step(self, logs: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}", img_s=f"{logs['samples_per_second']:.0f}",
                                 refresh=False)
            self.bar.update(1)

    @hookimpl
    def adaptkit_evaluate(self, step: int, record: dict[str, Any]) -> None:
        if self.bar is not None and self.key in record:
            self.bar.write(f"step {step}: train_loss {record['train_loss']:.4f}  {self.key} {record[self.key]:.4f}")

    @hookimpl
    def adaptkit_train_end(self) -> None:
        if self.bar is not None:
            self.bar.close()


@hookimpl
def adaptkit_loggers() -> list[LoggerRecord]:
    return [LoggerRecord(name="progress_bar", factory=ProgressBar, summary="the terminal progress bar (off with train.progress: false)")]
