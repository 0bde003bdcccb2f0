"""adaptkit: plugin-based parameter-efficient fine-tuning for vision, CLIP and diffusion models.

The public API (importing ``adaptkit`` stays cheap: torch and model libraries load
when something is built)::

    import adaptkit
    spec = adaptkit.load_spec("examples/quickstart.yaml", ["train.lr=1e-3"])
    model = adaptkit.build(spec)            # nn.Module with the methods applied
    adaptkit.trainable_state(model)         # exactly the tensors the methods train
    result = adaptkit.run(spec)             # result.metrics, result.output_dir
    adaptkit.registry().names("method")     # every registered method
    adaptkit.load_trained("runs/x")          # a run's model with its adapter loaded
    adaptkit.export_peft(model, "peft_dir")  # also import_peft, merge_to_native, AdapterSet
"""

from __future__ import annotations

from typing import Any

from adaptkit.errors import (
    AdaptkitError,
    CheckpointError,
    CompatibilityError,
    DataError,
    PluginError,
    RunError,
    SpecError,
)
from adaptkit.hookspecs import hookimpl
from adaptkit.params import ComponentParams
from adaptkit.records import (
    BackboneRecord,
    DataRecord,
    MethodRecord,
    PresetRecord,
    TaskRecord,
    TowerInfo,
)
from adaptkit.registry import Registry, registry
from adaptkit.spec import OutputSpec, RunSpec, TrainSpec, load_spec

__version__ = "0.1.0"

_LAZY = {
    "build": ("adaptkit.builder", "build"),
    "run": ("adaptkit.runner", "run"),
    "RunResult": ("adaptkit.runner", "RunResult"),
    "trainable_state": ("adaptkit.checkpoint", "trainable_state"),
    "save_adapter": ("adaptkit.checkpoint", "save_adapter"),
    "load_adapter": ("adaptkit.checkpoint", "load_adapter"),
    "load_trained": ("adaptkit.native", "load_trained"),
    "merge_to_native": ("adaptkit.native", "merge_to_native"),
    "export_peft": ("adaptkit.peft_format", "export_peft"),
    "import_peft": ("adaptkit.peft_format", "import_peft"),
    "AdapterSet": ("adaptkit.adapters", "AdapterSet"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'adaptkit' has no attribute '{name}'")


__all__ = [
    "AdapterSet", "AdaptkitError", "BackboneRecord", "CheckpointError", "CompatibilityError", "ComponentParams", "DataError",
    "DataRecord", "MethodRecord", "OutputSpec", "PluginError", "PresetRecord", "Registry", "RunError", "RunSpec",
    "SpecError", "TaskRecord", "TowerInfo", "TrainSpec", "__version__", "build", "hookimpl", "export_peft", "import_peft", "load_adapter",
    "load_spec", "load_trained", "merge_to_native", "registry", "run", "save_adapter", "trainable_state",
]
