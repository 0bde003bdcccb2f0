"""Test helpers: run the CLI expecting a user error; hash a folder's files; damaged copies; torchrun runs."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

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


def torchrun(tmp_path: Path, spec: dict, *args: str, cli: list[str] | None = None, launcher: str = "fork") -> subprocess.CompletedProcess:
    """``adaptkit run`` of ``spec`` (written as YAML beside its output dir's name) on 2 gloo processes;
    ``cli`` replaces ``-m adaptkit.cli`` (a script that wraps it), ``args`` are extra overrides.

    ``launcher="torchrun"`` starts them with ``python -m torch.distributed.run`` as a user does.
    The default forks this test process twice, with the environment torchrun gives each process
    (RANK, WORLD_SIZE, MASTER_ADDR/PORT, LOCAL_RANK): the same code path in adaptkit, without two
    fresh interpreters importing torch, timm, open_clip and diffusers (about 20 s per launch here)."""
    path = tmp_path / f"{Path(spec['output']['dir']).name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    if launcher == "fork":
        return forked_ranks(["run", str(path), *args], script=cli[0] if cli else None, log_dir=tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         *(cli or ["-m", "adaptkit.cli"]), "run", str(path), *args],
        capture_output=True, text=True, env=env, timeout=300,
    )


def forked_ranks(argv: list[str], script: str | None, log_dir: Path, world: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the CLI (or ``script`` as ``__main__``) with ``argv`` in ``world`` forks of this process,
    as torchrun's ranks; returns their exit status (the first non-zero one) and their stdout and
    stderr, rank by rank, as ``subprocess.run`` would."""
    import signal
    import time

    port = free_port()
    ranks = [fork_cli(argv, log_dir / f".rank{rank}", script, {
        "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
        "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}, timeout) for rank in range(world)]
    codes: dict[int, int] = {}
    deadline, failed_at = time.monotonic() + timeout, None
    while len(codes) < len(ranks):
        for child in ranks:
            if child.pid in codes:
                continue
            if child.poll() is not None:
                codes[child.pid] = child.returncode
                if codes[child.pid] != 0 and failed_at is None:
                    failed_at = time.monotonic()
        # as torchrun does, one failed rank stops the others; after a grace period, so that a rank
        # still finishing what it was doing (process 0 writing a checkpoint) is not cut short
        if failed_at is not None and time.monotonic() > failed_at + 20:
            for other in ranks:
                if other.pid not in codes and other.poll() is None:
                    os.kill(other.pid, signal.SIGTERM)
        if time.monotonic() > deadline:
            for child in ranks:
                if child.poll() is None:
                    os.kill(child.pid, signal.SIGKILL)
                    child.wait()
            raise subprocess.TimeoutExpired(argv, timeout)
        time.sleep(0.05)
    code = next((codes[child.pid] for child in ranks if codes[child.pid] != 0), 0)
    return subprocess.CompletedProcess(argv, code, "".join(c.stdout() for c in ranks), "".join(c.stderr() for c in ranks))


class ForkedCli:
    """A fork of this test process running the CLI: its pid, and what it wrote to stdout and stderr."""

    def __init__(self, pid: int, logs: Path) -> None:
        self.pid, self.logs = pid, logs
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """Its exit status once it has ended (as ``Popen.poll``), else None."""
        if self.returncode is None:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def stdout(self) -> str:
        return Path(f"{self.logs}.stdout").read_text(errors="replace")

    def stderr(self) -> str:
        return Path(f"{self.logs}.stderr").read_text(errors="replace")

    def wait(self) -> int:
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode


def fork_cli(argv: list[str], logs: Path, script: str | None = None, env: dict[str, str] | None = None,
             timeout: float = 300, paths: tuple[str, ...] = (), cwd: Path | None = None, entry: Any = None) -> ForkedCli:
    """``adaptkit`` with ``argv`` (or ``script`` run as ``__main__``) in a fork of this process, which
    has torch and the libraries imported already, writing to ``logs``.stdout / .stderr, one thread,
    ``env`` added to its environment, ``paths`` put first on its ``sys.path`` (an installed package's
    folder, as PYTHONPATH would: the registry then finds its entry points), in ``cwd``. ``entry``
    replaces the CLI's ``main`` (``pytest.main``). A plain CLI process otherwise (the tests that need a
    real process: a kill, torchrun's ranks)."""
    import gc

    sys.stdout.flush()
    sys.stderr.flush()
    # garbage left by earlier tests (a data loader's workers, a process group) is collected here, not in
    # the child: its finalisers wait on threads and processes that exist only in this process
    gc.collect()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        _child_main(argv, script, Path(f"{logs}.stdout"), Path(f"{logs}.stderr"), env or {}, timeout, paths, cwd, entry or main)
    return ForkedCli(pid, logs)


def forked(argv: list[str], logs: Path, timeout: float = 300, **options: Any) -> subprocess.CompletedProcess:
    """``subprocess.run([python, -m, adaptkit.cli, *argv])`` through :func:`fork_cli` (``options``: its own)."""
    child = fork_cli(argv, logs, timeout=timeout, **options)
    code = child.wait()
    return subprocess.CompletedProcess(argv, code, child.stdout(), child.stderr())


def _child_main(argv: list[str], script: str | None, out: Path, err: Path, env: dict[str, str], timeout: float,
                paths: tuple[str, ...], cwd: Path | None, entry: Any) -> None:  # pragma: no cover
    """The forked process: its own stdout/stderr files, ``env``, one thread; never returns."""
    import faulthandler
    import io
    import runpy
    import traceback

    import gc

    gc.freeze()  # what this process inherited is never collected (nor its pages copied) here
    code = 1
    try:
        try:  # ended with the test process, were that killed (Linux: PR_SET_PDEATHSIG)
            import ctypes
            import signal

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))
        except (OSError, AttributeError):
            pass
        for fd, target in ((1, out), (2, err)):
            handle = os.open(str(target), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(handle, fd)
            os.close(handle)
        sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", closefd=False), line_buffering=True)
        sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", closefd=False), line_buffering=True)
        # a hung child says where it is before the parent's timeout kills it
        faulthandler.dump_traceback_later(float(os.environ.get("ADAPTKIT_TEST_FORK_DUMP", timeout - 5)), exit=False, file=sys.stderr)
        os.environ.update({**env, "OMP_NUM_THREADS": "1"})
        import torch

        torch.set_num_threads(1)
        if paths:
            import importlib

            from adaptkit.registry import registry

            sys.path[:0] = list(paths)
            importlib.invalidate_caches()
            registry(refresh=True)  # the default registry an earlier test made lacks the package
        if cwd is not None:
            os.chdir(cwd)
        if script is None:
            code = entry(argv)
        else:
            sys.argv = [script, *argv]
            runpy.run_path(script, run_name="__main__")
            code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
