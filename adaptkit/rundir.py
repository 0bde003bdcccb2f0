"""Run directories (torch-free): :class:`RunDir` is the one reader and writer of a run's files,
:class:`RunTransaction` the life of a run writing one.

- Every command finds a run through :class:`RunDir` (a directory, its adapter file, or a YAML
  spec where the command takes one), reads its spec, adapter and ``run.json`` through it, and
  writes ``run.json`` and the status through it.
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


# ----------------------------------------------------------------------------- one run directory
SPEC_FILE = "spec.yaml"
ADAPTER_FILE = "adapter.safetensors"
#: the files that make a directory run-shaped
RUN_FILES = (SPEC_FILE, ADAPTER_FILE, RUN_FILE)


@dataclass(frozen=True)
class RunDir:
    """A run directory: the one way adaptkit finds, reads and writes a run's spec, adapter and ``run.json``.

    ``path`` is the directory, or the file a command was given in its place (a YAML spec, or
    an adapter file); ``spec_file`` and ``adapter`` are the run's spec and adapter, None where
    there is none (a spec file has no adapter, an unfinished run no adapter yet).

    Example::

        run = RunDir.locate("runs/lora_digits", need_adapter=True)   # or a YAML spec where a command takes one
        spec = run.load_spec(["train.device=cpu"])
        spec, adapter = RunDir.trained("runs/lora_digits/adapter.safetensors").spec_and_adapter()

        out = RunDir.at("runs/new")                     # a writer's view: the files need not exist yet
        out.write_marker({"spec_fingerprint": "...", "status": "running"})
        out.set_status("done", finished="...")           # atomic read-modify-write of run.json
        out.read_marker()["status"]                     # 'done'
    """

    path: Path
    spec_file: Path | None
    adapter: Path | None

    # ----------------------------------------------------------------- finding a run
    @classmethod
    def at(cls, directory: str | Path) -> "RunDir":
        """The run directory ``directory`` as its writer sees it: every file in its place, whether written yet or not."""
        directory = Path(directory)
        return cls(directory, directory / SPEC_FILE, directory / ADAPTER_FILE)

    @classmethod
    def locate(cls, target: str | Path, *, need_adapter: bool, need_spec: bool = True) -> "RunDir":
        """What a command that reads a run directory or a YAML spec (``generate``, ``classify``, ``edit``)
        was pointed at; a :class:`RunError` saying what is missing.

        Example::

            run = RunDir.locate("runs/lora_digits", need_adapter=True)
            run.spec_file, run.adapter      # runs/lora_digits/spec.yaml, .../adapter.safetensors
        """
        path = Path(target)
        if path.is_dir():
            spec: Path | None = path / SPEC_FILE
            if not spec.is_file():
                if need_spec:
                    raise RunError(f"{path}: not a run directory (it has no spec.yaml); give a run directory or a YAML spec")
                spec = None
            adapter: Path | None = path / ADAPTER_FILE
            if not adapter.is_file():
                if need_adapter:
                    raise RunError(f"{path}: the run has no adapter.safetensors yet; has it finished?")
                adapter = None
            return cls(path, spec, adapter)
        if path.is_file():
            return cls(path, path, None)
        raise RunError(f"{path}: no such run directory or spec file")

    @classmethod
    def trained(cls, target: str | Path) -> "RunDir":
        """A trained run, for the commands that need its adapter (``merge``, ``export``, ``combine``,
        ``load_trained``): its directory, or its adapter file alone (whose metadata holds the spec)."""
        path = Path(target)
        if path.is_dir():  # (an adapter's own metadata holds its spec: spec.yaml may be missing)
            return cls.locate(path, need_adapter=True, need_spec=False)
        if path.is_file() and path.suffix.lower() in (".yaml", ".yml", ".json"):
            raise RunError(f"{path}: a spec, not a trained run; give the run directory (or its adapter.safetensors)")
        return cls(path, None, path)

    @property
    def is_run(self) -> bool:
        """True for a run directory, False for a file given in its place."""
        return self.path.is_dir()

    # ----------------------------------------------------------------- reading
    def load_spec(self, overrides: list[str] | None = None, registry: Any = None) -> Any:
        """The run's spec (a RunSpec) with ``overrides`` applied; errors name the spec file.

        A spec without a name is named after its file, or (in a run directory) after the directory.
        """
        from adaptkit.spec import apply_overrides, read_yaml, validate_spec

        if self.spec_file is None:
            raise RunError(f"{self.path}: the run has no spec.yaml")
        source = str(self.spec_file)
        data = read_yaml(self.spec_file)
        if data.get("name") is None:
            data["name"] = self.path.name if self.is_run else self.spec_file.stem
        if overrides:
            data = apply_overrides(data, list(overrides), source)
        return validate_spec(data, registry, source)

    def spec_and_adapter(self) -> tuple[Any, Path]:
        """The spec a trained run's adapter was trained with, and the adapter file.

        The adapter's metadata holds its spec; a run directory's spec.yaml may differ from it
        in what does not change what the tensors mean (data paths on another machine), but
        not in its methods or task.
        """
        from adaptkit.checkpoint import read_metadata
        from adaptkit.errors import CheckpointError
        from adaptkit.spec import load_spec, stored_spec

        if self.adapter is None:
            raise RunError(f"{self.path}: the run has no adapter.safetensors yet; has it finished?")
        adapter = self.adapter
        metadata = read_metadata(adapter)
        if "spec" not in metadata:
            if self.spec_file is not None:
                return self.load_spec(), adapter
            raise CheckpointError(f"{adapter}: holds no spec in its metadata (not an adaptkit adapter file); pass its run directory")
        try:
            stored = load_spec(stored_spec(json.loads(metadata["spec"]), str(adapter)))
        except ValueError:
            raise CheckpointError(f"{adapter}: the spec in its metadata is not valid JSON; the file is damaged") from None
        if self.spec_file is None:
            return stored, adapter
        spec = self.load_spec()
        for key in ("methods", "task"):
            if spec.to_dict()[key] != stored.to_dict()[key]:
                raise RunError(
                    f"{self.path}: spec.yaml and adapter.safetensors disagree on {key} (the adapter's own spec says "
                    f"{json.dumps(stored.to_dict()[key])[:200]}); they come from different runs. Re-run it, or pass the adapter file"
                )
        return spec, adapter

    @property
    def marker_file(self) -> Path:
        return self.path / RUN_FILE

    def read_marker(self) -> dict[str, Any] | None:
        """The run's ``run.json``, None where there is none; a :class:`RunError` when it is not one adaptkit wrote."""
        path = self.marker_file
        if not path.is_file():
            return None
        try:
            marker = json.loads(path.read_bytes()[: 1 << 20])
        except (OSError, ValueError) as exc:
            raise RunError(f"{path}: damaged run.json ({str(exc).splitlines()[0][:120]}); remove the directory or choose another") from None
        if not isinstance(marker, dict) or not isinstance(marker.get("spec_fingerprint"), str):
            raise RunError(f"{path}: not a run.json adaptkit wrote (expected a mapping with a spec_fingerprint); remove it or choose another directory")
        return marker

    # ----------------------------------------------------------------- writing
    def write_marker(self, marker: dict[str, Any]) -> None:
        """Write ``run.json`` whole or not at all (:func:`atomic_path`)."""
        write_json(self.marker_file, marker)

    def set_status(self, status: str, **fields: Any) -> dict[str, Any]:
        """Set the run's status in ``run.json``, with ``fields`` (a reason, when it finished, metrics); the
        rest of what it says is kept. Returns what it now says."""
        marker = self.read_marker() or {}
        marker.update(fields, status=status)
        self.write_marker(marker)
        return marker

    def mark_running(self, spec_yaml: str, fields: dict[str, Any], previous: dict[str, Any] | None = None) -> None:
        """Write the spec and a ``run.json`` saying the run is running; ``previous`` (a resumed run's
        run.json) keeps what it said, but not why or when it last stopped."""
        marker = dict(previous or {})
        for stale in ("reason", "finished"):
            marker.pop(stale, None)
        marker.update(fields, status="running")
        marker.setdefault("started", _now())
        write_text(self.path / SPEC_FILE, spec_yaml)
        self.write_marker(marker)

    def mark_stopped(self, exc: BaseException) -> None:
        """Say in ``run.json`` why the run stopped: ``interrupted`` (Ctrl-C, SIGTERM) or ``failed`` (the error)."""
        if isinstance(exc, KeyboardInterrupt):
            status, reason = "interrupted", signal.Signals(getattr(exc, "signum", signal.SIGINT)).name
        else:
            status, reason = "failed", str(exc).strip()[:2000] or type(exc).__name__
            if not isinstance(exc, AdaptkitError):
                reason = f"{type(exc).__name__}: {reason}"
        self.set_status(status, reason=reason, finished=_now())

    def write_saved(self, spec: Any, status: str, name: str | None = None, note: dict[str, Any] | None = None) -> None:
        """Write ``spec.yaml`` and ``run.json`` beside an adapter saved outside ``adaptkit run`` (an import,
        a combination, ``save_run``), so that merge / export / load_trained take the directory like a trained run."""
        from adaptkit import __version__

        write_text(self.path / SPEC_FILE, spec.to_yaml())
        self.write_marker({"name": name or spec.name or self.path.name, "spec_fingerprint": spec.fingerprint(),
                           "status": status, "adaptkit_version": __version__, "started": _now(), **(note or {})})


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
class RunTransaction:
    """Where one run writes, from its start to its last file, as a transaction.

    Example::

        with RunTransaction(out, spec.fingerprint(), resume=False, overwrite=True) as rundir:
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
        self.replacing = overwrite and not resume and RunDir.at(self.out).marker_file.exists()
        self.started = False
        self._lock = RunLock(self.out)
        self._term_handler: Any = None

    @property
    def work(self) -> Path:
        """The directory this run writes into."""
        return self.staging if self.replacing else self.out

    @property
    def run(self) -> RunDir:
        """:attr:`work` as a :class:`RunDir`: where this run's files go and what its run.json says."""
        return RunDir.at(self.work)

    # ----------------------------------------------------------------- enter / exit
    def __enter__(self) -> "RunTransaction":
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
                    try:
                        self.run.mark_stopped(exc)
                    except (OSError, RunError):  # the disk that failed the run may refuse this too
                        pass
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
        marker = RunDir.at(out).read_marker()
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
        self.run.mark_running(spec_yaml, {**fields, "spec_fingerprint": self.fingerprint}, self.previous if self.resume else None)
        self.started = True

    def finish(self, fields: dict[str, Any]) -> None:
        """Mark the run as done; a run that replaces another is moved into place now."""
        if not self.main:
            return
        self.run.set_status("done", finished=_now(), **fields)
        if self.replacing:
            old = self.out.parent / f".{self.out.name}.old"
            os.replace(self.out, old)
            os.replace(self.staging, self.out)
            shutil.rmtree(old, ignore_errors=True)


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(signum)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")
