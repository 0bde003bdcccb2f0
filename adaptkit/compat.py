"""Static compatibility checks: run at validation time, before anything is built."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from adaptkit.errors import CompatibilityError, did_you_mean
from adaptkit.records import BackboneRecord, DataRecord, MethodRecord, TaskRecord, TowerInfo
from adaptkit.towers import resolve_towers


def tower_names(tower: str | Sequence[str] | None, towers: Mapping[str, TowerInfo]) -> list[str] | None:
    """Resolve a method's ``tower`` option to tower names; None if it names an unknown tower
    (:func:`adaptkit.towers.resolve_towers` without a site kind)."""
    try:
        return resolve_towers(tower, {name: info.sites for name, info in towers.items()}, None, "", "")
    except CompatibilityError:
        return None


def require(
    method: str,
    backbone: str,
    towers: Mapping[str, TowerInfo],
    tower: str | Sequence[str] | None,
    site: str | Sequence[str] | None,
    roles: Sequence[str] = (),
) -> list[str]:
    """Problems if no chosen tower offers ``site`` (or any of several sites; None: a named
    tower that does not exist is the only problem) or a role is absent.

    The towers are chosen by :func:`adaptkit.towers.resolve_towers`, the rule the build
    uses too. For use in a :class:`~adaptkit.records.MethodRecord` ``check``::

        def check(params, backbone, towers):
            return require("lora", backbone, towers, params.tower, "layers", params.targets)
    """
    sites = None if site is None else [site] if isinstance(site, str) else list(site)
    try:
        offering = resolve_towers(tower, {name: info.sites for name, info in towers.items()}, sites, method, backbone)
    except CompatibilityError as exc:
        return [str(exc)]
    problems = []
    if roles:
        available = set().union(*(towers[n].roles for n in offering))
        for role in roles:
            if role not in available:
                problems.append(
                    f"method '{method}': backbone '{backbone}' has no layers with role '{role}'"
                    f"{did_you_mean(role, available)}; roles: {', '.join(sorted(available))}"
                )
    return problems


def check_spec(spec: Any, registry: Any) -> list[str]:
    """Every incompatibility between the spec's backbone, methods, task and data."""
    problems: list[str] = []
    backbone: BackboneRecord = registry.get("backbone", spec.backbone.name)
    task: TaskRecord = registry.get("task", spec.task.name)
    towers = task.towers if task.towers is not None else backbone.towers_for(spec.backbone)
    for index, params in enumerate(spec.methods):
        record: MethodRecord = registry.get("method", params.name)
        if record.check is not None:
            problems += [f"methods[{index}]: {p}" for p in record.check(params, backbone.name, towers)]
    missing = sorted(task.needs - backbone.capabilities)
    if missing:
        problems.append(
            f"task: task '{task.name}' needs a backbone with {', '.join(missing)}; backbone '{backbone.name}' offers "
            f"{', '.join(sorted(backbone.capabilities)) or 'nothing it can use'}"
        )
    data: DataRecord = registry.get("data", spec.data.name)
    if task.data_kinds and data.provides not in task.data_kinds:
        problems.append(
            f"data: task '{task.name}' trains on {' or '.join(sorted(task.data_kinds))} data; "
            f"data source '{data.name}' provides {data.provides}"
        )
    return problems
