"""Base class of built backbones (imports torch)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaptkit.data import InputConfig
from adaptkit.surface import Surface


class Backbone(nn.Module):
    """A built backbone: a native model (timm, open_clip, diffusers) plus its surface.

    Subclasses set ``capabilities`` and implement :meth:`make_surface`. A backbone
    with the ``image_features`` capability also provides ``encode_image``,
    ``feature_dim``, ``in_chans`` and ``image_size``.
    """

    capabilities: frozenset[str] = frozenset()
    #: registered name, set by the build
    registered_name: str = ""

    def __init__(self) -> None:
        super().__init__()
        self._surface: Surface | None = None

    def make_surface(self) -> Surface:
        """Describe the adaptation surface (names relative to this module)."""
        raise NotImplementedError

    @property
    def surface(self) -> Surface:
        if self._surface is None:
            self._surface = self.make_surface()
        return self._surface

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights that identify this base model (fingerprinted in adapter files)."""
        return self.state_dict()

    def native_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map this backbone's own state-dict names to the native library's (for export)."""
        return state

    # native export (merge, PEFT) -------------------------------------------
    #: this backbone's modules that are not part of the native model but that :meth:`save_native`
    #: writes beside its weights (a diffusers UNet's learned class tokens), so merging may change them
    native_side_modules: tuple[str, ...] = ()
    #: why PEFT's LoRA layers cannot wrap the native model's layers (None: they can); export refuses with it
    peft_problem: str | None = None

    def native_model(self) -> nn.Module:
        """A fresh model of the native library (timm, open_clip, diffusers) with this backbone's
        architecture and none of adaptkit's modules or hooks. Its weights are whatever the
        library initialises; :func:`adaptkit.native.native_copy` loads ours into it through
        :meth:`native_state_dict`."""
        from adaptkit.errors import CompatibilityError

        raise CompatibilityError(f"backbone '{self.registered_name}' cannot create a plain model of its native library")

    def native_recipe(self, native: nn.Module) -> dict[str, Any]:
        """How plain library code creates ``native`` (a JSON-able dict, written beside exported weights)."""
        return {}

    def native_module_name(self, name: str) -> str:
        """The native model's name for this backbone's module ``name`` (both relative to their models).

        Derived from :meth:`native_state_dict`: ``X.weight`` maps to ``Y.weight``, so ``X`` to
        ``Y``; a fused weight that is a parameter of a native module (open_clip's
        ``attn.in_proj_weight``) gives that parameter's full name. A module the native model
        does not hold is a :class:`CompatibilityError`.
        """
        mapped = list(self.native_state_dict({f"{name}.weight": torch.empty(0)}))
        if len(mapped) != 1:
            from adaptkit.errors import CompatibilityError

            raise CompatibilityError(f"backbone '{self.registered_name}': {name} has no counterpart in the plain library model")
        (mapped,) = mapped
        return mapped[: -len(".weight")] if mapped.endswith(".weight") else mapped

    def native_classifier(self, native: nn.Module, head: nn.Linear) -> str | None:
        """Give ``native`` a copy of the linear classifier ``head`` over :meth:`encode_image`
        features, so that the native model's forward gives its logits; return the head's
        qualified name in ``native``, or None where the native model has no place for one."""
        return None

    def native_config_files(self, native: nn.Module, directory: Path) -> list[str]:
        """Write the files besides the weights that plain library code needs to create ``native``'s
        architecture (open_clip's ``open_clip_config.json``); return their names. Written by
        ``adaptkit merge`` (in :meth:`save_native`) and ``adaptkit export`` alike. Default: none."""
        return []

    def save_native(self, native: nn.Module, directory: Path, recipe: dict[str, Any]) -> list[str]:
        """Write ``native``'s weights in the native library's own layout; return the file names.

        Default: ``model.safetensors`` with the native state-dict names.
        """
        from adaptkit.checkpoint import save_tensors

        save_tensors(directory / "model.safetensors", native.state_dict(), {"format": "native", "recipe": recipe})
        return ["model.safetensors"]

    # image_features capability -------------------------------------------
    in_chans: int = 3
    image_size: int | tuple[int, int] | None = None
    feature_dim: int = 0

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError(f"{type(self).__name__} does not encode images")

    def input_config(self) -> InputConfig | None:
        """The images this backbone expects (size, channels, mean/std, resampling, crop),
        taken from its checkpoint; None for a backbone that takes no images.

        Default: adaptkit's own convention, [-1, 1] at ``image_size`` with ``in_chans``
        channels (diffusion and StyleGAN models). timm backbones return timm's pretrained
        config, CLIP its preprocess config. Image data sources build their transforms from it.
        """
        if self.image_size is None:
            return None
        size = (self.image_size,) * 2 if isinstance(self.image_size, int) else tuple(self.image_size)
        return InputConfig(size=size, channels=int(self.in_chans), source="[-1, 1]")

    # text_features capability (image-text models such as CLIP) -------------
    # ``encode_image`` and ``encode_text`` map into one joint space; zero-shot
    # logits are ``logit_scale * normalize(image) @ normalize(text).T``.

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:  # pragma: no cover - interface
        """Token ids (n, context_length) of ``texts`` after the text site's transforms."""
        raise NotImplementedError(f"{type(self).__name__} does not encode text")

    def encode_text(self, texts: Sequence[str] | torch.Tensor, normalize: bool = False) -> torch.Tensor:  # pragma: no cover - interface
        """Text features (n, feature_dim): from strings (through the text site) or token ids."""
        raise NotImplementedError(f"{type(self).__name__} does not encode text")

    @property
    def logit_scale(self) -> torch.Tensor:  # pragma: no cover - interface
        """The (exponentiated) temperature that multiplies cosine similarities."""
        raise NotImplementedError(f"{type(self).__name__} has no image-text logit scale")

    def extra_repr(self) -> str:
        return self.registered_name

    def describe(self) -> dict[str, Any]:
        return {"name": self.registered_name, "towers": list(self.surface.towers)}
