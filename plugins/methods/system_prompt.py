"""Method ``system_prompt``: hard-prompt templates and a system/context text for text towers.

Every text a tower is fed (a class name for zero-shot classification, a caption, a
diffusion prompt) is rewritten through the tower's text site: ``"7"`` becomes
``"a handwritten 7."``. Several templates form an ensemble: the tower averages the
normalised embeddings of a text's variants (CLIP's prompt ensembling). Nothing is
trained; the method composes with any backbone whose towers have a text site.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from adaptkit.compat import require
from adaptkit.errors import did_you_mean
from adaptkit.hookspecs import hookimpl
from adaptkit.params import ComponentParams
from adaptkit.records import MethodRecord
from adaptkit.templates import PLACEHOLDERS, check_template, fill

BUILTIN_SETS = Path(__file__).with_name("template_sets.yaml")


@lru_cache(maxsize=16)
def _read_sets(path: str) -> dict[str, tuple[str, ...]]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"template file {path} not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"template file {path} cannot be read: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"template file {path}: expected a mapping of set name -> list of templates")
    sets = {}
    for name, templates in data.items():
        if isinstance(templates, str):
            templates = [templates]
        if not isinstance(templates, list) or not templates:
            raise ValueError(f"template file {path}: set '{name}' must be a non-empty list of templates")
        sets[str(name)] = tuple(check_template(t) for t in templates)
    return sets


def template_sets(extra_file: str | None = None) -> dict[str, tuple[str, ...]]:
    """The built-in named template sets, updated with those of ``extra_file``."""
    sets = dict(_read_sets(str(BUILTIN_SETS)))
    if extra_file:
        sets.update(_read_sets(str(Path(extra_file).resolve())))
    return sets


class SystemPromptParams(ComponentParams):
    """Rewrite a tower's texts through templates (an ensemble when several) and a system text."""

    name: Literal["system_prompt"] = "system_prompt"
    templates: list[str] | str | None = Field(
        None,
        description="templates with a {label} placeholder, e.g. ['a photo of a {label}.'] (several = an ensemble), "
        "or the name of a template set (built-in: clip_default, imagenet_ensemble7, food, pets, flowers, satellite, "
        "textures, digits); default: the text unchanged",
    )
    template_file: str | None = Field(None, description="a YAML file of named template sets (set name: [templates]) to choose from")
    system: str | None = Field(None, description="a context text joined to every text, e.g. 'handwritten digits.'")
    system_position: Literal["prefix", "suffix"] = Field("prefix", description="put the system text before or after the text")
    tower: str | list[str] = Field("all", description="towers whose text is rewritten: all (every tower with a text site) or names")

    @field_validator("templates")
    @classmethod
    def _templates(cls, value: list[str] | str | None) -> list[str] | str | None:
        if isinstance(value, list):
            if not value:
                raise ValueError("give at least one template, or leave templates unset")
            for template in value:
                check_template(template)
        return value

    @model_validator(mode="after")
    def _known_set(self) -> "SystemPromptParams":
        if isinstance(self.templates, str):
            sets = template_sets(self.template_file)
            if self.templates not in sets:
                if any(p in self.templates for p in PLACEHOLDERS):
                    raise ValueError(f"templates: give a list ([{self.templates!r}]) or the name of a template set")
                raise ValueError(
                    f"templates: unknown template set '{self.templates}'{did_you_mean(self.templates, sets)}; sets: {', '.join(sorted(sets))}"
                )
        elif self.template_file:
            template_sets(self.template_file)  # a missing or broken file is an error even when unused
        if self.templates is None and not self.system:
            raise ValueError("give templates, a system text, or both")
        return self

    def resolved_templates(self) -> list[str]:
        """The templates to apply (a set name resolved); empty when only a system text is given."""
        if self.templates is None:
            return []
        if isinstance(self.templates, str):
            return list(template_sets(self.template_file)[self.templates])
        return list(self.templates)

    def rewrite(self, text: str) -> str | list[str]:
        """The rewritten text, or its variants when there are several templates."""
        templates = self.resolved_templates() or ["{text}"]
        out = []
        for template in templates:
            filled = fill(template, text)
            if self.system:
                filled = f"{self.system} {filled}" if self.system_position == "prefix" else f"{filled} {self.system}"
            out.append(filled)
        return out[0] if len(out) == 1 else out


def check_system_prompt(params: SystemPromptParams, backbone: str, towers: Any) -> list[str]:
    return require("system_prompt", backbone, towers, params.tower, "text")


def apply_system_prompt(params: SystemPromptParams, surface: Any, ctx: Any) -> Any:
    from adaptkit.method import AppliedMethod

    towers = surface.select(params.tower, "text", "system_prompt")
    for tower in towers:
        tower.text.add(params.rewrite)
    templates = params.resolved_templates()
    what = f"{len(templates)} template{'s' if len(templates) != 1 else ''}" + (" (ensemble)" if len(templates) > 1 else "")
    if params.system:
        what += f", system text {params.system!r}"
    # the parameter formula: templates train nothing
    return AppliedMethod("system_prompt", [], f"{what} on {', '.join(t.name for t in towers)}", expected_parameters=0)


@hookimpl
def adaptkit_methods() -> list[MethodRecord]:
    return [
        MethodRecord(
            name="system_prompt",
            params=SystemPromptParams,
            factory=apply_system_prompt,
            summary="hard-prompt templates (ensembles average normalised text embeddings) and a system text; no trainable parameters",
            check=check_system_prompt,
            example={"templates": ["a photo of the digit {label}."]},
        )
    ]
