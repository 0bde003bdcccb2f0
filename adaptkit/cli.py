"""The ``adaptkit`` command line.

Each core sub-command lives in :mod:`adaptkit.commands` as a module with ``add_parser``
and ``main``; plugins add theirs through the ``adaptkit_commands`` hook. User errors (:class:`~adaptkit.errors.AdaptkitError`) print one clear
message and exit 2; anything else is an internal error (exit 1).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import keyword
import sys
import traceback

from adaptkit.errors import AdaptkitError

COMMANDS = [
    "run",
    "validate",
    "plugins",
    "schema",
    "runs",
    "report",
    "generate",
    "classify",
    "export",
    "import",
    "merge",
    "combine",
]


def parser() -> argparse.ArgumentParser:
    """The command line: the core's commands, then those the plugins add."""
    from adaptkit import __version__
    from adaptkit.commands import Commands
    from adaptkit.registry import registry

    top = argparse.ArgumentParser(prog="adaptkit", description="Parameter-efficient adaptation of vision, CLIP and diffusion models.")
    top.add_argument("--version", action="version", version=f"adaptkit {__version__}")
    sub = top.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        module_name = name.replace("-", "_")
        if keyword.iskeyword(module_name):  # `import` lives in commands/import_.py
            module_name += "_"
        module = importlib.import_module(f"adaptkit.commands.{module_name}")
        command = module.add_parser(sub)
        command.set_defaults(_main=module.main)
    registry().add_commands(Commands(sub, owners={name: "adaptkit" for name in COMMANDS}))
    return top


#: what the machine refuses, not adaptkit: a full disk, a quota, a read-only file system, too long a name
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENAMETOOLONG}


def environment_problem(exc: OSError) -> str | None:
    """The one-line message of an OSError the user's machine caused (a full disk...), or None for others."""
    if exc.errno not in ENVIRONMENT_ERRNOS:
        return None
    where = f"{exc.filename}: " if exc.filename else ""
    hint = {errno.ENOSPC: "free some space or write elsewhere", errno.EDQUOT: "free some space or write elsewhere",
            errno.EROFS: "write to another directory", errno.ENAMETOOLONG: "choose a shorter name"}[exc.errno]
    return f"{where}{exc.strerror or os.strerror(exc.errno)}; {hint}"


def main(argv: list[str] | None = None) -> int:
    try:
        top = parser()
    except AdaptkitError as exc:  # a broken registry file or built-in plugin: nothing can run
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # overrides (key=value) may come after options: `run spec.yaml --overwrite train.lr=1e-3`
    args, extra = top.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            top.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args._main(args) or 0)
    except AdaptkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM during a run (adaptkit.rundir.Terminated)
        print("interrupted", file=sys.stderr)
        return 128 + getattr(exc, "signum", 2)
    except BrokenPipeError:  # `adaptkit schema | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        problem = environment_problem(exc)
        if problem is None:
            traceback.print_exc()
            print("internal error: this is a bug in adaptkit or a plugin; please report it with the traceback above", file=sys.stderr)
            return 1
        print(f"error: {problem}", file=sys.stderr)
        return 2
    except Exception:  # a bug: show where, ask for a report
        traceback.print_exc()
        print("internal error: this is a bug in adaptkit or a plugin; please report it with the traceback above", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
