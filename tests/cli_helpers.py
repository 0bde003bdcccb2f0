"""Test helpers: run the CLI expecting a user error; hash a folder's files; damaged copies; torchrun runs."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from adaptkit.cli import main


def digest(folder):
    """Every file under ``folder`` with the hash of its bytes: equal digests = nothing changed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def user_error(capsys, args, *fragments):
    """Run the CLI; assert exit 2, one 'error:' line holding every fragment, no traceback."""
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err and err.count("error:") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def free_port() -> int:
    """A TCP port nobody listens on now: torchrun's rendezvous, so parallel test runs do not collide."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def altered_copy(source, target, change):
    """Copy folder ``source`` to ``target``, apply ``change(target)`` (damage it) and return ``target``."""
    shutil.copytree(source, target)
    change(target)
    return target


def torchrun(tmp_path: Path, spec: dict, *args: str, cli: list[str] | None = None) -> subprocess.CompletedProcess:
    """``adaptkit run`` of ``spec`` (written as YAML beside its output dir's name) on 2 gloo processes;
    ``cli`` replaces ``-m adaptkit.cli`` (a script that wraps it), ``args`` are extra overrides."""
    path = tmp_path / f"{Path(spec['output']['dir']).name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         *(cli or ["-m", "adaptkit.cli"]), "run", str(path), *args],
        capture_output=True, text=True, env=env, timeout=300,
    )
