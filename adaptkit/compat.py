"""Static compatibility checks: run at validation time, before anything is built."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from adaptkit.records import BackboneRecord, DataRecord, MethodRecord, TaskRecord, TowerInfo


def tower_names(tower: str | Sequence[str] | None, towers: Mapping[str, TowerInfo]) -> list[str] | None:
    """Resolve a method's ``tower`` option to tower names; None if it names an unknown tower."""
    if tower in (None, "all", "both"):
        return list(towers)
    names = [tower] if isinstance(tower, str) else list(tower)
    return names if all(n in towers for n in names) else None


def require(
    method: str,
    backbone: str,
    towers: Mapping[str, TowerInfo],
    tower: str | Sequence[str] | None,
    site: str | Sequence[str],
    roles: Sequence[str] = (),
) -> list[str]:
    """Problems if no chosen tower offers ``site`` (or any of several sites) or a role is absent.

    For use in a :class:`~adaptkit.records.MethodRecord` ``check``::

        def check(params, backbone, towers):
            return require("lora", backbone, towers, params.tower, "layers", params.targets)
    """
    names = tower_names(tower, towers)
    if names == []:
        return [f"method '{method}': tower is an empty list; name towers of backbone '{backbone}' ({', '.join(towers) or 'none'}) or 'all'"]
    if names is None:
        return [f"method '{method}': backbone '{backbone}' has no tower '{tower}'; towers: {', '.join(towers) or 'none'}"]
    if not names:
        return [f"method '{method}': tower names no tower; give all or some of: {', '.join(towers) or 'none'}"]
    sites = [site] if isinstance(site, str) else list(site)
    explicit = tower not in (None, "all", "both")
    offering = [n for n in names if any(s in towers[n].sites for s in sites)]
    wanted = " or ".join(sites)
    if not offering or (explicit and len(offering) < len(names)):
        missing = [n for n in names if n not in offering] or names
        where = f"tower '{missing[0]}' of backbone '{backbone}'" if explicit else f"backbone '{backbone}'"
        return [f"method '{method}' needs {wanted} sites, but {where} has none"]
    problems = []
    if roles:
        available = set().union(*(towers[n].roles for n in offering))
        for role in roles:
            if role not in available:
                from adaptkit.errors import did_you_mean

                problems.append(
                    f"method '{method}': backbone '{backbone}' has no layers with role '{role}'"
                    f"{did_you_mean(role, available)}; roles: {', '.join(sorted(available))}"
                )
    return problems


def check_spec(spec: Any, registry: Any) -> list[str]:
    """Every incompatibility between the spec's backbone, methods, task and data."""
    problems: list[str] = []
    backbone: BackboneRecord = registry.get("backbone", spec.backbone.name)
    towers = backbone.towers_for(spec.backbone)
    for index, params in enumerate(spec.methods):
        record: MethodRecord = registry.get("method", params.name)
        if record.check is not None:
            problems += [f"methods[{index}]: {p}" for p in record.check(params, backbone.name, towers)]
    task: TaskRecord = registry.get("task", spec.task.name)
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
