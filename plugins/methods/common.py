"""Helpers shared by the method implementations (imports torch)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from torch import nn

from adaptkit.errors import CompatibilityError
from adaptkit.surface import Surface, Tower

T = TypeVar("T")

#: modules whose forward runs their children: never attach method modules to them
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def attach(parent: nn.Module, base: str, child: nn.Module) -> str:
    """Add ``child`` to ``parent`` under ``base`` (``base_1``, ... when taken); return the name."""
    name, index = base, 1
    while hasattr(parent, name):
        name, index = f"{base}_{index}", index + 1
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


def towers_with(surface: Surface, tower: str | Sequence[str] | None, kinds: Sequence[str], method: str) -> list[Tower]:
    """Towers named by a method's ``tower`` option that offer any of ``kinds`` of site."""
    if len(kinds) == 1:
        return surface.select(tower, kinds[0], method)
    wanted = " or ".join(kinds)
    if tower in (None, "all", "both"):
        chosen = [t for t in surface.towers.values() if any(t.has(k) for k in kinds)]
        if not chosen:
            raise CompatibilityError(f"method '{method}' needs {wanted} sites, but backbone '{surface.backbone}' has none")
        return chosen
    names = [tower] if isinstance(tower, str) else list(tower)
    out = []
    for name in names:
        if name not in surface.towers:
            raise CompatibilityError(
                f"method '{method}': backbone '{surface.backbone}' has no tower '{name}'; towers: {', '.join(surface.towers)}"
            )
        if not any(surface.towers[name].has(k) for k in kinds):
            raise CompatibilityError(
                f"method '{method}' needs {wanted} sites, but tower '{name}' of backbone '{surface.backbone}' has none"
            )
        out.append(surface.towers[name])
    return out
