"""Native export of the ``clip`` backbone: plain open_clip models (imports torch and open_clip).

A merged model is written as an open_clip "local directory" (``open_clip_config.json``
with the model and preprocessing configs, ``open_clip_model.safetensors`` with
open_clip's names), so ``open_clip.create_model("local-dir:<dir>")`` loads it without
adaptkit. open_clip models have no classifier: a classification head travels beside it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from torch import nn

from adaptkit.errors import CompatibilityError


class ClipNative:
    """Mixed into ClipBackbone; ``native_args`` is set by ``ClipBackbone.create``."""

    native_args: dict[str, Any]

    def native_model(self) -> nn.Module:
        import open_clip

        from adaptkit_plugins.clip.model import quiet_open_clip, register_model_config

        args = self.native_args
        if args.get("preset_cfg") is not None:
            register_model_config(args["model_name"], args["preset_cfg"])
        with quiet_open_clip():
            return open_clip.create_model(args["model_name"], pretrained=None, **args["kwargs"])

    def effective_config(self) -> dict[str, Any]:
        """The open_clip model config with the forced options baked in (quick GELU, sizes)."""
        args = self.native_args
        if args.get("model_cfg") is None:
            raise CompatibilityError(f"clip: no open_clip config is known for '{args['model_name']}' to write beside its weights")
        cfg = copy.deepcopy(args["model_cfg"])
        kwargs = args["kwargs"]
        if kwargs.get("force_quick_gelu"):
            cfg["quick_gelu"] = True
        if kwargs.get("force_image_size") is not None:
            cfg["vision_cfg"]["image_size"] = kwargs["force_image_size"]
        if kwargs.get("force_context_length") is not None:
            cfg["text_cfg"]["context_length"] = kwargs["force_context_length"]
        return cfg

    def native_recipe(self, native: nn.Module) -> dict[str, Any]:
        args = self.native_args
        return {
            "library": "open_clip",
            "create_model": {"model_name": args["model_name"], **{k: v for k, v in args["kwargs"].items() if _jsonable(v)}},
            "python": "model = open_clip.create_model('local-dir:<merged directory>')  # merged models; "
            "for PEFT: open_clip.create_model(**create_model) and load the base weights",
            "python_base": "model = open_clip.create_model('local-dir:<this directory>', load_weights=False)  # its open_clip_config.json",
        }

    def native_config_files(self, native: nn.Module, directory: Path) -> list[str]:
        """``open_clip_config.json``: without it plain open_clip cannot create a preset's (or any
        custom) architecture; ``open_clip.create_model("local-dir:<dir>")`` reads it."""
        from adaptkit.rundir import write_json

        write_json(directory / "open_clip_config.json",
                   {"model_cfg": self.effective_config(), "preprocess_cfg": self.native_args.get("preprocess_cfg") or {}})
        return ["open_clip_config.json"]

    def save_native(self, native: nn.Module, directory: Path, recipe: dict[str, Any]) -> list[str]:
        from adaptkit.checkpoint import save_tensors

        files = self.native_config_files(native, directory)
        save_tensors(directory / "open_clip_model.safetensors", native.state_dict(), {"format": "pt"})
        return [*files, "open_clip_model.safetensors"]


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False
