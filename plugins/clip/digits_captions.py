"""Data source ``digits_captions``: scikit-learn's digits, each with captions in several wordings."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from adaptkit.hookspecs import hookimpl
from adaptkit.records import DataRecord
from adaptkit_plugins.data.digits import DigitsParams

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

#: the default caption wordings; {word} is "seven", {digit} is "7"
WORDINGS = (
    "a photo of the digit {word}.",
    "a handwritten {digit}.",
    "the number {word}, written by hand.",
    "a blurry image of a {digit}.",
    "{word}",
    "a scanned digit: {digit}.",
    "an 8x8 picture of the number {word}.",
    "a {word}.",
)


def caption(wording: str, digit: int) -> str:
    """``caption("a handwritten {digit}.", 7) == "a handwritten 7."``"""
    return wording.replace("{word}", DIGIT_WORDS[digit]).replace("{digit}", str(digit))


class DigitsCaptionsParams(DigitsParams):
    """The bundled digits with generated captions; training draws a random wording per image and epoch.

    Class names are the digit words ("zero" ... "nine"), so the zero-shot accuracy of a
    text classifier can be measured on the same data.
    """

    name: Literal["digits_captions"] = "digits_captions"  # type: ignore[assignment]
    wordings: list[str] = Field(
        default_factory=lambda: list(WORDINGS),
        description="caption wordings with {word} ('seven') and/or {digit} ('7'); default: 8 built-in wordings",
    )

    @field_validator("wordings")
    @classmethod
    def _wordings(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("give at least one wording")
        for wording in value:
            if "{word}" not in wording and "{digit}" not in wording:
                raise ValueError(f"wording {wording!r} names no digit; use {{word}} or {{digit}}")
        return value


def load_digits_captions(params: DigitsCaptionsParams, ctx: Any) -> Any:
    from adaptkit_plugins.clip.captions_data import digits_captions_bundle

    return digits_captions_bundle(params, ctx)


@hookimpl
def adaptkit_data_sources() -> list[DataRecord]:
    return [
        DataRecord(
            name="digits_captions",
            params=DigitsCaptionsParams,
            factory=load_digits_captions,
            summary="the bundled 8x8 digits with captions in 8 wordings (embedded image-text pairs; labels too)",
            provides="captioned_images",
        )
    ]
