"""adaptkit classify RUN_OR_SPEC --labels a,b,c IMAGE... : rank text labels for each image.

Works with any backbone that encodes both images and text (capability
``text_features``, e.g. CLIP): each label is encoded through the model's text site
(so ``system_prompt`` templates and learned context apply), each image through the
image tower, and the labels are ranked by ``softmax(logit_scale * cosine)``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from adaptkit.errors import CompatibilityError, DataError, SpecError


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "classify", help="rank text labels for images with an image-text model (zero-shot)",
        description="Rank labels for each image by image-text similarity. RUN_OR_SPEC is a run directory "
        "(its spec.yaml and adapter.safetensors are loaded) or a YAML spec (its base weights are used).",
    )
    p.add_argument("run", metavar="RUN_OR_SPEC", help="a run directory or a YAML spec")
    p.add_argument("images", metavar="IMAGE", nargs="+", help="image files (PNG, JPEG, ...)")
    p.add_argument("--labels", help="comma-separated labels, e.g. 'cat,dog,car'; default: the run's class names")
    p.add_argument("--top", type=int, default=5, help="how many ranked labels to print per image (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    return p


def parse_labels(text: str) -> list[str]:
    labels = [label.strip() for label in text.split(",")]
    if any(not label for label in labels):
        raise SpecError(f"--labels: empty label in {text!r}; separate labels by commas, e.g. --labels cat,dog")
    if len(labels) < 2:
        raise SpecError("--labels: give at least two labels to rank")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise SpecError(f"--labels: '{repeated[0]}' is given more than once")
    return labels


def load_image(path: str, channels: int, size: tuple[int, int]) -> Any:
    """One image as a (channels, H, W) tensor in [-1, 1], bilinear-resized to ``size`` (:func:`adaptkit.images.image_tensor`)."""
    from pathlib import Path

    from adaptkit.images import image_tensor

    if not Path(path).exists():
        raise DataError(f"{path}: image not found")
    try:
        return image_tensor(path, channels, size, "IMAGE")
    except DataError as exc:
        raise DataError(f"cannot read image: {exc}") from None


def rank(model: Any, images: Any, labels: list[str]) -> Any:
    """Probabilities (n_images, n_labels): softmax of logit_scale * cosine(image, text(label))."""
    import torch
    import torch.nn.functional as F

    backbone = model.backbone
    with torch.no_grad():
        image_features = F.normalize(backbone.encode_image(images).float(), dim=-1)
        text_features = F.normalize(backbone.encode_text(labels).float(), dim=-1)
        return (backbone.logit_scale.float() * image_features @ text_features.T).softmax(dim=-1)


def main(args: argparse.Namespace) -> int:
    import torch

    from adaptkit.builder import build
    from adaptkit.capabilities import HasClassNames
    from adaptkit.checkpoint import load_adapter
    from adaptkit.precision import compute_context
    from adaptkit.rundir import RunDir

    if args.top < 1:
        raise SpecError("--top must be at least 1")
    labels = parse_labels(args.labels) if args.labels is not None else None
    source = RunDir.locate(args.run, need_adapter=False)
    adapter = source.adapter
    spec = source.load_spec()
    model = build(spec)
    backbone = model.backbone
    if "text_features" not in backbone.capabilities:
        raise CompatibilityError(
            f"backbone '{spec.backbone.name}' does not encode text; classify ranks labels by image-text similarity "
            "and needs a backbone with the text_features capability (see `adaptkit plugins backbone`)"
        )
    if adapter is not None:
        load_adapter(model, adapter)
    if labels is None:
        names = (model.class_names if isinstance(model, HasClassNames) else None) or model.adaptkit.data_info.class_names
        if not names or len(names) < 2:
            raise SpecError("--labels: this run has no class names; give the labels, e.g. --labels cat,dog")
        labels = list(names)
    device = torch.device(args.device)
    model.to(device).eval()
    size = backbone.image_size if isinstance(backbone.image_size, tuple) else (backbone.image_size, backbone.image_size)
    batch = torch.stack([load_image(p, backbone.in_chans, size) for p in args.images]).to(device)
    with compute_context(model, device.type):
        probabilities = rank(model, batch, labels).float().cpu()
    report = []
    for path, row in zip(args.images, probabilities):
        order = row.argsort(descending=True).tolist()
        report.append({
            "image": path,
            "ranking": [{"label": labels[i], "probability": round(float(row[i]), 6), "rank": r + 1} for r, i in enumerate(order)],
        })
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
        return 0
    total = len(labels)
    for entry in report:
        print(entry["image"])
        for item in entry["ranking"][: args.top]:
            print(f"  {item['label']} {100 * item['probability']:.1f}%, ranked {item['rank']} of {total}")
    return 0
