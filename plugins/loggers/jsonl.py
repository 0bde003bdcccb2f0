"""Logger ``jsonl``: one line per evaluation in the run's ``metrics.jsonl`` (what ``adaptkit runs``
and the curves read). A resumed run's file is rewritten from the checkpoint's history first."""

from __future__ import annotations

import json
from typing import Any

from adaptkit.hookspecs import hookimpl
from adaptkit.records import LoggerRecord, RunInfo


class JsonlLogger:
    def __init__(self, run: RunInfo) -> None:
        self.path = run.output_dir / "metrics.jsonl"

    @hookimpl
    def adaptkit_train_start(self, run: RunInfo) -> None:
        # the records up to the checkpoint (none for a fresh run): a crash after the checkpoint left more
        self.path.write_text("".join(json.dumps(record) + "\n" for record in run.history))

    @hookimpl
    def adaptkit_evaluate(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


@hookimpl
def adaptkit_loggers() -> list[LoggerRecord]:
    return [LoggerRecord(name="jsonl", factory=JsonlLogger, summary="metrics.jsonl: one JSON line per evaluation")]
