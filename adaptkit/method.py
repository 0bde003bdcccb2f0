"""What applying a method returns (imports nothing heavy)."""

from __future__ import annotations

from typing import Any

from adaptkit.errors import CompatibilityError


class AppliedMethod:
    """A method applied to a built model.

    ``added`` lists the modules the method attached; a mergeable method overrides
    :meth:`merge` / :meth:`unmerge` to fold itself into the base weights and back.
    ``expected_parameters`` is the number of parameters the method trains by its own
    formula (computed from the sites' shapes, not by counting its modules; the contract
    tests check it); ``identity_at_init`` says the model computes exactly what the base
    did until the method's parameters are trained (LoRA, adapters, gated prefixes).
    """

    mergeable: bool = False
    identity_at_init: bool = False
    expected_parameters: int | None = None

    def __init__(
        self,
        name: str,
        added: list[Any] | None = None,
        summary: str = "",
        expected_parameters: int | None = None,
        identity_at_init: bool | None = None,
    ) -> None:
        self.name = name
        self.added = added or []
        self.summary = summary
        self.merged = False
        if expected_parameters is not None:
            self.expected_parameters = expected_parameters
        if identity_at_init is not None:
            self.identity_at_init = identity_at_init

    def merge(self) -> None:
        raise CompatibilityError(f"method '{self.name}' cannot be merged into the base weights")

    def unmerge(self) -> None:
        raise CompatibilityError(f"method '{self.name}' cannot be merged into the base weights")

    def __repr__(self) -> str:
        return f"AppliedMethod({self.name!r}, {self.summary})"
