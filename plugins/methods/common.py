"""Helpers shared by the method implementations (imports torch)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from torch import nn

from adaptkit.errors import CompatibilityError
from adaptkit.method import free_child_name

T = TypeVar("T")

#: modules whose forward runs their children: never attach method modules to them
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def attach(parent: nn.Module, base: str, child: nn.Module) -> str:
    """Add ``child`` to ``parent`` under ``base`` (``base_1``, ... when taken); return the name."""
    name = free_child_name(parent, base)
    parent.add_module(name, child)
    return name


def host(*candidates: Any) -> nn.Module:
    """The first candidate module that can safely hold a child (not a Sequential/ModuleList)."""
    for module in candidates:
        if isinstance(module, nn.Module) and not isinstance(module, _CONTAINERS):
            return module
    raise CompatibilityError(f"no module among {[type(m).__name__ for m in candidates]} can hold adapter parameters")


def pick(items: Sequence[T], indices: Sequence[int] | None, what: str, method: str, where: str) -> list[T]:
    """``items`` at ``indices`` (negative counts from the end); all of them when None."""
    if indices is None:
        return list(items)
    chosen = []
    for index in indices:
        if not -len(items) <= index < len(items):
            raise CompatibilityError(
                f"method '{method}': layers index {index} is out of range; {where} has {len(items)} {what}"
            )
        chosen.append(items[index])
    return chosen
