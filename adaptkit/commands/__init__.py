"""Sub-commands of the ``adaptkit`` command line: the core's, one module each, and the
plugins' (added through the ``adaptkit_commands`` hook with :class:`Commands`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from adaptkit.errors import PluginError

#: a command's body: takes the parsed arguments, returns the exit status (None means 0)
CommandMain = Callable[[argparse.Namespace], "int | None"]


class Commands:
    """What the ``adaptkit_commands`` hook receives: the door through which a plugin adds a
    subcommand and its flags.

    Example::

        @hookimpl
        def adaptkit_commands(commands):
            p = commands.add("edit", main=run_edit, help="edit images towards a prompt")
            p.add_argument("--prompt")

    A name that is already taken (by the core or another plugin) is a
    :class:`~adaptkit.errors.PluginError` naming both.
    """

    def __init__(self, subparsers: argparse._SubParsersAction, provider: str = "adaptkit",
                 owners: dict[str, str] | None = None) -> None:
        self._subparsers = subparsers
        self._provider = provider
        self._owners = owners if owners is not None else {}

    def for_provider(self, provider: str) -> Commands:
        """The same door, with commands added through it credited to ``provider``."""
        return Commands(self._subparsers, provider, self._owners)

    def add(self, name: str, main: CommandMain, help: str, description: str | None = None) -> argparse.ArgumentParser:
        """Add subcommand ``name``; return its parser, to which the caller adds flags.
        ``main(args)`` runs when the command is given."""
        if name in self._owners:
            raise PluginError(f"command '{name}' is added twice: by '{self._owners[name]}' and by '{self._provider}'")
        self._owners[name] = self._provider
        parser = self._subparsers.add_parser(name, help=help, description=description or help)
        parser.set_defaults(_main=main)
        return parser
