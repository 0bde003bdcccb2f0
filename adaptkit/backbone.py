"""Base class of built backbones (imports torch)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

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

    # image_features capability -------------------------------------------
    in_chans: int = 3
    image_size: int | tuple[int, int] | None = None
    feature_dim: int = 0

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError(f"{type(self).__name__} does not encode images")

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
