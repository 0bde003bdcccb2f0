"""Export format ``peft``: a Hugging Face PEFT LoRA directory (adapter_config.json + adapter_model.safetensors)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adaptkit.hookspecs import hookimpl
from adaptkit.records import ExportFormatRecord


def write_peft(model: Any, directory: Path, *, include_base: bool = False) -> list[str]:
    from adaptkit.peft_format import export_peft

    return export_peft(model, directory, include_base=include_base)


def read_peft(source: Path, base_spec: Any, method: str | None = None) -> Any:
    from adaptkit.peft_format import import_peft

    return import_peft(source, base_spec, method=method)


def is_peft_directory(source: Path) -> bool:
    return (Path(source) / "adapter_config.json").is_file()


@hookimpl
def adaptkit_export_formats() -> list[ExportFormatRecord]:
    return [ExportFormatRecord(
        name="peft", write=write_peft, read=read_peft, recognises=is_peft_directory,
        summary="PEFT LoRA directory: peft.PeftModel.from_pretrained(<plain timm/open_clip/diffusers model>, OUT)",
    )]
