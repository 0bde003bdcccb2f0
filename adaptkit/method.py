"""What applying a method returns (imports nothing heavy)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from adaptkit.errors import CompatibilityError


def free_child_name(parent: Any, base: str, taken: Collection[str] = ()) -> str:
    """The first of ``base``, ``base_1``, ``base_2``, ... that ``parent`` (a module) has no
    attribute of and that is not in ``taken``: the name under which a method attaches what it adds.

    Example::

        layer.add_module(free_child_name(layer, "lora"), delta)   # "lora", or "lora_1" when stacked
    """
    name, index = base, 1
    while hasattr(parent, name) or name in taken:
        name, index = f"{base}_{index}", index + 1
    return name


@dataclass
class LowRankUpdate:
    """One low-rank update of a Linear or Conv2d layer: ``W[rows] += scale * B @ A``.

    ``a`` is (r, in) for a Linear or (r, in, kh, kw) for a Conv2d (applied as a
    convolution with the layer's stride, padding and dilation); ``b`` is (rows, r),
    applied as a 1x1 map. ``rows`` is the (start, stop) range of output rows the update
    covers (q inside a fused qkv), None for all of them. ``a`` and ``b`` are *views of
    the method's parameters*: writing into them (under ``torch.no_grad()``) changes
    the method, which is how imports and combinations fill an adapter. ``layer`` is
    the layer's qualified name in the built model, ``module`` the layer itself.

    Example::

        for update in applied.low_rank_updates():
            print(update.layer, update.rows, update.rank, update.delta().norm())
    """

    layer: str
    module: Any
    rows: tuple[int, int] | None
    a: Any
    b: Any
    scale: float
    dropout: float = 0.0

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def row_range(self) -> tuple[int, int]:
        """``rows``, or all output rows of the layer."""
        return self.rows if self.rows is not None else (0, int(self.module.weight.shape[0]))

    def delta(self) -> Any:
        """The dense update ``scale * B @ A``, shaped like the covered rows of the weight."""
        start, stop = self.row_range
        return (self.b @ self.a.flatten(1)).reshape(stop - start, *self.a.shape[1:]) * self.scale


class AppliedMethod:
    """A method applied to a built model.

    ``added`` lists the modules the method attached; a mergeable method overrides
    :meth:`merge` / :meth:`unmerge` to fold itself into the base weights and back.
    ``expected_parameters`` is the number of parameters the method trains by its own
    formula (computed from the sites' shapes, not by counting its modules; the contract
    tests check it); ``identity_at_init`` says the model computes exactly what the base
    did until the method's parameters are trained (LoRA, adapters, gated prefixes).

    Optional pieces, for interop and several adapters on one model:

    - ``switchable`` methods implement :meth:`set_enabled` (turn the method off and
      on without removing it);
    - low-rank methods implement :meth:`low_rank_updates` (export to PEFT's LoRA
      format, combining adapters).
    """

    mergeable: bool = False
    switchable: bool = False
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

    def set_enabled(self, enabled: bool) -> None:
        """Turn the method's effect off (the model computes what it did without it) or back on."""
        raise CompatibilityError(f"method '{self.name}' cannot be switched off and on")

    def low_rank_updates(self) -> list[LowRankUpdate]:
        """The method's effect as low-rank updates of layers (views of its parameters)."""
        raise CompatibilityError(f"method '{self.name}' is not a low-rank update of layers (as LoRA is)")

    def __repr__(self) -> str:
        return f"AppliedMethod({self.name!r}, {self.summary})"
