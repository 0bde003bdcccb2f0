"""A run directory as a transaction (torch-free).

- One writer: :class:`RunLock` holds an ``fcntl`` lock on ``.<name>.lock`` beside the run
  directory, with the holder's pid in it; a second ``adaptkit run`` into the directory is
  refused, naming that pid.
- A saved run is never damaged: ``run --overwrite`` writes the new run into
  ``.<name>.staging`` beside the old one and swaps it in only once it has finished; a
  failed or interrupted replacement leaves the old run as it was.
- What a run says about itself (``run.json``) is written atomically, with the statuses
  ``running``, ``done``, ``failed`` and ``interrupted`` (and the reason).
- Leftovers of a killed command (temp files, a staging directory) are removed when the
  next one takes the lock.

Files and directories are created with the permissions the umask allows, as every
other tool's are.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptkit.errors import AdaptkitError, RunError

RUN_FILE = "run.json"
#: where no run directory can live: kernel file systems and devices
SYSTEM_ROOTS = (Path("/proc"), Path("/sys"), Path("/dev"))


class Terminated(KeyboardInterrupt):
    """SIGTERM during a run: handled like Ctrl-C (SIGINT), so the run is marked interrupted."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ----------------------------------------------------------------------------- files
def create_temp_file(path: Path, suffix: str = ".tmp") -> Path:
    """Create an empty ``.<name>.<random><suffix>`` beside ``path`` with the umask's permissions.

    (``tempfile.mkstemp`` makes 0600 files, which a rename then turns into the output's mode.)
    """
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def file_mode() -> int:
    """The permissions a new file gets under the process's umask (0644 under umask 022)."""
    try:
        status = Path("/proc/self/status").read_text()
        mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0)
        os.umask(mask)
    return 0o666 & ~mask


def create_temp_dir(parent: Path, prefix: str) -> Path:
    """Create a new directory ``parent/<prefix><random>`` with the umask's permissions (not mkdtemp's 0700)."""
    while True:
        folder = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_path(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """The one way adaptkit writes a file whole or not at all: the block writes the temp file
    it is given (beside ``path``, with the umask's permissions), which then replaces ``path``
    in one rename; if the block raises, ``path`` is untouched and the temp file removed.

    Example::

        with atomic_path(out) as tmp:
            image.save(tmp, format="PNG")
    """
    tmp = create_temp_file(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_path`)."""
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(text)


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON atomically (temp file + rename)."""
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


@dataclass(frozen=True)
class RunSource:
    """What a command that reads a run was pointed at: a run directory or a spec file.

    ``spec_file`` is the run's ``spec.yaml`` (or the spec file itself; None for a run directory
    without one where that is allowed); ``adapter`` the run's ``adapter.safetensors`` (None for a
    spec file, or an unfinished run where that is allowed).
    """

    path: Path
    spec_file: Path | None
    adapter: Path | None

    @property
    def is_run(self) -> bool:
        return self.path.is_dir()


def locate_run(target: str | Path, *, need_adapter: bool, need_spec: bool = True) -> RunSource:
    """The one reader of where a run's files are, for every command that takes a run directory
    (or a spec file): ``generate``, ``classify``, ``edit``, ``merge``, ``export``, ``load_trained``.

    Example::

        source = locate_run("runs/lora_digits", need_adapter=True)
        source.spec_file, source.adapter      # runs/lora_digits/spec.yaml, .../adapter.safetensors
    """
    path = Path(target)
    if path.is_dir():
        spec = path / "spec.yaml"
        if not spec.is_file():
            if need_spec:
                raise RunError(f"{path}: not a run directory (it has no spec.yaml); give a run directory or a YAML spec")
            spec = None
        adapter = path / "adapter.safetensors"
        if not adapter.is_file():
            if need_adapter:
                raise RunError(f"{path}: the run has no adapter.safetensors yet; has it finished?")
            adapter = None
        return RunSource(path, spec, adapter)
    if path.is_file():
        return RunSource(path, path, None)
    raise RunError(f"{path}: no such run directory or spec file")


def write_saved_run(directory: Path, spec: Any, status: str, name: str | None = None, note: dict[str, Any] | None = None) -> None:
    """Write ``spec.yaml`` and ``run.json`` (atomically) beside an adapter saved outside ``adaptkit run``
    (an import, a combination, ``save_run``), so that merge / export / load_trained take the directory
    like a trained run."""
    from adaptkit import __version__

    write_text(directory / "spec.yaml", spec.to_yaml())
    write_json(directory / RUN_FILE, {"name": name or spec.name or directory.name, "spec_fingerprint": spec.fingerprint(),
                                      "status": status, "adaptkit_version": __version__, "started": _now(), **(note or {})})


def read_marker(directory: Path) -> dict[str, Any] | None:
    """A run directory's ``run.json``, None where there is none; a :class:`RunError` when it is not one adaptkit wrote."""
    path = Path(directory) / RUN_FILE
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_bytes()[: 1 << 20])
    except (OSError, ValueError) as exc:
        raise RunError(f"{path}: damaged run.json ({str(exc).splitlines()[0][:120]}); remove the directory or choose another") from None
    if not isinstance(marker, dict) or not isinstance(marker.get("spec_fingerprint"), str):
        raise RunError(f"{path}: not a run.json adaptkit wrote (expected a mapping with a spec_fingerprint); remove it or choose another directory")
    return marker


def remove_leftovers(directory: Path) -> None:
    """Remove the temp files a killed write left in a run directory and its checkpoint folder."""
    for folder in (directory, directory / "checkpoint"):
        if folder.is_dir():
            for leftover in folder.glob(".*.tmp"):
                if leftover.is_file():
                    leftover.unlink()


def refuse_system_path(out: Path, flag: str) -> None:
    """Refuse an output under /proc, /sys or /dev: kernel file systems, never a place for files."""
    resolved = Path(os.path.abspath(out))
    for root in SYSTEM_ROOTS:
        if resolved == root or root in resolved.parents:
            raise RunError(f"{flag} {out}: lies under {root}, a kernel file system; choose a directory on disk")


# ----------------------------------------------------------------------------- the lock
class RunLock:
    """An exclusive ``fcntl`` lock on ``.<name>.lock`` beside a run directory, naming its holder's pid.

    Example::

        lock = RunLock(Path("runs/quickstart"))
        lock.acquire()        # RunError "... in use by another adaptkit run (pid 1234)" when held
        ...
        lock.release()        # removes the lock file
    """

    def __init__(self, directory: Path) -> None:
        directory = Path(os.path.abspath(directory))
        self.directory = directory
        self.path = directory.parent / f".{directory.name}.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunError(f"output.dir {self.directory}: cannot create {self.path.parent} ({exc.strerror})") from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                raise RunError(f"output.dir {self.directory}: cannot write beside it ({exc.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunError(
                    f"output.dir {self.directory} is in use by another adaptkit run (pid {holder}); "
                    "wait for it to finish, or choose another output.dir"
                ) from None
            # the holder may have removed the file between our open and our lock: lock the one on disk
            try:
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()  # before unlocking: a waiter then sees its file is gone and retries
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None


# ----------------------------------------------------------------------------- the transaction
class RunDirectory:
    """Where one run writes, from its start to its last file, as a transaction.

    Example::

        with RunDirectory(out, spec.fingerprint(), resume=False, overwrite=True) as rundir:
            model = build(spec)                      # may fail: nothing on disk has changed
            rundir.start(spec.to_yaml(), {"name": spec.name})
            ...                                      # write into rundir.work
            rundir.finish({"key_metrics": {...}})    # done; a replaced run is swapped in now

    ``work`` is the run directory itself, or (``overwrite`` of a finished run) a staging
    directory beside it. Only the main process (``main=True``) locks, checks and writes.
    """

    def __init__(self, out: Path, fingerprint: str, *, resume: bool, overwrite: bool, main: bool = True) -> None:
        self.out = Path(out)
        self.fingerprint, self.resume, self.overwrite, self.main = fingerprint, resume, overwrite, main
        self.staging = self.out.parent / f".{self.out.name}.staging"
        self.previous: dict[str, Any] | None = None
        self.replacing = overwrite and not resume and (self.out / RUN_FILE).exists()
        self.started = False
        self._lock = RunLock(self.out)
        self._term_handler: Any = None

    @property
    def work(self) -> Path:
        """The directory this run writes into."""
        return self.staging if self.replacing else self.out

    # ----------------------------------------------------------------- enter / exit
    def __enter__(self) -> "RunDirectory":
        if not self.main:
            return self
        refuse_system_path(self.out, "output.dir")
        if self.out.exists() and not self.out.is_dir():
            raise RunError(f"output.dir {self.out}: exists and is not a directory")
        self._lock.acquire()
        try:
            self._recover()
            self._check()
        except BaseException:
            self._lock.release()
            raise
        if threading.current_thread() is threading.main_thread():
            self._term_handler = signal.signal(signal.SIGTERM, _raise_terminated)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if self._term_handler is not None:
            signal.signal(signal.SIGTERM, self._term_handler)
            self._term_handler = None
        if not self.main:
            return
        try:
            if exc is not None:
                if self.replacing:
                    shutil.rmtree(self.staging, ignore_errors=True)
                elif self.started:
                    self._mark_stopped(exc)
        finally:
            self._lock.release()

    def _recover(self) -> None:
        old = self.out.parent / f".{self.out.name}.old"
        if old.exists():  # killed in the middle of a swap
            if self.out.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(old, self.out)
        if self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)
        remove_leftovers(self.out)

    def _check(self) -> None:
        out = self.out
        marker = read_marker(out)
        if marker is None:
            if out.is_dir() and any(out.iterdir()):
                raise RunError(
                    f"output.dir {out} is not empty and is not an adaptkit run (no run.json); a run would write over "
                    "its files. Choose another output.dir"
                )
            return
        self.previous = marker
        same = marker["spec_fingerprint"] == self.fingerprint
        if self.resume and not same:
            raise RunError(
                f"{out} holds a run of a different spec; resume needs the spec that started it (or choose another output.dir)"
            )
        if not (self.resume or self.overwrite):
            raise RunError(
                f"{out} already holds a run ({marker.get('name', 'unnamed')}); pass --overwrite to replace it, "
                "train.resume=true to continue it, or output.dir=... to write elsewhere"
            )

    # ----------------------------------------------------------------- the run's life
    def start(self, spec_yaml: str, fields: dict[str, Any]) -> None:
        """Mark the run as running: write spec.yaml and run.json into :attr:`work`."""
        if not self.main:
            return
        try:
            self.work.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunError(f"output.dir {self.out}: cannot create it ({exc.strerror})") from None
        marker = dict(self.previous or {}) if self.resume else {}
        for stale in ("reason", "finished"):
            marker.pop(stale, None)
        marker.update(fields, spec_fingerprint=self.fingerprint, status="running")
        marker.setdefault("started", _now())
        (self.work / "spec.yaml").write_text(spec_yaml)
        write_json(self.work / RUN_FILE, marker)
        self.started = True

    def finish(self, fields: dict[str, Any]) -> None:
        """Mark the run as done; a run that replaces another is moved into place now."""
        if not self.main:
            return
        self._update(status="done", finished=_now(), **fields)
        if self.replacing:
            old = self.out.parent / f".{self.out.name}.old"
            os.replace(self.out, old)
            os.replace(self.staging, self.out)
            shutil.rmtree(old, ignore_errors=True)

    def _mark_stopped(self, exc: BaseException) -> None:
        if isinstance(exc, KeyboardInterrupt):
            status, reason = "interrupted", signal.Signals(getattr(exc, "signum", signal.SIGINT)).name
        else:
            status, reason = "failed", str(exc).strip()[:2000] or type(exc).__name__
            if not isinstance(exc, AdaptkitError):
                reason = f"{type(exc).__name__}: {reason}"
        try:
            self._update(status=status, reason=reason, finished=_now())
        except (OSError, RunError):  # the disk that failed the run may refuse this too
            pass

    def _update(self, **fields: Any) -> None:
        marker = read_marker(self.work) or {}
        marker.update(fields)
        write_json(self.work / RUN_FILE, marker)


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(signum)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")
