"""User-facing error types.

Every error a user can cause (a bad spec, an unknown plugin, a missing file, a
damaged checkpoint) is an :class:`AdaptkitError`. The command line catches it once,
prints its message and exits with status 2; anything else is a bug (status 1).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class AdaptkitError(Exception):
    """Base class of every error a user can cause and fix."""


class SpecError(AdaptkitError):
    """A run spec (YAML file, dict or override) is invalid.

    ``problems`` holds one ``"path: message"`` line per problem so that all of them
    are reported at once.
    """

    def __init__(self, problems: list[str] | str, source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        prefix = f"{source}: " if source else ""
        if len(self.problems) == 1:
            message = prefix + self.problems[0]
        else:
            head = f"{source}: {len(self.problems)} problems" if source else f"{len(self.problems)} problems"
            message = head + "\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)


class PluginError(AdaptkitError):
    """A plugin is missing, clashes with another, or breaks the plugin contract."""


class CompatibilityError(AdaptkitError):
    """A method, backbone and task were combined in a way that cannot work."""


class CheckpointError(AdaptkitError):
    """A weights or adapter file is missing, damaged, or belongs to another model."""


class DataError(AdaptkitError):
    """A data source cannot be read, or its contents do not fit the model."""


class RunError(AdaptkitError):
    """A run cannot start (for example, its output directory holds another run)."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest choice, or ``""``.

    Example::

        >>> did_you_mean("lroa", ["lora", "full"])
        " (did you mean 'lora'?)"
    """
    matches = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{matches[0]}'?)" if matches else ""
