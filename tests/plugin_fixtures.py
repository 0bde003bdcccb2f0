"""Helpers that create throwaway third-party plugin packages for registry tests."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

GOOD_PLUGIN = '''
from typing import Literal
from pydantic import Field
from adaptkit import ComponentParams, MethodRecord, hookimpl


class BiasOnlyParams(ComponentParams):
    name: Literal["{name}"] = "{name}"
    scale: float = Field(1.0, gt=0)


def apply_bias_only(params, surface, ctx):
    from adaptkit.method import AppliedMethod
    count = 0
    for tower in surface.towers.values():
        for name, p in surface.tower_parameters(tower).items():
            if name.endswith(".bias"):
                p.requires_grad_(True)
                count += p.numel()
    return AppliedMethod("{name}", summary=f"{{count}} biases")


@hookimpl
def adaptkit_methods():
    return [MethodRecord(name="{name}", params=BiasOnlyParams, factory=apply_bias_only,
                         summary="train only the biases (a third-party method)")]
'''


def make_distribution(root: Path, dist: str, module: str, source: str, entry_name: str | None = None) -> Path:
    """Write an importable module plus a ``*.dist-info`` declaring it under the ``adaptkit`` group."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[adaptkit]\n{entry_name or module} = {module}\n")
    return root


class on_path:
    """Context manager: put a folder on sys.path (and drop cached modules afterwards)."""

    def __init__(self, folder: Path, *modules: str) -> None:
        self.folder, self.modules = str(folder), modules

    def __enter__(self) -> None:
        sys.path.insert(0, self.folder)
        import importlib

        importlib.invalidate_caches()

    def __exit__(self, *exc: object) -> None:
        sys.path.remove(self.folder)
        for module in self.modules:
            sys.modules.pop(module, None)
