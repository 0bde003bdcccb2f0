"""Past runs on disk: listing them and summarising one (no torch needed)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptkit.errors import RunError, SpecError
from adaptkit.rundir import RUN_FILE, RunDir


@dataclass
class RunRecord:
    """What a run directory says about itself (run.json, metrics.json, spec.yaml)."""

    path: Path
    name: str
    status: str
    started: str = ""
    finished: str = ""
    spec: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def components(self) -> str:
        spec = self.spec
        methods = ", ".join(m.get("name", "?") for m in spec.get("methods") or []) or "none"
        return f"{spec.get('backbone', {}).get('name', '?')} + [{methods}] -> {spec.get('task', {}).get('name', '?')} on {spec.get('data', {}).get('name', '?')}"

    def key_metrics(self) -> dict[str, float]:
        """Every plain-number metric of the final evaluation (but sample counts)."""
        out = {}
        for split in ("val", "test"):
            for key, value in (self.metrics.get(split) or {}).items():
                if key != "count" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    out[f"{split}_{key}"] = value
        if "trainable_percent" in self.metrics:
            out["trainable_%"] = self.metrics["trainable_percent"]
        return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def read_run(path: str | Path) -> RunRecord:
    """Read one run directory; a clear error if it is not one."""
    from adaptkit.spec import read_yaml

    run = RunDir.at(path)
    path = run.path
    info = run.read_marker()
    if info is None:
        raise RunError(f"{path}: not a run directory (no run.json)")
    try:
        spec = read_yaml(run.spec_file) if run.spec_file.exists() else {}
    except SpecError:
        spec = {}
    history = []
    if (path / "metrics.jsonl").exists():
        for line in (path / "metrics.jsonl").read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                history.append(record)
    return RunRecord(
        path=path, name=info.get("name") or path.name, status=info.get("status", "unknown"),
        started=str(info.get("started", "")), finished=str(info.get("finished", "")), spec=_mapping(spec),
        metrics=_mapping(_read_json(path / "metrics.json")), history=history,
    )


def find_runs(root: str | Path) -> list[RunRecord]:
    """Every run directory under ``root`` (itself included), newest first."""
    root = Path(root)
    if not root.is_dir():
        raise RunError(f"{root}: no such directory")
    runs = [read_run(marker.parent) for marker in sorted(root.rglob(RUN_FILE))]
    return sorted(runs, key=lambda r: r.started, reverse=True)
