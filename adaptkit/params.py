"""The base class of every component's parameters (what a user writes in a spec)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ComponentParams(BaseModel):
    """Parameters of one backbone, method, task or data source.

    A plugin subclasses it and pins ``name`` to its registered name, so a params
    object says which component it configures::

        class LoraParams(ComponentParams):
            name: Literal["lora"] = "lora"
            rank: int = Field(8, gt=0)

    Unknown keys are errors (``extra="forbid"``), so a misspelled option never passes
    silently, and numbers must be finite (``allow_inf_nan=False``; a field that means
    "no limit" by infinity says ``Field(allow_inf_nan=True)``).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    name: str


class LoaderParams(ComponentParams):
    """How the trainer reads a data source: worker processes, prefetching, bad samples.

    A data source's params subclass it to offer these options (the built-in image
    sources do); the trainer reads them from any params that are a ``LoaderParams``
    and uses the defaults for others. Example (YAML)::

        data: {name: image_folder, root: photos/, workers: 4, on_error: skip}
    """

    workers: int = Field(0, ge=0, le=256, description="data-loader worker processes (0: read in the training process)")
    prefetch: int = Field(2, ge=1, le=64, description="batches each worker prepares ahead")
    persistent_workers: bool = Field(True, description="keep workers alive between epochs and evaluations")
    pin_memory: bool | None = Field(None, description="page-locked batches for faster copies to the GPU (default: on with CUDA)")
    on_error: Literal["skip", "fail"] = Field(
        "skip", description="an unreadable or truncated sample: skip it (another takes its place; counted and reported) or fail the run"
    )
    timeout: float = Field(0, ge=0, le=86_400, description="seconds to wait for one batch from a worker before failing (0: no limit)")



class BackboneParams(ComponentParams):
    """Parameters every backbone shares: a backbone plugin's params subclass it.

    ``dtype`` stores the frozen base weights in bf16 or fp16 (half the memory of fp32), or
    with ``auto`` in the dtype the checkpoint stores on disk; the tensors methods train stay
    fp32, and the model computes under autocast to that dtype. Example (YAML)::

        backbone: {name: vit, model: vit_base_patch16_224, pretrained: ckpt/, dtype: bf16}
    """

    dtype: Literal["fp32", "bf16", "fp16", "auto"] = Field(
        "fp32", description="storage dtype of the frozen base weights (bf16/fp16: half the memory; trained tensors stay fp32); "
        "auto: the dtype the checkpoint stores on disk"
    )
