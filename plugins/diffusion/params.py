"""Parameters shared by the diffusion backbones (ddpm_unet, unclip). No torch import here."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: conditioning kinds a denoiser can take
CONDITIONINGS = ("none", "class", "text")


class NoiseSchedule(BaseModel):
    """The forward (noising) process a denoiser is trained for: diffusers' DDPM betas.

    Training and every sampler (DDPM, DDIM) read it, so a model and its sampler
    always agree on the schedule.
    """

    model_config = ConfigDict(extra="forbid")

    num_train_timesteps: int = Field(1000, gt=1, description="T, the number of noising steps")
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = Field(
        "linear", description="how beta_t grows from beta_start to beta_end (squaredcos_cap_v2: the cosine schedule)"
    )
    beta_start: float = Field(1e-4, gt=0, lt=1)
    beta_end: float = Field(0.02, gt=0, lt=1)

    @model_validator(mode="after")
    def _ordered(self) -> "NoiseSchedule":
        if self.beta_end <= self.beta_start:
            raise ValueError(f"beta_end ({self.beta_end}) must be larger than beta_start ({self.beta_start})")
        return self

    def scheduler_config(self) -> dict[str, Any]:
        """Keyword arguments for diffusers' DDPMScheduler / DDIMScheduler."""
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_schedule": self.beta_schedule,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "prediction_type": "epsilon",
        }


def architecture_of(model: str, family: tuple[str, ...]) -> str | None:
    """The diffusers class a ``model`` value names: a preset's ``arch``, the class name itself, or None."""
    if model in family:
        return model
    from adaptkit.registry import registry

    preset = registry().preset(model)
    if preset is None:
        return None
    arch = preset.config.get("arch")
    return str(arch) if arch in family else None


def validate_clip_spec(value: dict[str, Any], field: str) -> dict[str, Any]:
    """Check a nested ``clip`` backbone spec (``{model: clip_tiny_digits, ...}``) with the clip plugin's params."""
    from pydantic import ValidationError

    from adaptkit.registry import registry
    from adaptkit.spec import validation_problems

    reg = registry()
    if "clip" not in reg.names("backbone"):
        raise ValueError(f"{field} needs the 'clip' backbone, which is not registered")
    if value.get("name", "clip") != "clip":
        raise ValueError(f"{field}.name: must be clip, got {value['name']!r}")
    record = reg.get("backbone", "clip")
    try:
        record.params.model_validate({**value, "name": "clip"})
    except ValidationError as exc:
        raise ValueError("; ".join(validation_problems(exc, record.params, (field,)))) from None
    return {k: v for k, v in value.items() if k != "name"}


def clip_towers(value: dict[str, Any] | None, wanted: tuple[str, ...]) -> dict[str, Any]:
    """The ``wanted`` towers (TowerInfo) of a nested clip spec, for static checks; {} if clip is absent."""
    if not value:
        return {}
    from adaptkit.registry import registry

    reg = registry()
    if "clip" not in reg.names("backbone"):
        return {}
    record = reg.get("backbone", "clip")
    try:
        params = record.params.model_validate({**value, "name": "clip"})
    except Exception:  # reported by the params validator
        return {}
    towers = record.towers_for(params)
    return {name: towers[name] for name in wanted if name in towers}
