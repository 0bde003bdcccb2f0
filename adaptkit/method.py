"""What applying a method returns (imports nothing heavy)."""

from __future__ import annotations

from typing import Any

from adaptkit.errors import CompatibilityError


class AppliedMethod:
    """A method applied to a built model.

    ``added`` lists the modules the method attached; a mergeable method overrides
    :meth:`merge` / :meth:`unmerge` to fold itself into the base weights and back.
    """

    mergeable: bool = False

    def __init__(self, name: str, added: list[Any] | None = None, summary: str = "") -> None:
        self.name = name
        self.added = added or []
        self.summary = summary
        self.merged = False

    def merge(self) -> None:
        raise CompatibilityError(f"method '{self.name}' cannot be merged into the base weights")

    def unmerge(self) -> None:
        raise CompatibilityError(f"method '{self.name}' cannot be merged into the base weights")

    def __repr__(self) -> str:
        return f"AppliedMethod({self.name!r}, {self.summary})"
