"""Method ``prompt``: soft prompt tokens, VPT-shallow and VPT-deep (Jia et al., 2022).

Where a tower has a token site (ViT, CLIP towers), ``count`` learned tokens join the
sequence after the embedding (shallow) or are replaced by fresh ones before every block
and dropped after it (deep). Where it has none (Swin partitions tokens into windows),
the prompts enter through the attention sites: they pass through each layer's frozen
norm and k/v projection and join every window's keys and values, which is what VPT-deep
computes for the image tokens. ``route`` forces one way or the other.

With ``placeholder`` the method is textual inversion (Gal et al., 2022) instead: the
text tower learns one new word, a single token embedding started from the embedding of
``initializer_token`` (the names of diffusers' ``textual_inversion.py`` options), and
every text containing the word is encoded with it. Only that vector trains;
:func:`placeholder_embeddings` and :func:`write_learned_embeds` give it in diffusers'
``learned_embeds.safetensors`` format.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from adaptkit.compat import require, tower_names
from adaptkit.hookspecs import hookimpl
from adaptkit.params import ComponentParams
from adaptkit.records import MethodRecord

if TYPE_CHECKING:
    import torch

#: the options of soft prompts that textual inversion (``placeholder``) does not take
SOFT_PROMPT_OPTIONS = ("count", "deep", "route", "init", "init_text")
#: the file name diffusers' textual_inversion.py writes and load_textual_inversion looks for
LEARNED_EMBEDS_FILE = "learned_embeds.safetensors"


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
    placeholder: str | None = Field(
        None,
        min_length=1,
        description="textual inversion: learn this new word (one token embedding) on the text tower, e.g. '<my-digit>'; "
        "it must not be a word the tokenizer already has",
    )
    initializer_token: str | None = Field(
        None,
        min_length=1,
        description="textual inversion: the existing one-token word whose embedding the placeholder starts from, e.g. 'digit'",
    )

    @field_validator("placeholder", "initializer_token")
    @classmethod
    def _one_word(cls, value: str | None) -> str | None:
        if value is not None and (value != value.strip() or any(c.isspace() for c in value)):
            raise ValueError(f"{value!r} must be one word without spaces")
        return value

    @model_validator(mode="after")
    def _textual_inversion(self) -> "PromptParams":
        if (self.placeholder is None) != (self.initializer_token is None):
            raise ValueError(
                "textual inversion needs both placeholder (the new word, e.g. '<my-digit>') and initializer_token "
                "(an existing word it starts from, e.g. 'digit')"
            )
        # by value, not by model_fields_set: a run's saved spec writes every field out
        given = [o for o in SOFT_PROMPT_OPTIONS if getattr(self, o) != type(self).model_fields[o].default]
        if self.placeholder is not None and given:
            raise ValueError(
                f"placeholder makes this method textual inversion (one learned word embedding); "
                f"{', '.join(given)} belong{'s' if len(given) == 1 else ''} to soft prompts: leave {'it' if len(given) == 1 else 'them'} out"
            )
        return self

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
    if params.placeholder is not None:
        return ["tokens"]
    if params.route == "tokens" or not params.deep:
        return ["tokens"]
    if params.route == "attention":
        return ["attention"]
    return ["tokens", "attention"]


def check_prompt(params: PromptParams, backbone: str, towers: Any) -> list[str]:
    problems = require("prompt", backbone, towers, params.tower, sites_needed(params))
    words = "placeholder" if params.placeholder is not None else "init_text" if params.init_text is not None else None
    if not problems and words is not None:
        names = tower_names(params.tower, towers) or []
        images = [n for n in names if towers[n].modality != "text"]
        if images:
            text = [n for n, t in towers.items() if t.modality == "text"]
            hint = f"set tower: {text[0]}" if text else f"backbone '{backbone}' has no text tower"
            problems.append(f"method 'prompt': {words} needs text towers, but tower '{images[0]}' reads images; {hint}")
    if params.placeholder is not None:
        return problems
    if problems and not params.deep and params.route != "tokens":
        problems = [p + " (VPT-shallow needs a token site; deep: true goes through the attention sites instead)" for p in problems]
    return problems


def apply_prompt(params: PromptParams, surface: Any, ctx: Any) -> Any:
    from adaptkit_plugins.methods._prompt_impl import apply

    return apply(params, surface)


def placeholder_embeddings(model: Any) -> dict[str, "torch.Tensor"]:
    """The learned words of a model's ``prompt`` methods with ``placeholder``: ``{word: (1, dim)}``.

    This is the layout of diffusers' ``learned_embeds.safetensors`` (one row per token of
    the word; textual inversion here learns one). Example::

        placeholder_embeddings(adaptkit.load_trained("runs/ti"))  # {"<my-digit>": tensor of shape (1, 64)}
    """
    from adaptkit_plugins.methods._prompt_impl import PlaceholderEmbedding

    return {
        module.word: module.vector.detach().float().cpu().reshape(1, -1).clone()
        for module in model.modules() if isinstance(module, PlaceholderEmbedding)
    }


def learns_words(method: Any) -> bool:
    """Whether an applied method is textual inversion (its effect is learned words, not layer updates)."""
    from adaptkit_plugins.methods._prompt_impl import PlaceholderEmbedding

    return any(isinstance(module, PlaceholderEmbedding) for module in method.added)


def write_learned_embeds(model: Any, path: str | Path) -> list[Path]:
    """Write each learned word to a diffusers ``learned_embeds.safetensors`` file; return the paths.

    ``path`` is a file for one word, or a directory: ``path/learned_embeds.safetensors`` for one
    word, ``path/<n>_learned_embeds.safetensors`` (n = 0, 1, ...) for several (diffusers' loader
    takes one word per file). Load one with ``pipeline.load_textual_inversion(file)``.
    """
    from adaptkit.checkpoint import save_tensors
    from adaptkit.errors import CompatibilityError

    words = placeholder_embeddings(model)
    if not words:
        raise CompatibilityError("this run learned no placeholder word (method 'prompt' with placeholder)")
    target = Path(path)
    if target.suffix == ".safetensors":
        if len(words) > 1:
            raise CompatibilityError(f"this run learned {len(words)} words ({', '.join(words)}); give a directory, one file each")
        files = [target]
    elif len(words) == 1:
        files = [target / LEARNED_EMBEDS_FILE]
    else:
        files = [target / f"{i}_{LEARNED_EMBEDS_FILE}" for i in range(len(words))]
    for file, (word, vector) in zip(files, words.items()):
        save_tensors(file, {word: vector}, metadata={"format": "pt"})
    return files


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
