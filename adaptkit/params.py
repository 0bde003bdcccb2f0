"""The base class of every component's parameters (what a user writes in a spec)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


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
