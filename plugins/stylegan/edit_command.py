"""``adaptkit edit SPEC_OR_RUN --prompt TEXT [--seed N | --w FILE | --image FILE] --out edit.png``:
the StyleGAN family's own command, added through the ``adaptkit_commands`` hook."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from adaptkit.hookspecs import hookimpl

EDIT_TASK = "clip_stylegan_edit"


@hookimpl
def adaptkit_commands(commands: Any) -> None:
    p = commands.add(
        "edit", main=main,
        help="edit StyleGAN images towards a text prompt with CLIP (StyleCLIP / StyleGAN-NADA)",
        description="Edit generated images towards a prompt, as the spec's clip_stylegan_edit task says "
        "(mode latent, global or generator). SPEC_OR_RUN is a YAML spec, or the output directory of an "
        "`adaptkit run` of one (a generator-mode run's adapter is loaded). Overrides: key.path=value.",
    )
    p.add_argument("spec", metavar="SPEC_OR_RUN", help="YAML spec with task clip_stylegan_edit, or a run directory")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. task.steps=100")
    p.add_argument("--prompt", help="target text (default: the spec's task.prompt)")
    p.add_argument("--neutral", help="neutral/source text (default: the spec's task.neutral)")
    p.add_argument("--mode", choices=["latent", "global", "generator"], help="default: the spec's task.mode")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--seed", type=int, action="append", help="source seed (repeat for several); default 0")
    source.add_argument("--w", dest="w_file", help="source latent: a safetensors or torch file holding 'w' (W or W+)")
    source.add_argument("--image", action="append", help="source picture(s) to invert into W+ first")
    p.add_argument("--alphas", help="comma-separated edit strengths for the strip over alpha, e.g. 0,0.5,1,1.5")
    p.add_argument("--out", default="edit.png", help="output PNG (beside it: .json with the measurements, _w.safetensors with the latents)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    """The edit spec (with the flags' changes) and the run directory or spec file it came from (a RunDir)."""
    from adaptkit.errors import SpecError
    from adaptkit.rundir import RunDir
    from adaptkit.spec import validate_spec

    run = RunDir.locate(args.spec, need_adapter=False)
    source = str(run.spec_file)
    spec = run.load_spec(list(args.overrides or []))
    if spec.task.name != EDIT_TASK:
        raise SpecError(
            f"adaptkit edit needs a spec whose task is {EDIT_TASK}, this one's task is '{spec.task.name}'. "
            "Write an edit spec whose backbone.pretrained is the generator (e.g. a stylegan2 run's generator.safetensors); "
            "see examples/stylegan_edit_digits.yaml",
            source,
        )
    changes = {k: v for k, v in (("prompt", args.prompt), ("neutral", args.neutral), ("mode", args.mode)) if v is not None}
    if changes:
        raw = spec.to_dict()
        raw["task"].update(changes)
        spec = validate_spec(raw, source=source)
    return spec, run


def _read_w(path: str) -> Any:
    import torch

    from adaptkit.checkpoint import load_weights
    from adaptkit.errors import CheckpointError

    state = load_weights(path)
    found = next((state[key] for key in ("w", "w_edit", "latent") if key in state), None)
    tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
    if found is None and len(tensors) == 1:
        found = tensors[0]
    if found is not None:
        if not found.is_floating_point() or not bool(torch.isfinite(found).all()):
            raise CheckpointError(f"--w {path}: the latent must hold finite floating-point numbers")
        return found
    raise CheckpointError(f"{path}: expected a tensor named 'w' (it holds {', '.join(sorted(state)) or 'nothing'})")


def _alphas(text: str | None) -> list[float] | None:
    import math

    from adaptkit.errors import SpecError

    if text is None:
        return None
    try:
        alphas = [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise SpecError(f"--alphas: expected comma-separated numbers, got {text!r}") from None
    if not alphas or not all(math.isfinite(a) for a in alphas):
        raise SpecError(f"--alphas: expected comma-separated finite numbers, e.g. 0,0.5,1, got {text!r}")
    return alphas


def _check_outputs(args: argparse.Namespace) -> Path:
    from adaptkit.commands.outputs import check_png_outputs, check_seed

    for seed in args.seed or []:
        check_seed(seed)
    out = Path(args.out)
    beside = [out.with_suffix(".json"), out.with_name(out.stem + "_w.safetensors")]
    sources = [*(args.image or []), *([args.w_file] if args.w_file else [])]
    return check_png_outputs(out, "--out", args.overwrite, beside=beside, sources=sources)


def main(args: argparse.Namespace) -> int:
    import torch

    from adaptkit.builder import build
    from adaptkit.capabilities import Edits
    from adaptkit.checkpoint import load_adapter, save_tensors
    from adaptkit.commands.outputs import atomic_png, check_image_file
    from adaptkit.distributed import resolve_device
    from adaptkit.errors import CompatibilityError, RunError
    from adaptkit.rundir import write_text
    from adaptkit.images import image_tensor
    from adaptkit_plugins.stylegan.images import save_strips

    out = _check_outputs(args)
    alphas = _alphas(args.alphas)
    spec, run = _load(args)
    adapter = run.adapter
    if spec.train.threads:
        torch.set_num_threads(spec.train.threads)
    model = build(spec)
    if not isinstance(model, Edits):
        raise CompatibilityError(f"task '{spec.task.name}' does not edit images")
    device = resolve_device(spec.train.device)
    model.to(device)
    mode = spec.task.mode
    if adapter is not None and any(p.requires_grad for p in model.parameters()):
        model.remember_initial()
        load_adapter(model, adapter)
    elif mode == "generator" and run.is_run:
        raise RunError(
            f"{args.spec}: this generator-mode run has no adapter.safetensors (has it finished?); "
            "finish it with `adaptkit run` (train.resume=true continues it) before editing with it"
        )
    elif mode == "generator":
        raise RunError(
            "mode 'generator' edits with an adapted generator: train it first with `adaptkit run SPEC`, "
            "then run `adaptkit edit RUN_DIR`"
        )
    g = model.backbone.generator
    from adaptkit.precision import compute_context

    with compute_context(model, device.type):
        if args.image:
            for path in args.image:
                note = check_image_file(path, "--image", g.img_channels, (g.size, g.size))
                if note:
                    print(f"note: {note}")
            # bicubic, as the inversion was tuned with: the picture is the target it reconstructs
            images = torch.stack([image_tensor(p, g.img_channels, g.size, "--image", resample="bicubic") for p in args.image]).to(device)
            result = model.edit(images=images, alphas=alphas)
            names = [Path(p).name for p in args.image]
        elif args.w_file:
            result = model.edit(w=_read_w(args.w_file), alphas=alphas)
            names = [f"w[{i}]" for i in range(len(result.before))]
        else:
            seeds = args.seed or [0]
            result = model.edit(seeds=seeds, alphas=alphas)
            names = [f"seed {s}" for s in seeds]

    rows = [torch.cat([result.before[i : i + 1], result.after[i : i + 1], result.strip[i]]) for i in range(len(result.before))]
    titles = ["before", "after"] + [f"alpha {a:g}" for a in result.alphas]
    atomic_png(lambda _, tmp: save_strips(rows, tmp, column_titles=titles, row_titles=names, title=f"{mode}: '{spec.task.prompt}'"),
               out, None)
    summary = result.summary()
    report = {"mode": mode, "prompt": spec.task.prompt, "neutral": spec.task.neutral, "sources": names,
              "summary": summary, "per_source": result.metrics, "alphas": result.alphas}
    write_text(out.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    written = [out.name, out.with_suffix(".json").name]
    if result.w_source is not None:
        latents = {"w_source": result.w_source}
        if result.w_edit is not None:
            latents["w"] = result.w_edit
        w_path = out.with_name(out.stem + "_w.safetensors")
        save_tensors(w_path, latents, {"mode": mode, "prompt": spec.task.prompt})
        written.append(w_path.name)
    print(f"{mode} edit towards {spec.task.prompt!r} ({len(names)} source{'s' if len(names) > 1 else ''})")
    print(f"  CLIP similarity to the prompt: {summary['clip_before']:.4f} -> {summary['clip_after']:.4f}"
          f" ({summary['clip_gain']:+.4f})")
    if "neutral_before" in summary:
        print(f"  CLIP similarity to {spec.task.neutral!r}: {summary['neutral_before']:.4f} -> {summary['neutral_after']:.4f}")
    for key, label in (("latent_distance", "latent distance |w - w_source|"), ("style_distance", "style distance"),
                       ("pixel_distance", "pixel distance (RMS)"), ("channels_moved", "style channels moved"),
                       ("inversion_mse", "inversion MSE")):
        if key in summary:
            print(f"  {label}: {summary[key]:.4f}" if isinstance(summary[key], float) else f"  {label}: {summary[key]}")
    print(f"wrote {', '.join(str(out.parent / w) for w in written)}")
    return 0
