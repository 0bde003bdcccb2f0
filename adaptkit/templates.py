"""Text templates: where a text goes in a template (torch-free). One rule for the system_prompt
method, which rewrites what a text tower reads, and for the tasks that write class texts
(contrastive's zero-shot check)."""

from __future__ import annotations

#: placeholders a template may use for the text it wraps
PLACEHOLDERS = ("{label}", "{text}", "{}")


def fill(template: str, text: str) -> str:
    """``fill("a photo of a {label}.", "cat") == "a photo of a cat."`` (also ``{text}`` and ``{}``)."""
    for placeholder in PLACEHOLDERS:
        template = template.replace(placeholder, text)
    return template


def check_template(template: str) -> str:
    """``template`` itself, or a ValueError (for a pydantic validator) when it has no placeholder."""
    if not isinstance(template, str) or not any(p in template for p in PLACEHOLDERS):
        raise ValueError(f"template {template!r} has no placeholder; write {{label}} where the text goes")
    return template
