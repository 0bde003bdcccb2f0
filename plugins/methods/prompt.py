"""Method ``prompt``: soft prompt tokens, VPT-shallow and VPT-deep (Jia et al., 2022).

Where a tower has a token site (ViT, CLIP towers), ``count`` learned tokens join the
sequence after the embedding (shallow) or are replaced by fresh ones before every block
and dropped after it (deep). Where it has none (Swin partitions tokens into windows),
the prompts enter through the attention sites: they pass through each layer's frozen
norm and k/v projection and join every window's keys and values, which is what VPT-deep
computes for the image tokens. ``route`` forces one way or the other.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from adaptkit.compat import require, tower_names
from adaptkit.hookspecs import hookimpl
from adaptkit.params import ComponentParams
from adaptkit.records import MethodRecord


class PromptParams(ComponentParams):
    """Visual prompt tuning: learned tokens in the sequence, or as keys/values of every attention."""

    name: Literal["prompt"] = "prompt"
    count: int | None = Field(None, gt=0, description="prompt tokens (per block when deep); default 8, or init_text's token count")
    deep: bool = Field(True, description="fresh prompts before every block (VPT-deep); false: once, after the embedding (VPT-shallow)")
    route: Literal["auto", "tokens", "attention"] = Field(
        "auto", description="auto: the token site where the tower has one, else the attention sites (deep only)"
    )
    init: Literal["uniform", "normal"] = Field(
        "uniform", description="uniform: VPT's Xavier-uniform over patch fan-in + width; normal: N(0, 0.02)"
    )
    tower: str | list[str] = Field("all", description="which towers: all, or names such as vision / text")
    init_text: str | None = Field(
        None,
        min_length=1,
        description="CoOp: start the context from these words' token embeddings (text towers, shallow; "
        "count defaults to the number of tokens), e.g. 'a photo of a'",
    )

    @model_validator(mode="after")
    def _shallow_needs_tokens(self) -> "PromptParams":
        if self.route == "attention" and not self.deep:
            raise ValueError(
                "route 'attention' is deep by construction (fresh prompt keys/values at every layer); "
                "set deep: true, or route: tokens for VPT-shallow"
            )
        if self.init_text is not None and (self.deep or self.route == "attention"):
            raise ValueError(
                "init_text starts CoOp's context from words, which enter the text once, after the start token; "
                "set deep: false (and route: auto or tokens)"
            )
        return self

    @property
    def tokens(self) -> int:
        """``count``, or its default where init_text does not decide it."""
        return 8 if self.count is None else self.count


def sites_needed(params: PromptParams) -> list[str]:
    """The site kinds the prompt can use, in order of preference."""
    if params.route == "tokens" or not params.deep:
        return ["tokens"]
    if params.route == "attention":
        return ["attention"]
    return ["tokens", "attention"]


def check_prompt(params: PromptParams, backbone: str, towers: Any) -> list[str]:
    problems = require("prompt", backbone, towers, params.tower, sites_needed(params))
    if not problems and params.init_text is not None:
        names = tower_names(params.tower, towers) or []
        images = [n for n in names if towers[n].modality != "text"]
        if images:
            text = [n for n, t in towers.items() if t.modality == "text"]
            hint = f"set tower: {text[0]}" if text else f"backbone '{backbone}' has no text tower"
            problems.append(f"method 'prompt': init_text needs text towers, but tower '{images[0]}' reads images; {hint}")
    if problems and not params.deep and params.route != "tokens":
        problems = [p + " (VPT-shallow needs a token site; deep: true goes through the attention sites instead)" for p in problems]
    return problems


def apply_prompt(params: PromptParams, surface: Any, ctx: Any) -> Any:
    from adaptkit_plugins.methods._prompt_impl import apply

    return apply(params, surface)


@hookimpl
def adaptkit_methods() -> list[MethodRecord]:
    return [
        MethodRecord(
            name="prompt",
            params=PromptParams,
            factory=apply_prompt,
            summary="visual prompt tuning (VPT shallow/deep) via token sites, or via attention sites where a tower has none (Swin)",
            check=check_prompt,
            # measured (BENCHMARKS.md): 3e-2 leaves VPT under-trained in 1,000 steps on ViT and Swin
            recommended={"lr": 1e-1, "weight_decay": 0.0},
            example={"count": 2},
        )
    ]
