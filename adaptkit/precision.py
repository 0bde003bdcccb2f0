"""``backbone.dtype``: frozen base weights stored in bf16 or fp16, trained tensors in fp32.

``auto`` keeps the dtype the checkpoint stores on disk (an fp16 ``*.safetensors`` stays fp16).

The build stores every frozen floating-point parameter of the backbone in the spec's dtype
once the methods are applied, so what they add or unfreeze (LoRA factors, prompts, a head,
full fine-tuning's weights) stays fp32. A model with a lower-precision base computes under
:func:`compute_context` (``torch.autocast`` to that dtype): the trainer, the evaluations
and the commands that run a model enter it. Merging and export build the base at fp32
(:func:`at_full_precision`), so merged weights are not rounded; the base fingerprint is
taken before the weights are cast, so an adapter trained on a bf16 base loads onto the
fp32 one and back.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from adaptkit.params import BackboneParams

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def spec_dtype(spec: Any) -> str:
    """The base dtype a spec asks for by name (fp32 for a backbone whose params have no ``dtype``)."""
    params = spec.backbone
    return params.dtype if isinstance(params, BackboneParams) else "fp32"


def resolve_dtype(spec: Any, stored: torch.dtype | None) -> torch.dtype:
    """The dtype to store the frozen base in: the spec's, or with ``auto`` the one the weights
    files store (``stored``; fp32 when they were not read or mix dtypes)."""
    name = spec_dtype(spec)
    if name == "auto":
        return stored if stored in TORCH_DTYPES.values() else torch.float32
    return TORCH_DTYPES[name]


def store_frozen(module: nn.Module, dtype: torch.dtype) -> int:
    """Cast every frozen floating-point parameter of ``module`` to ``dtype`` in place; returns how many."""
    count = 0
    if dtype == torch.float32:
        return count
    for param in module.parameters():
        if not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            count += 1
    return count


def base_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the built model's frozen base is stored in (fp32 when not built by adaptkit)."""
    info = getattr(model, "adaptkit", None)
    return info.base_dtype if info is not None else torch.float32


def compute_context(model: nn.Module, device_type: str, precision: str = "fp32") -> Any:
    """The autocast a model computes under: ``precision`` bf16 (``train.precision``), else the
    lower-precision dtype of its base, else none. Example::

        with compute_context(model, "cpu"):
            metrics = model.evaluate(batches)
    """
    dtype = torch.bfloat16 if precision == "bf16" else base_dtype(model)
    if dtype == torch.float32:
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=dtype)


def at_full_precision(spec: Any) -> Any:
    """``spec`` with its base at fp32 (for merging and export); the spec itself when it already is."""
    if spec_dtype(spec) == "fp32":
        return spec
    return spec.model_copy(update={"backbone": spec.backbone.model_copy(update={"dtype": "fp32"})})
