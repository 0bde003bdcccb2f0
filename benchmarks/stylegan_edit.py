"""Does a CLIP-guided edit of a generated "3" reach an "8"? StyleCLIP / StyleGAN-NADA on the digits, offline.

    python benchmarks/stylegan_edit.py                # trains what it needs under runs/bench_stylegan_edit
    python benchmarks/stylegan_edit.py --reuse        # reuse the generator and CLIP trained before

1. train a tiny StyleGAN2 on scikit-learn's digits (examples/stylegan2_digits.yaml);
2. pretrain the tiny CLIP on the captioned digits (the clip issue's contrastive task);
3. an independent judge: LogisticRegression on the 64 raw pixels (calibration.md), fed (x + 1) * 8;
4. sources: the first seeds whose image (truncation 0.7) the judge calls a 3;
5. edit every source towards "a handwritten digit eight" with each mode, and ask the judge.

The table reports how often the judge agrees the edit reached an 8, how often the
source still reads as a 3, the CLIP similarity to the prompt before -> after, and how
far the edit moved (latent L2, pixel RMS). A control edits towards the source's own
class ("... three"): it should produce no 8s, so the 8s come from the text.
Writes docs/images/stylegan_edit_digits.png (sources and their edits).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

import adaptkit

PROMPT, NEUTRAL = "a handwritten digit eight", "a handwritten digit three"
ROOT = Path(__file__).resolve().parent.parent


def quiet(*_: object) -> None:
    pass


def train_generator(work: Path, steps: int, reuse: bool) -> Path:
    out = work / "stylegan2_digits"
    if not (reuse and (out / "generator.safetensors").exists()):
        spec = adaptkit.load_spec(ROOT / "examples" / "stylegan2_digits.yaml",
                                  [f"train.max_steps={steps}", f"output.dir={out}", "train.progress=false", "train.threads=1"])
        adaptkit.run(spec, overwrite=True, log=quiet)
    return out / "generator.safetensors"


def train_clip(work: Path, steps: int, reuse: bool) -> Path:
    out = work / "clip_digits"
    if not (reuse and (out / "adapter.safetensors").exists()):
        spec = {
            "name": "clip_digits", "seed": 0,
            "backbone": {"name": "clip", "model": "clip_tiny_digits"},
            "methods": [{"name": "full"}],
            "task": {"name": "contrastive"},
            "data": {"name": "digits_captions"},
            "train": {"max_steps": steps, "eval_every": steps, "batch_size": 64, "lr": 1e-3, "weight_decay": 0.1,
                      "warmup": 0.05, "grad_clip": None, "progress": False, "threads": 1},
            "output": {"dir": str(out), "overwrite": True},
        }
        adaptkit.run(spec, log=quiet)
    return out / "adapter.safetensors"


def judge() -> tuple[object, float]:
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(digits.data, digits.target, test_size=0.3, random_state=0,
                                                        stratify=digits.target)
    model = LogisticRegression(C=1, max_iter=5000).fit(x_train, y_train)
    return model, float(model.score(x_test, y_test))


def probabilities(model: object, images: torch.Tensor) -> np.ndarray:
    pixels = ((images.detach().float().cpu()[:, 0].clamp(-1, 1) + 1) * 8).reshape(len(images), 64).numpy()
    return model.predict_proba(pixels)


def edit_spec(generator: Path, clip: Path, **task: object) -> dict:
    return {
        "name": "bench_edit", "seed": 0,
        "backbone": {"name": "stylegan2", "model": "stylegan2_tiny_8", "pretrained": str(generator)},
        "methods": [],
        "task": {"name": "clip_stylegan_edit", "prompt": PROMPT, "neutral": NEUTRAL,
                 "clip": {"name": "clip", "model": "clip_tiny_digits", "pretrained": str(clip)}, **task},
        "data": {"name": "latent_seeds"},
        "train": {"progress": False, "threads": 1},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/bench_stylegan_edit")
    parser.add_argument("--gan-steps", type=int, default=2000)
    parser.add_argument("--clip-steps", type=int, default=900)
    parser.add_argument("--sources", type=int, default=40, help="edited sources (seeds the judge calls a 3)")
    parser.add_argument("--nada-steps", type=int, default=300)
    parser.add_argument("--reuse", action="store_true", help="reuse a generator and CLIP trained before")
    parser.add_argument("--image", default=str(ROOT / "docs" / "images" / "stylegan_edit_digits.png"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    generator = train_generator(work, args.gan_steps, args.reuse)
    gan_seconds = time.perf_counter() - started
    started = time.perf_counter()
    clip = train_clip(work, args.clip_steps, args.reuse)
    clip_seconds = time.perf_counter() - started
    referee, referee_accuracy = judge()

    base = adaptkit.build(edit_spec(generator, clip))
    samples = torch.cat([base.render(base.latents_from_seeds(range(s, s + 250), "w")) for s in range(0, 1000, 250)])
    p = probabilities(referee, samples)
    hist = np.bincount(p.argmax(1), minlength=10) / len(p)
    entropy = -(hist[hist > 0] * np.log(hist[hist > 0])).sum() / math.log(10)
    print(f"generator: {args.gan_steps} steps ({gan_seconds:.0f} s); 1,000 samples at truncation 0.7: judge confident (p>0.9) on "
          f"{100 * (p.max(1) > 0.9).mean():.1f}%, class entropy {entropy:.2f} (1 = all ten digits equally)")
    print(f"clip: {args.clip_steps} steps ({clip_seconds:.0f} s); judge: logistic regression, {100 * referee_accuracy:.1f}% on real test digits")

    threes = [s for s, row in enumerate(p) if row.argmax() == 3 and row[3] > 0.5][: args.sources]
    print(f"sources: {len(threes)} seeds the judge calls a 3 (of the first {len(p)})\n")

    rows: list[dict[str, object]] = []
    pictures: dict[str, torch.Tensor] = {}

    def record(label: str, short: str, before: torch.Tensor, result: object, seconds: float) -> None:
        after_p = probabilities(referee, result.after)
        summary = result.summary()
        rows.append({
            "mode": label,
            "judge_8": float((after_p.argmax(1) == 8).mean()),
            "judge_3": float((after_p.argmax(1) == 3).mean()),
            "clip": f"{summary['clip_before']:.3f} -> {summary['clip_after']:.3f}",
            "clip_prefers_8": summary.get("closer_to_prompt", float("nan")),
            "latent_l2": summary.get("latent_distance", float("nan")),
            "pixel_rms": summary["pixel_distance"],
            "seconds": seconds,
        })
        pictures.setdefault("source", before[:6].cpu())
        pictures[short] = result.after[:6].cpu()

    modes = [
        ("latent W+ (StyleCLIP defaults)", "latent W+", {"mode": "latent", "space": "w+"}),
        ("latent W", "latent W", {"mode": "latent", "space": "w"}),
        ("global directions (alpha 4, beta 0.1)", "global alpha 4", {"mode": "global"}),
        ("global directions (alpha 2, beta 0.1)", "global alpha 2", {"mode": "global", "alpha": 2.0}),
        ("control: latent W+ towards 'three'", "control", {"mode": "latent", "space": "w+", "prompt": NEUTRAL, "neutral": PROMPT}),
    ]
    alpha_strip = None
    for label, short, task in modes:
        model = adaptkit.build(edit_spec(generator, clip, **task))
        started = time.perf_counter()
        result = model.edit(seeds=threes)
        record(label, short, result.before, result, time.perf_counter() - started)
        if alpha_strip is None:
            alpha_strip = result

    # StyleGAN-NADA: LoRA on the synthesis convs, trained with the directional loss over seeds 10,000+
    for lr in (1e-2, 3e-2):
        nada = edit_spec(generator, clip, mode="generator")
        nada["methods"] = [{"name": "lora", "rank": 4, "targets": ["conv"], "tower": "synthesis"}]
        nada["data"] = {"name": "latent_seeds", "first": 10_000, "train": 4096, "val": 0, "test": 0}
        nada["train"].update({"max_steps": args.nada_steps, "batch_size": 16, "lr": lr, "eval_every": args.nada_steps})
        nada["output"] = {"dir": str(work / f"nada_{lr:g}"), "overwrite": True}
        started = time.perf_counter()
        trained = adaptkit.run(nada, log=quiet).model
        result = trained.edit(seeds=threes)
        with torch.no_grad():
            adapted = torch.cat([trained.render(trained.latents_from_seeds(range(s, s + 250), "w+")) for s in range(0, 1000, 250)])
        share = (probabilities(referee, adapted).argmax(1) == 8).mean()
        print(f"NADA lr {lr:g}: the judge calls {100 * share:.1f}% of all 1,000 samples an 8 after adaptation "
              f"({100 * hist[8]:.1f}% before)")
        record(f"generator: NADA, LoRA r4 on conv, {args.nada_steps} steps, lr {lr:g}", f"NADA lr {lr:g}",
               result.before, result, time.perf_counter() - started)

    print(f"edit {len(threes)} generated 3s towards {PROMPT!r} (before any edit the judge calls all of them 3, none 8):\n")
    print("| mode | judge: 8 | judge: still 3 | CLIP sim. to prompt | CLIP prefers the prompt | latent L2 | pixel RMS | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['mode']} | {100 * row['judge_8']:.0f}% | {100 * row['judge_3']:.0f}% | {row['clip']} | "
              f"{100 * row['clip_prefers_8']:.0f}% | {row['latent_l2']:.2f} | {row['pixel_rms']:.3f} | {row['seconds']:.0f} |")

    from adaptkit_plugins.stylegan.images import save_strips

    labels = list(pictures)
    columns = [pictures[label] for label in labels]
    strip_rows = [torch.stack([c[i] for c in columns]) for i in range(len(columns[0]))]
    Path(args.image).parent.mkdir(parents=True, exist_ok=True)
    save_strips(strip_rows, args.image, column_titles=labels, title=f"generated 3s edited towards '{PROMPT}'")
    alpha_image = Path(args.image).with_name(Path(args.image).stem + "_alpha.png")
    save_strips([alpha_strip.strip[i].cpu() for i in range(3)], alpha_image,
                column_titles=[f"alpha {a:g}" for a in alpha_strip.alphas],
                title="latent W+: w_source + alpha (w_edit - w_source)")
    (work / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nwrote {args.image}, {alpha_image} and {work / 'results.json'}")


if __name__ == "__main__":
    main()
