"""The command line: exit codes 0 / 2 / 1, one clear message, never a traceback for user errors."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from adaptkit.cli import main
from tests.cli_helpers import user_error
from tests.conftest import tiny_vit_spec


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def cli(*args):
    done = subprocess.run([sys.executable, "-m", "adaptkit.cli", *map(str, args)], capture_output=True, text=True)
    return done.returncode, done.stdout, done.stderr


def test_validate_ok_and_errors(tmp_path, capsys):
    good = write(tmp_path, "good.yaml", tiny_vit_spec(tmp_path))
    assert main(["validate", str(good)]) == 0
    assert "ok: " in capsys.readouterr().out
    bad = write(tmp_path, "bad.yaml", {**tiny_vit_spec(tmp_path), "methods": [{"name": "lora", "rnak": 2}]})
    assert main(["validate", str(good), str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: methods[0].rnak: unknown key (did you mean 'rank'?)" in err
    assert "Traceback" not in err


def test_validate_reports_incompatible_methods(tmp_path, capsys):
    spec = {**tiny_vit_spec(tmp_path), "methods": [{"name": "lora", "tower": "text"}]}
    assert main(["validate", str(write(tmp_path, "x.yaml", spec))]) == 2
    assert "backbone 'vit' has no tower 'text'" in capsys.readouterr().err


def test_user_errors_exit_2_without_traceback(tmp_path, capsys):
    user_error(capsys, ["run", tmp_path / "missing.yaml"], "missing.yaml: file not found")
    spec = tiny_vit_spec(tmp_path)
    spec["backbone"]["pretrained"] = str(tmp_path / "weights.safetensors")
    user_error(capsys, ["run", write(tmp_path, "w.yaml", spec)], "weights.safetensors: file not found")
    user_error(capsys, ["run", write(tmp_path, "o.yaml", tiny_vit_spec(tmp_path)), "train.lr=-1"], "train.lr: Input should be greater than 0")
    spec = tiny_vit_spec(tmp_path)
    spec["backbone"]["model"] = "vit_tiny_digit"
    user_error(capsys, ["run", write(tmp_path, "m.yaml", spec), "--dry-run"], "did you mean 'vit_tiny_digits'")


def test_internal_errors_exit_1(tmp_path, monkeypatch, capsys):
    import adaptkit.commands.validate as validate

    monkeypatch.setattr(validate, "main", lambda args: 1 / 0)
    assert main(["validate", str(write(tmp_path, "s.yaml", tiny_vit_spec(tmp_path)))]) == 1
    assert "internal error" in capsys.readouterr().err


def test_run_prints_metrics_and_refuses_to_clobber(tmp_path, capsys):
    path = write(tmp_path, "r.yaml", tiny_vit_spec(tmp_path))
    code = main(["run", str(path), "train.max_steps=3", "train.eval_every=3"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "test: accuracy" in out and "trainable" in out
    before = (tmp_path / "run" / "adapter.safetensors").read_bytes()
    assert main(["run", str(path), "train.max_steps=3"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err
    assert (tmp_path / "run" / "adapter.safetensors").read_bytes() == before
    assert main(["run", str(path), "--overwrite", "train.max_steps=3", "train.eval_every=3", "train.progress=false"]) == 0


def in_process(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_dry_run_and_plugins_and_schema(tmp_path, capsys):
    code, out, _ = in_process(capsys, "run", write(tmp_path, "d.yaml", tiny_vit_spec(tmp_path)), "--dry-run")
    assert code == 0 and "trainable parameters" in out and "+ [lora] ->" in out
    assert not (tmp_path / "run").exists()
    code, out, _ = in_process(capsys, "run", write(tmp_path, "probe.yaml", tiny_vit_spec(tmp_path, methods=[])), "--dry-run")
    assert code == 0 and "+ [no method: the task's own parameters] ->" in out  # a linear probe: the head trains
    code, out, _ = in_process(capsys, "plugins", "--json")
    listing = json.loads(out)
    lora = next(m for m in listing["method"] if m["name"] == "lora")
    assert lora["provider"] == "adaptkit_plugins.methods.lora"
    assert {"name": "rank", "type": "int", "default": 8, "required": False, "help": "rank r of the update"} in lora["params"]
    code, out, _ = in_process(capsys, "schema")
    assert code == 0 and json.loads(out)["title"] == "adaptkit RunSpec"


def test_a_run_that_cannot_build_leaves_no_run_behind(tmp_path, capsys):
    spec = tiny_vit_spec(tmp_path)
    spec["backbone"]["pretrained"] = str(tmp_path / "missing.safetensors")
    path = write(tmp_path, "missing.yaml", spec)
    for _ in range(2):  # the second try fails the same way, not with "already holds a run"
        assert main(["run", str(path)]) == 2
        err = capsys.readouterr().err
        assert "missing.safetensors" in err and "already holds" not in err
    assert not (tmp_path / "run" / "run.json").exists()


def test_bad_command_line_exits_2():
    """The real entry point (``python -m adaptkit.cli``, a process of its own): argparse's exit 2, and a
    user error's exit 2 with one line and no traceback; every other test here calls ``main`` in-process."""
    code, _, err = cli("run")
    assert code == 2 and "usage" in err
    code, _, err = cli("validate", "a.yaml", "--bogus")
    assert code == 2
    code, out, _ = cli("schema")
    assert code == 0 and json.loads(out)["title"] == "adaptkit RunSpec"
    code, _, err = cli("run", "missing.yaml")
    assert code == 2 and err.startswith("error: ") and "missing.yaml: file not found" in err and "Traceback" not in err
