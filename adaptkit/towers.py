"""Which towers a method's ``tower`` option picks: one rule, used at validation (from the
backbone record's :class:`~adaptkit.records.TowerInfo`) and at build (from the built
:class:`~adaptkit.surface.Surface`), so the two cannot disagree. Torch-free."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from adaptkit.errors import CompatibilityError

#: option values meaning every tower that offers the sites ("both": the two towers of an image-text model)
EVERY_TOWER = ("all", "both")


def resolve_towers(tower: str | Sequence[str] | None, offers: Mapping[str, Collection[str]], kinds: Sequence[str] | None,
                   method: str, backbone: str) -> list[str]:
    """The names of the towers ``tower`` picks, in the backbone's order.

    ``offers`` maps each tower to the site kinds it has; ``kinds`` are the kinds the method
    can use (any one will do; None: the tower itself is enough). ``None``, ``"all"`` or
    ``"both"`` pick every tower offering one of ``kinds``; names (one, or a list, where
    ``"all"`` / ``"both"`` stand for every tower) must each exist and offer one of them.
    Raises :class:`CompatibilityError` naming the method, the backbone and what is missing.

    Example::

        resolve_towers("both", {"vision": {"layers"}, "text": {"layers", "text"}}, ["text"], "system_prompt", "clip")
        # ['text']
    """
    listing = ", ".join(offers) or "none"
    wanted = " or ".join(kinds or ())

    def offering(name: str) -> bool:
        return kinds is None or any(kind in offers[name] for kind in kinds)

    if tower is None or (isinstance(tower, str) and tower in EVERY_TOWER):
        chosen = [name for name in offers if offering(name)]
        if not chosen:
            raise CompatibilityError(f"method '{method}' needs {wanted} sites, but backbone '{backbone}' has none")
        return chosen
    names = [tower] if isinstance(tower, str) else list(tower)
    if not names:
        raise CompatibilityError(f"method '{method}': tower is an empty list; name towers of backbone '{backbone}' ({listing}) or 'all'")
    if any(name in EVERY_TOWER for name in names):
        names = list(offers)
    for name in names:
        if name not in offers:
            raise CompatibilityError(f"method '{method}': backbone '{backbone}' has no tower '{name}'; towers: {listing}")
        if not offering(name):
            raise CompatibilityError(f"method '{method}' needs {wanted} sites, but tower '{name}' of backbone '{backbone}' has none")
    return [name for name in offers if name in names]
