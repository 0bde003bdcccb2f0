"""Test helpers: run the CLI expecting a user error; hash a folder's files; damaged copies; a free port for torchrun."""

from __future__ import annotations

import hashlib
import shutil
import socket

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
