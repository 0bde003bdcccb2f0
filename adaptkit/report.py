"""A small self-contained HTML page about one run: spec, metrics, curves, images."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from adaptkit.runs import RunRecord, read_run

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f5f5f5}td:first-child,th:first-child{text-align:left}
pre{background:#f7f7f7;padding:.8em;overflow:auto}figure{display:inline-block;margin:.5em}
img{max-width:100%;image-rendering:pixelated}figcaption{font-size:.85em;color:#555}
.status{padding:.1em .5em;border-radius:.3em;background:#e8f4e8}
"""


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(path.name)}</figcaption></figure>'


def _table(rows: dict[str, dict[str, float]]) -> str:
    keys = sorted({k for metrics in rows.values() for k, v in metrics.items() if isinstance(v, (int, float))})
    if not keys:
        return "<p>no metrics</p>"
    head = "<tr><th>metric</th>" + "".join(f"<th>{html.escape(s)}</th>" for s in rows) + "</tr>"
    body = ""
    for key in keys:
        cells = "".join(
            f"<td>{rows[s][key]:.4g}</td>" if isinstance(rows[s].get(key), (int, float)) else "<td></td>" for s in rows
        )
        body += f"<tr><td>{html.escape(key)}</td>{cells}</tr>"
    return f"<table>{head}{body}</table>"


def render(run: RunRecord) -> str:
    """The HTML page of a run, with every PNG of the run directory inlined."""
    import yaml

    splits = {s: run.metrics[s] for s in ("val", "test") if isinstance(run.metrics.get(s), dict) and run.metrics[s]}
    summary = {k: v for k, v in run.metrics.items() if not isinstance(v, dict)}
    images = sorted(run.path.glob("*.png"))
    curves = [p for p in images if p.name == "curves.png"]
    others = [p for p in images if p.name != "curves.png"]
    sample_dirs = [d for d in sorted(run.path.iterdir()) if d.is_dir() and d.name in ("samples", "images", "edits")]
    for folder in sample_dirs:
        others += sorted(folder.glob("*.png"))[:32]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>adaptkit run {html.escape(run.name)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(run.name)} <span class='status'>{html.escape(run.status)}</span></h1>",
        f"<p>{html.escape(run.components)}<br>started {html.escape(run.started)}"
        + (f", finished {html.escape(run.finished)}" if run.finished else "") + f"<br><code>{html.escape(str(run.path))}</code></p>",
        "<h2>Metrics</h2>", _table(splits) if splits else "<p>no final metrics (the run did not finish)</p>",
        "<h2>Run</h2>", _table({"value": summary}) if summary else "",
        "<h2>Curves</h2>", "".join(_image(p) for p in curves) or "<p>no curves</p>",
    ]
    if others:
        parts += ["<h2>Images</h2>", "".join(_image(p) for p in others)]
    if run.history:
        parts += ["<h2>Evaluations</h2>", _table({f"step {r.get('step')}": r for r in run.history[-12:]})]
    parts += ["<h2>Spec</h2>", f"<pre>{html.escape(yaml.safe_dump(run.spec, sort_keys=False))}</pre>"]
    per_class = {s: m.get("per_class_accuracy") for s, m in splits.items() if isinstance(m.get("per_class_accuracy"), dict)}
    if per_class:
        parts += ["<h2>Per-class accuracy</h2>", _table(per_class)]
    parts += [f"<script type='application/json' id='metrics'>{html.escape(json.dumps(run.metrics, default=str))}</script>",
              "</body></html>"]
    return "\n".join(parts)


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.html`` (or ``out``) for the run in ``run_dir``; returns its path."""
    from adaptkit.rundir import write_text

    run = read_run(run_dir)
    target = Path(out) if out else run.path / "report.html"
    write_text(target, render(run))
    return target
